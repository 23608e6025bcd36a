"""The candidate's Triton kernels and ops (the math: ``pbp_fast.ops.reference.candidate_*``).

    candidate_kernel             one tile of the candidate's activation v, the per-pixel
                                 dL_c/da and the per-channel sums of (v, e, v e, e e, v v), the bias
                                 and cascade gradients
    candidate_objective_kernel   (mean_e, sign C) from the running means
    candidate_update_kernel      one batch folded into the running means, the best score raised

The ops ``pbp_fast::triton_candidate_{pass,epilogue,objective,update}`` launch them
(candidate_pass: the kernel, plus a cuDNN conv in mode 2, and one cuDNN weight gradient;
candidate_epilogue: the kernel in mode 2 on a pre-activation computed by the caller).  On a
CUDA machine they are also the CUDA kernels of the C++ ops of the same schema (csrc/ops.cpp).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pbp_fast import ops
from pbp_fast.kernels import common
from pbp_fast.kernels.common import (BP, aligned, alloc, blocks, conv_geometry, conv_mode,
                                     conv_tile, kernel_op, offsets, partial_sums, partials, pow2,
                                     precision, read_x, strides, tile, vec)


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
    Partial rows per channel: 0..4 sums of v, e, v e, e e, v v; 5 sum ga (b_c); 6+j sum ga s_j
    (kappa_j), where ga = dL_c/da = -sign (e - mean_e) / n * v (1 - v) is also stored for the
    weight gradient."""
    c, mp, mc, n, oh, ow = tile(P, HWo, Wo, C, BP, BC, VEC)
    m2 = mp[:, None] & mc[None, :]
    acc, _ = conv_tile(x_ptr, w_ptr, w_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C, C,
                        sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW, DH, DW,
                        MODE, True, 0, 1, KH, KW, BP, BC, BK, PREC, ACC, VEC)
    if HAS_B:
        acc += tl.load(b_ptr + c, mask=mc, other=0.0).to(ACC)[None, :]
    j = tl.arange(0, DCP)
    s_all = tl.zeros((DCP, BP, BC), ACC)
    if DC > 0:
        s_all = tl.load(s_ptr + j.to(tl.int64)[:, None, None] * aligned(ssd, VEC)
                        + offsets(n, c, oh, ow, ssn, ssc, ssh, ssw, VEC)[None, :, :],
                        mask=(j < DC)[:, None, None] & m2[None, :, :], other=0.0).to(ACC)
        kap = tl.load(cc_ptr + j[:, None] * C + c[None, :], mask=(j < DC)[:, None] & mc[None, :],
                      other=0.0).to(ACC)
        acc += tl.sum(kap[:, None, :] * s_all, axis=0)
    v = tl.where(m2, tl.sigmoid(acc), 0.0)
    e = tl.load(e_ptr + offsets(n, c, oh, ow, sen, sec, seh, sew, VEC), mask=m2,
                other=0.0).to(ACC)
    mean_e = tl.load(me_ptr + c, mask=mc, other=0.0).to(ACC)
    sign = tl.load(sg_ptr + c, mask=mc, other=0.0).to(ACC)
    ga = tl.where(m2, -(sign * inv_n)[None, :] * (e - mean_e[None, :]) * v * (1.0 - v), 0.0)
    part = part_ptr + tl.program_id(0).to(tl.int64) * (R * C)
    tl.store(part + c, tl.sum(v, axis=0), mask=mc)
    tl.store(part + C + c, tl.sum(e, axis=0), mask=mc)
    tl.store(part + 2 * C + c, tl.sum(v * e, axis=0), mask=mc)
    tl.store(part + 3 * C + c, tl.sum(e * e, axis=0), mask=mc)
    tl.store(part + 4 * C + c, tl.sum(v * v, axis=0), mask=mc)
    tl.store(part + 5 * C + c, tl.sum(ga, axis=0), mask=mc)
    if DC > 0:
        tl.store(part + (6 + j[:, None]) * C + c[None, :], tl.sum(ga[None, :, :] * s_all, axis=1),
                 mask=(j < DC)[:, None] & mc[None, :])
    tl.store(ga_ptr + offsets(n, c, oh, ow, san, sac, sah, saw, VEC),
             ga.to(ga_ptr.dtype.element_ty), mask=m2)


# -- a candidate's running statistics (C <= a few thousand channels: one program) -------------
@triton.jit
def _corr(m_v, m_e, m_ve, m_ee, m_vv, PEARSON: tl.constexpr):
    """C_c from the running means of (v, e, v e, e e, v v) (reference.correlation)."""
    den = tl.maximum(m_ee - m_e * m_e, 0.0) + 1e-12
    if PEARSON:
        den = den * (tl.maximum(m_vv - m_v * m_v, 0.0) + 1e-12)
    return (m_ve - m_v * m_e) / tl.sqrt(den)


@triton.jit
def candidate_objective_kernel(mean_ptr, mean_e_ptr, sign_ptr, C, BC: tl.constexpr):
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = c < C
    m_e = tl.load(mean_ptr + C + c, mask=mc)
    corr = _corr(tl.load(mean_ptr + c, mask=mc), m_e, tl.load(mean_ptr + 2 * C + c, mask=mc),
                 tl.load(mean_ptr + 3 * C + c, mask=mc), m_e, False)
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
                            better_ptr, C, warmup, momentum, threshold, BC: tl.constexpr,
                            PER_CHANNEL: tl.constexpr, PEARSON: tl.constexpr):
    """pbp_fast::candidate_update in one program: the batch's sums are read whole (to decide
    whether the batch is finite) before any running mean changes.  PER_CHANNEL: best_score and
    the decision are (C,), one per channel; else 0-dim, for the sum over channels.  PEARSON:
    C_c is Pearson's r."""
    n = tl.load(n_ptr).to(tl.float64)
    count = tl.load(count_ptr)
    batches = tl.load(batches_ptr)
    bad = 0
    for i0 in range(0, 5 * C, BC):
        i = i0 + tl.arange(0, BC)
        v = tl.load(sums_ptr + i, mask=i < 5 * C, other=0.0).to(tl.float64)
        bad += tl.sum(tl.where(tl.abs(v) <= 1.7976931348623157e308, 0, 1), axis=0)  # NaN, inf
    ok = (bad == 0) & (n > 0)
    n = tl.where(ok, n, 1.0)  # (an empty batch changes nothing; no division by 0)
    w = tl.where(batches < warmup, n / (count + n), 1.0 - momentum)
    count = tl.where(ok, count + n, count)  # n is the batch's where ok
    batches = tl.where(ok, batches + 1, batches)
    warm = batches >= warmup
    score = tl.zeros((BC,), dtype=tl.float64)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = c < C
        m_v = _fold(mean_ptr, sums_ptr, 0, c, mc, C, ok, w, n)
        m_e = _fold(mean_ptr, sums_ptr, 1, c, mc, C, ok, w, n)
        m_ve = _fold(mean_ptr, sums_ptr, 2, c, mc, C, ok, w, n)
        m_ee = _fold(mean_ptr, sums_ptr, 3, c, mc, C, ok, w, n)
        m_vv = _fold(mean_ptr, sums_ptr, 4, c, mc, C, ok, w, n)
        corr = tl.where(mc, tl.abs(_corr(m_v, m_e, m_ve, m_ee, m_vv, PEARSON)), 0.0)
        if PER_CHANNEL:
            best_c = tl.load(best_ptr + c, mask=mc, other=0.0)
            better_c = tl.where(warm, corr > best_c * (1.0 + threshold), False)
            tl.store(best_ptr + c, tl.where(better_c, corr, best_c), mask=mc)
            tl.store(better_ptr + c, better_c, mask=mc)
        else:
            score += corr
    tl.store(count_ptr, count)
    tl.store(batches_ptr, batches)
    if not PER_CHANNEL:
        total = tl.sum(score, axis=0)
        best = tl.load(best_ptr)
        better = warm & (total > best * (1.0 + threshold))
        tl.store(best_ptr, tl.where(better, total, best))
        tl.store(better_ptr, better)


def _launch_pass(x, weight, bias, z, mode, cascade, s, e, mean_e, sign, stride, padding,
                 dilation, ga):
    """candidate_kernel over the output (N, C, Ho, Wo) of ``ga``, which it fills with dL/da;
    returns the float64 sums (6 + D, C).  In mode 2 the kernel reads the conv's output from
    ``z`` (x and weight give only the geometry)."""
    n, c, ho, wo = ga.shape
    dc = 0 if cascade is None else cascade.shape[0]
    r = 6 + dc
    bc, bk, warps = blocks(mode, c, dc)
    part = partials(n * ho * wo, r, c, x)
    sv = s if dc else e.new_empty((1, 1, 1, 1, 1))
    common.launch(candidate_kernel, (part.shape[0], triton.cdiv(c, bc)),
        x, weight, x if bias is None else bias, z, x if cascade is None else cascade, sv, e,
        mean_e, sign, ga, part, n * ho * wo, ho * wo, wo, c, x.shape[1], x.shape[2],
        x.shape[3], 1.0 / (n * ho * wo), *x.stride(), *strides(z), *sv.stride(), *e.stride(),
        *ga.stride(), *stride, *padding, *dilation, MODE=mode, HAS_B=bias is not None, DC=dc,
        DCP=pow2(dc), R=r, KH=weight.shape[2], KW=weight.shape[3], BP=BP, BC=bc, BK=bk,
        **precision(x), VEC=vec(*read_x(mode, c, x.shape[1], x), z, sv if dc else None, e, ga),
        num_warps=warps)
    return partial_sums(part)


@kernel_op("pbp_fast::triton_candidate_pass")
def candidate_pass(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], cascade: Optional[Tensor],
        s: Optional[Tensor], e: Tensor, mean_e: Tensor, sign: Tensor, stride: list[int],
        padding: list[int], dilation: list[int], groups: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, c_in, h, w, ho, wo = conv_geometry(x, weight.shape, stride, padding, dilation)
    mode = conv_mode(c_in, weight.shape, groups)
    z = x.new_empty(0)
    if mode == 2:
        z = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    ga = alloc((n, weight.shape[0], ho, wo), e)
    sums = _launch_pass(x, weight, bias, z, mode, cascade, s, e, mean_e, sign, stride,
                        padding, dilation, ga)
    gw = torch.ops.aten.convolution_backward(ga, x, weight, None, stride, padding, dilation,
                                             False, [0, 0], groups, [False, True, False])[1]
    return (sums[:5].float(), gw.contiguous(), sums[5].to(weight.dtype, copy=True),
            sums[6:].to(weight.dtype, copy=True))


@kernel_op("pbp_fast::triton_candidate_epilogue")
def candidate_epilogue(
        z: Tensor, cascade: Optional[Tensor], s: Optional[Tensor], e: Tensor, mean_e: Tensor,
        sign: Tensor
) -> tuple[Tensor, Tensor]:
    ga = alloc(z.shape, z)
    ones = [1, 1]
    sums = _launch_pass(z, z.new_empty((1, 1, 1, 1)), None, z, 2, cascade, s, e, mean_e, sign,
                        ones, [0, 0], ones, ga)
    return sums, ga


@kernel_op("pbp_fast::triton_candidate_objective")
def candidate_objective(mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    c = mean.shape[1]
    mean_e, sign = mean.new_empty(c, dtype=dtype), mean.new_empty(c, dtype=dtype)
    bc = min(1024, pow2(c))
    common.launch(candidate_objective_kernel, (triton.cdiv(c, bc),), mean, mean_e, sign, c, BC=bc,
            num_warps=4)
    return mean_e, sign


@kernel_op("pbp_fast::triton_candidate_update",
           mutates_args=("mean", "count", "batches", "best_score"))
def candidate_update(mean: Tensor, count: Tensor, batches: Tensor, best_score: Tensor,
                     sums: Tensor, n: Tensor, warmup_batches: int, momentum: float,
                     threshold: float, pearson: bool) -> Tensor:
    c = mean.shape[1]
    better = torch.empty(best_score.shape, dtype=torch.bool, device=mean.device)
    common.launch(candidate_update_kernel, (1,), mean, count, batches, best_score,
                  sums.contiguous(), n, better, c, warmup_batches, momentum, threshold,
                  BC=min(1024, pow2(c)), PER_CHANNEL=best_score.dim() == 1, PEARSON=pearson,
                  num_warps=4)
    return better


if ops.HAVE_C:  # the C++ ops (csrc/ops.cpp) on CUDA tensors run these
    for _name, _op_def in (("candidate_pass", candidate_pass),
                           ("candidate_epilogue", candidate_epilogue),
                           ("candidate_objective", candidate_objective),
                           ("candidate_update", candidate_update)):
        torch.library.register_kernel(f"pbp_fast::{_name}", "cuda", _op_def)
