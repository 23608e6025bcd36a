"""The Triton backend's ops: launchers of kernels/dendritic.py registered with
``torch.library.triton_op``, so ``torch.compile`` sees every kernel (no graph break) and a step
built from them is CUDA-graph capturable (no host synchronisation, no data-dependent branch).

They have the schemas of the C++ ops (csrc/ops.cpp) under the names ``pbp_fast::triton_*``; on a
CUDA machine they are also registered as the CUDA kernels of those C++ ops.  Under
``TRITON_INTERPRET=1`` they run on CPU tensors (the CI tests).

What each op launches:
    dendritic_conv2d_fwd   one fused kernel (modes 0/1), or one stacked cuDNN conv + the kernel
    dendritic_conv2d_bwd   cuDNN for dL/dx and dW of the main conv; one kernel for everything of
                           the dendrites but their weights; one stacked cuDNN weight gradient
    candidate_pass         one fused kernel (+ a cuDNN conv in mode 2); one cuDNN weight gradient
    candidate_objective    one kernel
    candidate_update       one kernel (one program), in place
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from pbp_fast import ops
from pbp_fast.kernels.dendritic import (candidate_kernel, candidate_objective_kernel,
                                        candidate_update_kernel, dendritic_bwd_kernel,
                                        dendritic_fwd_kernel)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BP = 64  # output pixels per program


def conv_mode(c_in, weight_shape, groups):
    """0 depthwise direct, 1 pointwise GEMM, 2 stacked cuDNN conv + fused epilogue.
    ``PBP_FAST_GPU_CONV=cudnn`` takes mode 2 for every conv (for comparing the two)."""
    c_out, c_in_g, kh, kw = weight_shape
    if os.environ.get("PBP_FAST_GPU_CONV") == "cudnn":
        return 2
    if groups == c_in == c_out and c_in_g == 1:
        return 0
    if groups == 1 and kh == kw == 1:
        return 1
    return 2


def _pow2(n):
    return max(1, triton.next_power_of_2(n))


def _blocks(mode, c, d=0):
    """(channels per program, input channels per GEMM step, warps) for a tile of BP pixels of a
    conv of ``mode`` with ``c`` output channels and ``d`` dendrite tiles held beside it.  Eight
    warps keep each thread at 8-16 tile elements: bench/kernel_resources.py shows that every
    MobileNetV3-Small configuration then compiles for sm_90 without spilling, at <= 160
    registers (four warps with 64-channel tiles spilled up to 5.9 KB a thread).  Pointwise
    GEMM tiles are 64 channels wide unless two or more dendrite tiles live beside them."""
    wide = mode == 1 and d < 2
    return min(64 if wide else 32, max(16, _pow2(c))), 32, 8


def _precision(x):
    """(tl.dot input precision, accumulator dtype): TF32 where cuDNN may use it, as for
    F.conv2d; float64 stays float64."""
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if ops.triton_interpreted() and x.dtype == torch.bfloat16:
        return dict(PREC="upcast", ACC=acc)
    return dict(PREC="tf32" if tf32 else "ieee", ACC=acc)


def _vec(channels, *tensors):
    """Elements per 16-byte access along the channels: the largest power of two that divides
    every count in ``channels`` and every stride (of a dimension longer than 1) but the channel
    stride of the 4-D (N, C, H, W) / 5-D (D, N, C, H, W) ``tensors``; 1 unless all of them are
    channels-last (channel stride 1).  The kernels state it to the compiler (``_aligned``)."""
    tensors = [t for t in tensors if t is not None and t.dim() >= 4]
    g = 0
    for t in tensors:
        cdim = t.dim() - 3
        if t.stride(cdim) != 1:
            return 1
        g = math.gcd(g, *(st for i, (st, size) in enumerate(zip(t.stride(), t.shape))
                          if i != cdim and size > 1))
    g = math.gcd(g, *channels)
    v = 16 // tensors[0].element_size()
    while g % v:
        v //= 2
    return v


def _read_x(mode, c, c_in, x):
    """The channel counts and x, for :func:`_vec`, when the kernel reads x (modes 0 and 1; in
    mode 2 it reads the stacked conv's output)."""
    return ((c, c_in), x) if mode < 2 else ((c,), None)


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _strides(t):
    return tuple(t.stride()) if t is not None and t.dim() == 4 else (0, 0, 0, 0)


def _stack_weights(weights, groups):
    """Stack M convs of one shape (list of (C, Cin/g, kh, kw)) into one grouped conv whose output
    channel (g, m, cl) is (g * M + m) * Cg + cl."""
    w = torch.stack(weights)  # (M, C, Cin/g, kh, kw)
    m, c = w.shape[:2]
    return w.view(m, groups, c // groups, *w.shape[2:]).transpose(0, 1).reshape(
        m * c, *w.shape[2:])


def _unstack_grad(gw, d, groups):
    """Inverse of :func:`_stack_weights` for a weight gradient: (D, C, Cin/g, kh, kw)."""
    c = gw.shape[0] // d
    return gw.view(groups, d, c // groups, *gw.shape[1:]).transpose(0, 1).reshape(
        d, c, *gw.shape[1:])


def _conv_geometry(x, weight_shape, stride, padding, dilation):
    return (*x.shape, *ops.conv_out_hw(x, weight_shape[2:], stride, padding, dilation))


def _op(name, mutates_args=()):
    """``triton_op``: torch.compile decomposes the op into its kernels and sees each of them.
    Under the CPU interpreter, whose kernels cannot be traced, the same function becomes an
    opaque ``custom_op`` (its own fake implementation) so that compiled code stays correct."""
    if not ops.triton_interpreted():
        return triton_op(name, mutates_args=mutates_args)

    def dec(fn):
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op
    return dec


def _alloc(shape, like):
    """A new tensor in ``like``'s layout (channels_last or NCHW)."""
    return ops._empty_like_layout(shape, like, ops.is_channels_last(like))


@_op("pbp_fast::triton_dendritic_conv2d_fwd")
def dendritic_conv2d_fwd(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], base: Optional[Tensor],
        d_weight: Tensor, d_bias: Optional[Tensor], d_scale: Tensor, d_cascade: Optional[Tensor],
        stride: list[int], padding: list[int], dilation: list[int], groups: int,
        save_s: bool) -> tuple[Tensor, Tensor]:
    d, c = d_weight.shape[:2]
    wshape = d_weight.shape[1:]
    n, c_in, h, w, ho, wo = _conv_geometry(x, wshape, stride, padding, dilation)
    mode = conv_mode(c_in, wshape, groups)
    y = _alloc((n, c, ho, wo), x)
    s = ops._stacked_like(d, y) if save_s else x.new_empty(0)
    z = x.new_empty(0)
    if mode == 2 and (weight is not None or d):
        z = torch.nn.functional.conv2d(
            x, _stack_weights(([weight] if weight is not None else []) + list(d_weight.unbind(0)),
                              groups), None, stride, padding, dilation, groups)
    bc, bk, warps = _blocks(mode, c, d)
    ss = s.stride() if save_s and d else (0,) * 5
    _launch(dendritic_fwd_kernel, (triton.cdiv(n * ho * wo, BP), triton.cdiv(c, bc)),
        x, x if weight is None else weight, x if bias is None else bias,
        x if base is None else base, d_weight, x if d_bias is None else d_bias, d_scale,
        x if d_cascade is None else d_cascade, z, y, s if save_s and d else y,
        n * ho * wo, ho * wo, wo, c, c_in, h, w, c // groups,
        *x.stride(), *_strides(z), *y.stride(), *_strides(base), *ss,
        *stride, *padding, *dilation,
        MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, HAS_BASE=base is not None,
        HAS_DB=d_bias is not None, HAS_DC=d_cascade is not None and d > 1,
        SAVE_S=save_s and d > 0, D=d, DP=_pow2(d), DS=_pow2(d - 1), KH=wshape[2], KW=wshape[3],
        BP=BP, BC=bc, BK=bk, **_precision(x), VEC=_vec(*_read_x(mode, c, c_in, x), z, y, base, s),
        num_warps=warps)
    return y, s


def _launch(kernel, grid, *args, **meta):
    """Launch through ``wrap_triton`` (traceable by torch.compile).  The CPU interpreter runs
    kernels eagerly and cannot take fake tensors: while tracing under it, the launch is skipped
    (the outputs' shapes come from the allocations around it)."""
    if ops.triton_interpreted() and any(isinstance(a, Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _partials(pixels, rows, c, x):
    """The kernels' per-tile partial rows: (tiles of BP of the ``pixels`` output pixels, rows,
    C), zeroed (rows a kernel does not need stay 0), in the accumulator dtype of ``x``."""
    return torch.zeros((triton.cdiv(pixels, BP), rows, c), dtype=_acc_dtype(x), device=x.device)


def _partial_sums(part):
    """Deterministic reduction of the per-tile partial rows (tiles, R, C) -> (R, C), in
    float64."""
    return part.sum(0, dtype=torch.float64)


@_op("pbp_fast::triton_dendritic_conv2d_bwd")
def dendritic_conv2d_bwd(
        grad_y: Tensor, x: Tensor, weight: Optional[Tensor], d_weight: Tensor, d_scale: Tensor,
        d_cascade: Optional[Tensor], s: Tensor, stride: list[int], padding: list[int],
        dilation: list[int], groups: int, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_dw, need_db, need_ds, need_dc = output_mask
    d, c = d_weight.shape[:2]
    n, c_in, h, w, ho, wo = _conv_geometry(x, d_weight.shape[1:], stride, padding, dilation)
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
    bc, _, warps = _blocks(0, c)
    part = _partials(n * ho * wo, r, c, x)
    ga = _alloc((n, d * c, ho, wo), grad_y) if need_ga else None
    sv = s if dk else grad_y.new_empty((1, 1, 1, 1, 1))
    _launch(dendritic_bwd_kernel, (part.shape[0], triton.cdiv(c, bc)),
        grad_y, sv, d_scale, d_scale if d_cascade is None else d_cascade,
        grad_y if ga is None else ga, part, n * ho * wo, ho * wo, wo, c, c // groups,
        *grad_y.stride(), *sv.stride(), *_strides(ga), HAS_DC=d_cascade is not None and dk > 1,
        NEED_GA=need_ga, D=dk, DP=_pow2(dk), R=r, BP=BP, BC=bc, ACC=_precision(x)["ACC"],
        VEC=_vec((c,), grad_y, s, ga), num_warps=warps)
    sums = _partial_sums(part).to(d_scale.dtype)
    if dk < d:  # rows of zeros for the dendrites' (unrequested) sums
        sums = torch.cat([sums, sums.new_zeros((2 * d + d * d, c))])
    gdw = None  # (the neuron phase, whose dendrite weights are frozen, asks for none)
    if need_dw:
        gdw = d_weight.new_zeros(d_weight.shape) if not dk else _unstack_grad(
            torch.ops.aten.convolution_backward(
                ga, x, _stack_weights(list(d_weight.unbind(0)), groups), None, stride, padding,
                dilation, False, [0, 0], groups, [False, True, False])[1], d, groups)
    grads = (gx, gw, sums[0] if weight is not None else None, gdw, sums[1 + d:1 + 2 * d],
             sums[1:1 + d], sums[1 + 2 * d:].view(d, d, c))
    # unrequested gradients are distinct empty tensors (outputs may not alias each other);
    # grad_x has x's layout, the parameters' gradients are contiguous (as the fakes say)
    return tuple(g.clone(memory_format=torch.preserve_format if i == 0 else
                         torch.contiguous_format) if need and g is not None else x.new_empty(0)
                 for i, (need, g) in enumerate(zip(output_mask, grads)))


@_op("pbp_fast::triton_candidate_pass")
def candidate_pass(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], cascade: Optional[Tensor],
        s: Optional[Tensor], e: Tensor, mean_e: Tensor, sign: Tensor, stride: list[int],
        padding: list[int], dilation: list[int], groups: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = weight.shape[0]
    dc = 0 if cascade is None else cascade.shape[0]
    n, c_in, h, w, ho, wo = _conv_geometry(x, weight.shape, stride, padding, dilation)
    mode = conv_mode(c_in, weight.shape, groups)
    z = x.new_empty(0)
    if mode == 2:
        z = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    r = 5 + dc
    bc, bk, warps = _blocks(mode, c, dc)
    part = _partials(n * ho * wo, r, c, x)
    ga = _alloc((n, c, ho, wo), e)
    sv = s if dc else e.new_empty((1, 1, 1, 1, 1))
    _launch(candidate_kernel, (part.shape[0], triton.cdiv(c, bc)),
        x, weight, x if bias is None else bias, z, x if cascade is None else cascade, sv, e,
        mean_e, sign, ga, part, n * ho * wo, ho * wo, wo, c, c_in, h, w, 1.0 / (n * ho * wo),
        *x.stride(), *_strides(z), *sv.stride(), *e.stride(), *ga.stride(),
        *stride, *padding, *dilation, MODE=mode, HAS_B=bias is not None, DC=dc, DCP=_pow2(dc),
        R=r, KH=weight.shape[2], KW=weight.shape[3], BP=BP, BC=bc, BK=bk,
        **_precision(x), VEC=_vec(*_read_x(mode, c, c_in, x), z, sv if dc else None, e, ga),
        num_warps=warps)
    sums = _partial_sums(part)
    gw = torch.ops.aten.convolution_backward(ga, x, weight, None, stride, padding, dilation,
                                             False, [0, 0], groups, [False, True, False])[1]
    return (sums[:4].float(), gw.contiguous(), sums[4].to(weight.dtype, copy=True),
            sums[5:].to(weight.dtype, copy=True))


@_op("pbp_fast::triton_candidate_objective")
def candidate_objective(mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    c = mean.shape[1]
    mean_e, sign = mean.new_empty(c, dtype=dtype), mean.new_empty(c, dtype=dtype)
    bc = min(1024, _pow2(c))
    _launch(candidate_objective_kernel, (triton.cdiv(c, bc),), mean, mean_e, sign, c, BC=bc,
            num_warps=4)
    return mean_e, sign


@_op("pbp_fast::triton_candidate_update", mutates_args=("mean", "count", "batches", "best_score"))
def candidate_update(mean: Tensor, count: Tensor, batches: Tensor, best_score: Tensor,
                     sums: Tensor, n: Tensor, warmup_batches: int, momentum: float,
                     threshold: float) -> Tensor:
    c = mean.shape[1]
    better = torch.empty((), dtype=torch.bool, device=mean.device)
    _launch(candidate_update_kernel, (1,), mean, count, batches, best_score, sums.contiguous(),
            n, better, c, warmup_batches, momentum, threshold, BC=min(1024, _pow2(c)),
            num_warps=4)
    return better


ops.register("triton_", fakes=False)
if ops.HAVE_C:  # the C++ ops (csrc/ops.cpp) on CUDA tensors run these
    for _name, _op_def in (("dendritic_conv2d_fwd", dendritic_conv2d_fwd),
                           ("dendritic_conv2d_bwd", dendritic_conv2d_bwd),
                           ("candidate_pass", candidate_pass),
                           ("candidate_objective", candidate_objective),
                           ("candidate_update", candidate_update)):
        torch.library.register_kernel(f"pbp_fast::{_name}", "cuda", _op_def)
