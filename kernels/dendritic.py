"""Triton kernels of a dendritic unit (DESIGN.md "Math"): one launch computes a tile of output
pixels x output channels of the main conv and all D dendrites, and finishes it in registers.

Every tensor is addressed through its four strides, so one kernel serves NHWC (channels_last,
coalesced along the channel tiles) and NCHW.  A tile's convolutions come from one of three
``MODE``s:

    0  depthwise (groups == C_in == C_out): a direct loop over the kernel taps;
    1  pointwise (1x1, groups == 1): a GEMM over the input channels with ``tl.dot``, the main
       conv's and then each dendrite's in turn (each finished before the next starts);
    2  any other conv: the pre-activations were computed by one stacked ATen (cuDNN) convolution
       whose output channel of conv m (0 = main, then the dendrites) and channel c = (g, cl) is
       (g * M + m) * Cg + cl, and the kernel loads them.

Accumulation is float32 whatever the storage dtype (float32, bfloat16, float16); float64
inputs accumulate in float64 (``ACC``).  Per-channel
sums over pixels are written per pixel-tile into a ``partials`` (tiles, rows, C) buffer (ACC)
that the launcher reduces with one deterministic ``sum``: no atomics, no host synchronisation.
"""
import triton
import triton.language as tl


@triton.jit
def _aligned(v, VEC: tl.constexpr):
    """v, which the launcher checked to be a multiple of VEC, in a form the compiler can see is
    one (so that channel runs load and store as 16-byte vectors)."""
    return v // VEC * VEC


@triton.jit
def _tile(P, HWo, Wo, C, BP: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr):
    """The program's output pixels p (flattened n, oh, ow) and channels c, with their masks."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mp = p < P
    mc = c < _aligned(C, VEC)
    n = (p // HWo).to(tl.int64)
    r = p % HWo
    return c, mp, mc, n, r // Wo, r % Wo


@triton.jit
def _offsets(n, c, oh, ow, sn, sc, sh, sw, VEC: tl.constexpr):
    """(pixels, channels) element offsets of a 4-D tensor with strides (sn, sc, sh, sw)."""
    return (n * _aligned(sn, VEC) + oh * _aligned(sh, VEC) + ow * _aligned(sw, VEC))[:, None] \
        + c.to(tl.int64)[None, :] * sc


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b; PREC "upcast" computes in float32 (the CPU interpreter's bfloat16 dot is
    wrong), else it is tl.dot's input_precision."""
    if PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _gemm(x_ptr, w_ptr, n, oh, ow, c, mp, mc, C_in, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW,
          BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
          ACC: tl.constexpr, VEC: tl.constexpr):
    """(BP, BC) 1x1 conv of the tile: x's pixel rows times the (C, C_in) weights at w_ptr, in
    steps of BK input channels."""
    ih = oh * SH - PH
    iw = ow * SW - PW
    ok = mp & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    row = n * _aligned(sxn, VEC) + ih * _aligned(sxh, VEC) + iw * _aligned(sxw, VEC)
    ci = _aligned(C_in, VEC)
    acc = tl.zeros((BP, BC), ACC)
    for k0 in range(0, C_in, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < ci
        xv = tl.load(x_ptr + row[:, None] + k.to(tl.int64)[None, :] * sxc,
                     mask=ok[:, None] & mk[None, :], other=0.0)
        wv = tl.load(w_ptr + c[None, :] * ci + k[:, None], mask=mk[:, None] & mc[None, :],
                     other=0.0)
        acc = _dot(xv, wv, acc, PREC)
    return acc


@triton.jit
def _stacked(z_ptr, n, oh, ow, c, m2, Cg, M, m, szn, szc, szh, szw, ACC: tl.constexpr,
             VEC: tl.constexpr):
    """(BP, BC) output of conv m of the M convs stacked in z (mode 2): channel (g*M + m)*Cg + cl
    for c = (g, cl)."""
    return tl.load(z_ptr + _offsets(n, ((c // Cg) * M + m) * Cg + c % Cg, oh, ow, szn, szc, szh,
                                    szw, VEC), mask=m2, other=0.0).to(ACC)


@triton.jit
def _conv_tile(x_ptr, w_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc,
               C_in, H, W, C, Cg, sxn, sxc, sxh, sxw, szn, szc, szh, szw,
               SH, SW, PH, PW, DH, DW,
               MODE: tl.constexpr, HAS_W: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """(BP, BC) main-conv pre-activation of one tile (no bias) and, in mode 0 only, the
    (DP, BP, BC) dendrite pre-activations (each tap of x feeds all D + 1 convs; rows d >= D are
    zero).  Modes 1 and 2 give the dendrites one at a time (:func:`_dendrite_pre`), so that no
    (DP, BP, BC) accumulator lives beside the GEMM."""
    acc = tl.zeros((BP, BC), ACC)
    acc_d = tl.zeros((DP, BP, BC), ACC)
    if MODE == 0:
        d = tl.arange(0, DP)
        md = d < D
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW
        x0 = x_ptr + _offsets(n, c, ih0, iw0, sxn, sxc, sxh, sxw, VEC)  # tap (0, 0)
        for i in tl.static_range(KH):
            ih = ih0 + i * DH
            okh = mp & (ih >= 0) & (ih < H)
            for j in tl.static_range(KW):
                iw = iw0 + j * DW
                ok = okh & (iw >= 0) & (iw < W)
                xv = tl.load(x0 + (i * DH * _aligned(sxh, VEC) + j * DW * _aligned(sxw, VEC)),
                             mask=ok[:, None] & mc[None, :], other=0.0).to(ACC)
                if HAS_W:
                    wv = tl.load(w_ptr + c * (KH * KW) + (i * KW + j), mask=mc, other=0.0)
                    acc += xv * wv.to(ACC)[None, :]
                if D > 0:
                    wd = tl.load(dw_ptr + d[:, None] * (C * KH * KW) + c[None, :] * (KH * KW)
                                 + (i * KW + j), mask=md[:, None] & mc[None, :], other=0.0)
                    acc_d += xv[None, :, :] * wd.to(ACC)[:, None, :]
    elif HAS_W:
        if MODE == 1:
            acc = _gemm(x_ptr, w_ptr, n, oh, ow, c, mp, mc, C_in, H, W, sxn, sxc, sxh, sxw,
                        SH, SW, PH, PW, BP, BC, BK, PREC, ACC, VEC)
        else:
            acc = _stacked(z_ptr, n, oh, ow, c, mp[:, None] & mc[None, :], Cg, D + 1, 0,
                           szn, szc, szh, szw, ACC, VEC)
    return acc, acc_d


@triton.jit
def _dendrite_pre(k, acc_d, x_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C, Cg,
                  sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW,
                  MODE: tl.constexpr, HAS_W: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                  ACC: tl.constexpr, VEC: tl.constexpr):
    """(BP, BC) pre-activation of dendrite k (no bias): row k of mode 0's accumulator, a GEMM
    (mode 1) or its conv of the stack (mode 2)."""
    if MODE == 0:
        a = tl.sum(tl.where((tl.arange(0, DP) == k)[:, None, None], acc_d, 0.0), axis=0)
    elif MODE == 1:
        a = _gemm(x_ptr, dw_ptr + k * C * C_in, n, oh, ow, c, mp, mc, C_in, H, W,
                  sxn, sxc, sxh, sxw, SH, SW, PH, PW, BP, BC, BK, PREC, ACC, VEC)
    elif HAS_W:  # the stack is main, then the dendrites
        a = _stacked(z_ptr, n, oh, ow, c, mp[:, None] & mc[None, :], Cg, D + 1, k + 1,
                     szn, szc, szh, szw, ACC, VEC)
    else:
        a = _stacked(z_ptr, n, oh, ow, c, mp[:, None] & mc[None, :], Cg, D, k,
                     szn, szc, szh, szw, ACC, VEC)
    return a


@triton.jit
def dendritic_fwd_kernel(
        x_ptr, w_ptr, b_ptr, base_ptr, dw_ptr, db_ptr, ds_ptr, dc_ptr, z_ptr, y_ptr, s_ptr,
        P, HWo, Wo, C, C_in, H, W, Cg,
        sxn, sxc, sxh, sxw, szn, szc, szh, szw, syn, syc, syh, syw, sbn, sbc, sbh, sbw,
        ssd, ssn, ssc, ssh, ssw, SH, SW, PH, PW, DH, DW,
        MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_BASE: tl.constexpr,
        HAS_DB: tl.constexpr, HAS_DC: tl.constexpr, SAVE_S: tl.constexpr, D: tl.constexpr,
        DP: tl.constexpr, DS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
        ACC: tl.constexpr, VEC: tl.constexpr):
    """y = base + conv(x; W) + b + sum_k alpha_k s_k,  s_k = sigmoid(conv(x; W_k) + b_k
    + sum_{j<k} kappa_kj s_j); s is stored when SAVE_S (for the backward).  The cascade keeps
    s_0 .. s_{D-2} in a (DS, BP, BC) register tile (DS >= D - 1)."""
    c, mp, mc, n, oh, ow = _tile(P, HWo, Wo, C, BP, BC, VEC)
    m2 = mp[:, None] & mc[None, :]
    acc, acc_d = _conv_tile(x_ptr, w_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C, Cg,
                            sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW, DH, DW,
                            MODE, HAS_W, D, DP, KH, KW, BP, BC, BK, PREC, ACC, VEC)
    y = acc
    if HAS_B:
        y += tl.load(b_ptr + c, mask=mc, other=0.0).to(ACC)[None, :]
    if HAS_BASE:
        y += tl.load(base_ptr + _offsets(n, c, oh, ow, sbn, sbc, sbh, sbw, VEC), mask=m2,
                     other=0.0).to(ACC)
    j = tl.arange(0, DS)
    s_all = tl.zeros((DS, BP, BC), ACC)
    s_off = _offsets(n, c, oh, ow, ssn, ssc, ssh, ssw, VEC)
    for k in tl.static_range(D):
        a = _dendrite_pre(k, acc_d, x_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C,
                          Cg, sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW,
                          MODE, HAS_W, D, DP, BP, BC, BK, PREC, ACC, VEC)
        if HAS_DB:
            a += tl.load(db_ptr + k * C + c, mask=mc, other=0.0).to(ACC)[None, :]
        if HAS_DC and k > 0:
            kap = tl.load(dc_ptr + k * D * C + j[:, None] * C + c[None, :],
                          mask=(j < k)[:, None] & mc[None, :], other=0.0).to(ACC)
            a += tl.sum(kap[:, None, :] * s_all, axis=0)
        s = tl.sigmoid(a)
        if HAS_DC and k < D - 1:
            s_all = tl.where((j == k)[:, None, None], s[None, :, :], s_all)
        y += tl.load(ds_ptr + k * C + c, mask=mc, other=0.0).to(ACC)[None, :] * s
        if SAVE_S:
            tl.store(s_ptr + k * _aligned(ssd, VEC) + s_off, s.to(s_ptr.dtype.element_ty), mask=m2)
    tl.store(y_ptr + _offsets(n, c, oh, ow, syn, syc, syh, syw, VEC), y.to(y_ptr.dtype.element_ty),
             mask=m2)


@triton.jit
def dendritic_bwd_kernel(
        g_ptr, s_ptr, ds_ptr, dc_ptr, ga_ptr, part_ptr,
        P, HWo, Wo, C, Cg, sgn, sgc, sgh, sgw, ssd, ssn, ssc, ssh, ssw, san, sac, sah, saw,
        HAS_DC: tl.constexpr, NEED_GA: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        R: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
        VEC: tl.constexpr):
    """The perforated backward's dendrite part.  From g = dL/dy and the saved s, in reverse:
    dL/ds_k = alpha_k g + sum_{m>k} kappa_mk ga_m,  ga_k = dL/da_k = dL/ds_k s_k (1 - s_k).
    Partial rows per channel: 0 sum g (main bias); 1+k sum g s_k (alpha_k); 1+D+k sum ga_k (b_k);
    1+2D+k*D+j sum ga_k s_j for j < k (kappa_kj).  ga_k is stored at channel (g*D + k)*Cg + cl of
    the stacked grouped conv whose weight gradient gives every W_k at once."""
    c, mp, mc, n, oh, ow = _tile(P, HWo, Wo, C, BP, BC, VEC)
    m2 = mp[:, None] & mc[None, :]
    d = tl.arange(0, DP)
    md = d < D
    gv = tl.load(g_ptr + _offsets(n, c, oh, ow, sgn, sgc, sgh, sgw, VEC), mask=m2,
                 other=0.0).to(ACC)
    s_all = tl.load(s_ptr + d.to(tl.int64)[:, None, None] * _aligned(ssd, VEC)
                    + _offsets(n, c, oh, ow, ssn, ssc, ssh, ssw, VEC)[None, :, :],
                    mask=md[:, None, None] & m2[None, :, :], other=0.0).to(ACC)
    part = part_ptr + tl.program_id(0).to(tl.int64) * (R * C)
    tl.store(part + c, tl.sum(gv, axis=0), mask=mc)
    tl.store(part + (1 + d[:, None]) * C + c[None, :], tl.sum(gv[None, :, :] * s_all, axis=1),
             mask=md[:, None] & mc[None, :])
    if NEED_GA:
        ga_all = tl.zeros((DP, BP, BC), ACC)
        grp = c // Cg
        cl = c % Cg
        for kk in tl.static_range(D):
            k: tl.constexpr = D - 1 - kk
            sel = (d == k)[:, None, None]
            s_k = tl.sum(tl.where(sel, s_all, 0.0), axis=0)
            gs = tl.load(ds_ptr + k * C + c, mask=mc, other=0.0).to(ACC)[None, :] * gv
            if HAS_DC and k < D - 1:
                kap = tl.load(dc_ptr + d[:, None] * (D * C) + k * C + c[None, :],
                              mask=(d > k)[:, None] & md[:, None] & mc[None, :],
                              other=0.0).to(ACC)
                gs += tl.sum(kap[:, None, :] * ga_all, axis=0)
            ga = gs * s_k * (1.0 - s_k)
            ga_all = tl.where(sel, ga[None, :, :], ga_all)
            tl.store(part + (1 + D + k) * C + c, tl.sum(ga, axis=0), mask=mc)
            if HAS_DC and k > 0:
                tl.store(part + (1 + 2 * D + k * D + d[:, None]) * C + c[None, :],
                         tl.sum(ga[None, :, :] * s_all, axis=1),
                         mask=(d < k)[:, None] & mc[None, :])
            tl.store(ga_ptr + _offsets(n, (grp * D + k) * Cg + cl, oh, ow, san, sac, sah, saw,
                                       VEC), ga.to(ga_ptr.dtype.element_ty), mask=m2)


@triton.jit
def candidate_kernel(
        x_ptr, w_ptr, b_ptr, z_ptr, cc_ptr, s_ptr, e_ptr, me_ptr, sg_ptr, ga_ptr, part_ptr,
        P, HWo, Wo, C, C_in, H, W, inv_n,
        sxn, sxc, sxh, sxw, szn, szc, szh, szw, ssd, ssn, ssc, ssh, ssw, sen, sec, seh, sew,
        san, sac, sah, saw, SH, SW, PH, PW, DH, DW,
        MODE: tl.constexpr, HAS_B: tl.constexpr, DC: tl.constexpr, DCP: tl.constexpr,
        R: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr,
        BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
        VEC: tl.constexpr):
    """One candidate's pass: v = sigmoid(conv(x; W_c) + b_c + sum_j kappa_j s_j), e = dL/dy.
    Partial rows per channel: 0..3 sums of v, e, v e, e e; 4 sum ga (b_c); 5+j sum ga s_j
    (kappa_j), where ga = dL_c/da = -sign (e - mean_e) / n * v (1 - v) is also stored for the
    weight gradient."""
    c, mp, mc, n, oh, ow = _tile(P, HWo, Wo, C, BP, BC, VEC)
    m2 = mp[:, None] & mc[None, :]
    acc, _ = _conv_tile(x_ptr, w_ptr, w_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C, C,
                        sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW, DH, DW,
                        MODE, True, 0, 1, KH, KW, BP, BC, BK, PREC, ACC, VEC)
    if HAS_B:
        acc += tl.load(b_ptr + c, mask=mc, other=0.0).to(ACC)[None, :]
    j = tl.arange(0, DCP)
    s_all = tl.zeros((DCP, BP, BC), ACC)
    if DC > 0:
        s_all = tl.load(s_ptr + j.to(tl.int64)[:, None, None] * _aligned(ssd, VEC)
                        + _offsets(n, c, oh, ow, ssn, ssc, ssh, ssw, VEC)[None, :, :],
                        mask=(j < DC)[:, None, None] & m2[None, :, :], other=0.0).to(ACC)
        kap = tl.load(cc_ptr + j[:, None] * C + c[None, :], mask=(j < DC)[:, None] & mc[None, :],
                      other=0.0).to(ACC)
        acc += tl.sum(kap[:, None, :] * s_all, axis=0)
    v = tl.where(m2, tl.sigmoid(acc), 0.0)
    e = tl.load(e_ptr + _offsets(n, c, oh, ow, sen, sec, seh, sew, VEC), mask=m2,
                other=0.0).to(ACC)
    mean_e = tl.load(me_ptr + c, mask=mc, other=0.0).to(ACC)
    sign = tl.load(sg_ptr + c, mask=mc, other=0.0).to(ACC)
    ga = tl.where(m2, -(sign * inv_n)[None, :] * (e - mean_e[None, :]) * v * (1.0 - v), 0.0)
    part = part_ptr + tl.program_id(0).to(tl.int64) * (R * C)
    tl.store(part + c, tl.sum(v, axis=0), mask=mc)
    tl.store(part + C + c, tl.sum(e, axis=0), mask=mc)
    tl.store(part + 2 * C + c, tl.sum(v * e, axis=0), mask=mc)
    tl.store(part + 3 * C + c, tl.sum(e * e, axis=0), mask=mc)
    tl.store(part + 4 * C + c, tl.sum(ga, axis=0), mask=mc)
    if DC > 0:
        tl.store(part + (5 + j[:, None]) * C + c[None, :], tl.sum(ga[None, :, :] * s_all, axis=1),
                 mask=(j < DC)[:, None] & mc[None, :])
    tl.store(ga_ptr + _offsets(n, c, oh, ow, san, sac, sah, saw, VEC),
             ga.to(ga_ptr.dtype.element_ty), mask=m2)


# -- a candidate's running statistics (C <= a few thousand channels: one program) -------------
@triton.jit
def _corr(m_v, m_e, m_ve, m_ee):
    """C_c from the running means of (v, e, v e, e e)."""
    return (m_ve - m_v * m_e) / tl.sqrt(tl.maximum(m_ee - m_e * m_e, 0.0) + 1e-12)


@triton.jit
def candidate_objective_kernel(mean_ptr, mean_e_ptr, sign_ptr, C, BC: tl.constexpr):
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < C
    m_e = tl.load(mean_ptr + C + c, mask=mc)
    corr = _corr(tl.load(mean_ptr + c, mask=mc), m_e, tl.load(mean_ptr + 2 * C + c, mask=mc),
                 tl.load(mean_ptr + 3 * C + c, mask=mc))
    tl.store(sign_ptr + c, tl.where(corr >= 0, 1.0, -1.0).to(sign_ptr.dtype.element_ty),
             mask=mc)
    if mean_e_ptr.dtype.element_ty != tl.float64:  # through float32, as torch converts
        m_e = m_e.to(tl.float32)
    tl.store(mean_e_ptr + c, m_e.to(mean_e_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _fold(mean_ptr, sums_ptr, r, c, mc, C, ok, w, n):
    """Row r of the running means with the batch folded in (when ``ok``), stored and returned."""
    old = tl.load(mean_ptr + r * C + c, mask=mc, other=0.0)
    v = tl.load(sums_ptr + r * C + c, mask=mc, other=0.0).to(tl.float64)
    new = tl.where(ok, old + w * (v / n - old), old)
    tl.store(mean_ptr + r * C + c, new, mask=mc)
    return new


@triton.jit
def candidate_update_kernel(mean_ptr, count_ptr, batches_ptr, best_ptr, sums_ptr, n_ptr,
                            better_ptr, C, warmup, momentum, threshold, BC: tl.constexpr):
    """pbp_fast::candidate_update in one program: the batch's sums are read whole (to decide
    whether the batch is finite) before any running mean changes."""
    n = tl.load(n_ptr).to(tl.float64)
    count = tl.load(count_ptr)
    batches = tl.load(batches_ptr)
    bad = 0
    for i0 in range(0, 4 * C, BC):
        i = i0 + tl.arange(0, BC)
        v = tl.load(sums_ptr + i, mask=i < 4 * C, other=0.0).to(tl.float64)
        bad += tl.sum(tl.where(tl.abs(v) <= 1.7976931348623157e308, 0, 1), axis=0)  # NaN, inf
    ok = (bad == 0) & (n > 0)
    n = tl.where(ok, n, 1.0)  # (an empty batch changes nothing; no division by 0)
    w = tl.where(batches < warmup, n / (count + n), 1.0 - momentum)
    score = tl.zeros((BC,), dtype=tl.float64)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = c < C
        m_v = _fold(mean_ptr, sums_ptr, 0, c, mc, C, ok, w, n)
        m_e = _fold(mean_ptr, sums_ptr, 1, c, mc, C, ok, w, n)
        m_ve = _fold(mean_ptr, sums_ptr, 2, c, mc, C, ok, w, n)
        m_ee = _fold(mean_ptr, sums_ptr, 3, c, mc, C, ok, w, n)
        score += tl.where(mc, tl.abs(_corr(m_v, m_e, m_ve, m_ee)), 0.0)
    count = tl.where(ok, count + n, count)  # n is the batch's where ok
    batches = tl.where(ok, batches + 1, batches)
    total = tl.sum(score, axis=0)
    best = tl.load(best_ptr)
    better = (batches >= warmup) & (total > best * (1.0 + threshold))
    tl.store(count_ptr, count)
    tl.store(batches_ptr, batches)
    tl.store(best_ptr, tl.where(better, total, best))
    tl.store(better_ptr, better)
