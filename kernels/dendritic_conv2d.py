"""The dendritic conv's Triton kernels and ops (the math:
``pbp_fast.ops.reference.dendritic_conv2d``).

    dendritic_fwd_kernel   one tile of output pixels x channels of the main conv and all D
                           dendrites, finished in registers: y and (to save) the activations s
    dendritic_bwd_kernel   the perforated backward's dendrite part: per-pixel dL/da_k and the
                           per-channel sums of the gradients of alpha, b_k and kappa

The ops ``pbp_fast::triton_dendritic_conv2d_{fwd,bwd}`` (``torch.library.triton_op``: torch.compile
sees every kernel; a step built from them is CUDA-graph capturable) launch them:

    dendritic_conv2d_fwd   one fused kernel (modes 0/1), or one stacked cuDNN conv + the kernel
    dendritic_conv2d_bwd   cuDNN for dL/dx and dW of the main conv; one kernel for everything of
                           the dendrites but their weights; one stacked cuDNN weight gradient

On a CUDA machine they are also the CUDA kernels of the C++ ops of the same schema
(csrc/ops.cpp).  Under ``TRITON_INTERPRET=1`` they run on CPU tensors (the CI tests).
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
                                     conv_tile, dendrite_pre, kernel_op, offsets, partial_sums,
                                     partials, pow2, precision, read_x, stack_weights, strides,
                                     tile, unstack_grad, vec)
from pbp_fast.ops.layout import stacked_like


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
    c, mp, mc, n, oh, ow = tile(P, HWo, Wo, C, BP, BC, VEC)
    m2 = mp[:, None] & mc[None, :]
    acc, acc_d = conv_tile(x_ptr, w_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C, Cg,
                            sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW, DH, DW,
                            MODE, HAS_W, D, DP, KH, KW, BP, BC, BK, PREC, ACC, VEC)
    y = acc
    if HAS_B:
        y += tl.load(b_ptr + c, mask=mc, other=0.0).to(ACC)[None, :]
    if HAS_BASE:
        y += tl.load(base_ptr + offsets(n, c, oh, ow, sbn, sbc, sbh, sbw, VEC), mask=m2,
                     other=0.0).to(ACC)
    j = tl.arange(0, DS)
    s_all = tl.zeros((DS, BP, BC), ACC)
    s_off = offsets(n, c, oh, ow, ssn, ssc, ssh, ssw, VEC)
    for k in tl.static_range(D):
        a = dendrite_pre(k, acc_d, x_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C,
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
            tl.store(s_ptr + k * aligned(ssd, VEC) + s_off, s.to(s_ptr.dtype.element_ty), mask=m2)
    tl.store(y_ptr + offsets(n, c, oh, ow, syn, syc, syh, syw, VEC), y.to(y_ptr.dtype.element_ty),
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
    c, mp, mc, n, oh, ow = tile(P, HWo, Wo, C, BP, BC, VEC)
    m2 = mp[:, None] & mc[None, :]
    d = tl.arange(0, DP)
    md = d < D
    gv = tl.load(g_ptr + offsets(n, c, oh, ow, sgn, sgc, sgh, sgw, VEC), mask=m2,
                 other=0.0).to(ACC)
    s_all = tl.load(s_ptr + d.to(tl.int64)[:, None, None] * aligned(ssd, VEC)
                    + offsets(n, c, oh, ow, ssn, ssc, ssh, ssw, VEC)[None, :, :],
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
            tl.store(ga_ptr + offsets(n, (grp * D + k) * Cg + cl, oh, ow, san, sac, sah, saw,
                                       VEC), ga.to(ga_ptr.dtype.element_ty), mask=m2)


@kernel_op("pbp_fast::triton_dendritic_conv2d_fwd")
def dendritic_conv2d_fwd(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], base: Optional[Tensor],
        d_weight: Tensor, d_bias: Optional[Tensor], d_scale: Tensor, d_cascade: Optional[Tensor],
        stride: list[int], padding: list[int], dilation: list[int], groups: int,
        save_s: bool) -> tuple[Tensor, Tensor]:
    d, c = d_weight.shape[:2]
    wshape = d_weight.shape[1:]
    n, c_in, h, w, ho, wo = conv_geometry(x, wshape, stride, padding, dilation)
    mode = conv_mode(c_in, wshape, groups)
    y = alloc((n, c, ho, wo), x)
    s = stacked_like(d, y) if save_s else x.new_empty(0)
    z = x.new_empty(0)
    if mode == 2 and (weight is not None or d):
        z = torch.nn.functional.conv2d(
            x, stack_weights(([weight] if weight is not None else []) + list(d_weight.unbind(0)),
                             groups), None, stride, padding, dilation, groups)
    bc, bk, warps = blocks(mode, c, d)
    ss = s.stride() if save_s and d else (0,) * 5
    common.launch(dendritic_fwd_kernel, (triton.cdiv(n * ho * wo, BP), triton.cdiv(c, bc)),
        x, x if weight is None else weight, x if bias is None else bias,
        x if base is None else base, d_weight, x if d_bias is None else d_bias, d_scale,
        x if d_cascade is None else d_cascade, z, y, s if save_s and d else y,
        n * ho * wo, ho * wo, wo, c, c_in, h, w, c // groups,
        *x.stride(), *strides(z), *y.stride(), *strides(base), *ss,
        *stride, *padding, *dilation,
        MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, HAS_BASE=base is not None,
        HAS_DB=d_bias is not None, HAS_DC=d_cascade is not None and d > 1,
        SAVE_S=save_s and d > 0, D=d, DP=pow2(d), DS=pow2(d - 1), KH=wshape[2], KW=wshape[3],
        BP=BP, BC=bc, BK=bk, **precision(x), VEC=vec(*read_x(mode, c, c_in, x), z, y, base, s),
        num_warps=warps)
    return y, s


@kernel_op("pbp_fast::triton_dendritic_conv2d_bwd")
def dendritic_conv2d_bwd(
        grad_y: Tensor, x: Tensor, weight: Optional[Tensor], d_weight: Tensor, d_scale: Tensor,
        d_cascade: Optional[Tensor], s: Tensor, stride: list[int], padding: list[int],
        dilation: list[int], groups: int, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_dw, need_db, need_ds, need_dc = output_mask
    d, c = d_weight.shape[:2]
    n, c_in, h, w, ho, wo = conv_geometry(x, d_weight.shape[1:], stride, padding, dilation)
    gx = gw = None
    if weight is not None and (need_x or need_w):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad_y, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_x, need_w, False])
    # without the forward's activations (no dendrite parameter needed a gradient) only the
    # main conv's gradients are wanted: the kernel then sums no dendrite
    dk = d if s.dim() == 5 else 0
    need_ga = dk > 0 and (need_dw or need_db or need_dc)
    r = 1 + 2 * dk + dk * dk
    bc, _, warps = blocks(0, c)
    part = partials(n * ho * wo, r, c, x)
    ga = alloc((n, d * c, ho, wo), grad_y) if need_ga else None
    sv = s if dk else grad_y.new_empty((1, 1, 1, 1, 1))
    common.launch(dendritic_bwd_kernel, (part.shape[0], triton.cdiv(c, bc)),
        grad_y, sv, d_scale, d_scale if d_cascade is None else d_cascade,
        grad_y if ga is None else ga, part, n * ho * wo, ho * wo, wo, c, c // groups,
        *grad_y.stride(), *sv.stride(), *strides(ga), HAS_DC=d_cascade is not None and dk > 1,
        NEED_GA=need_ga, D=dk, DP=pow2(dk), R=r, BP=BP, BC=bc, ACC=precision(x)["ACC"],
        VEC=vec((c,), grad_y, s, ga), num_warps=warps)
    sums = partial_sums(part).to(d_scale.dtype)
    if dk < d:  # rows of zeros for the dendrites' (unrequested) sums
        sums = torch.cat([sums, sums.new_zeros((2 * d + d * d, c))])
    gdw = None  # (the neuron phase, whose dendrite weights are frozen, asks for none)
    if need_dw:
        gdw = d_weight.new_zeros(d_weight.shape) if not dk else unstack_grad(
            torch.ops.aten.convolution_backward(
                ga, x, stack_weights(list(d_weight.unbind(0)), groups), None, stride, padding,
                dilation, False, [0, 0], groups, [False, True, False])[1], d, groups)
    grads = (gx, gw, sums[0] if weight is not None else None, gdw, sums[1 + d:1 + 2 * d],
             sums[1:1 + d], sums[1 + 2 * d:].view(d, d, c))
    # unrequested gradients are distinct empty tensors (outputs may not alias each other);
    # grad_x has x's layout, the parameters' gradients are contiguous (as the fakes say)
    return tuple(g.clone(memory_format=torch.preserve_format if i == 0 else
                         torch.contiguous_format) if need and g is not None else x.new_empty(0)
                 for i, (need, g) in enumerate(zip(output_mask, grads)))


ops.register("triton_", fakes=False)  # the autograd formula, shared with the C++ op
if ops.HAVE_C:  # the C++ ops (csrc/ops.cpp) on CUDA tensors run these
    torch.library.register_kernel("pbp_fast::dendritic_conv2d_fwd", "cuda", dendritic_conv2d_fwd)
    torch.library.register_kernel("pbp_fast::dendritic_conv2d_bwd", "cuda", dendritic_conv2d_bwd)
