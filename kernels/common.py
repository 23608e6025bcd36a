"""What the Triton kernels of both op families share: the @triton.jit helpers that address a tile
of output pixels x channels and compute its convolutions, and the launchers' helpers (tile
sizes, precision, vector width, the launch itself).

Every tensor is addressed through its four strides, so one kernel serves NHWC (channels_last,
coalesced along the channel tiles) and NCHW.  A tile's convolutions come from one of three
``MODE``s (:func:`conv_mode`):

    0  depthwise (groups == C_in == C_out): a direct loop over the kernel taps;
    1  pointwise (1x1, groups == 1): a GEMM over the input channels with ``tl.dot``, the main
       conv's and then each dendrite's in turn (each finished before the next starts);
    2  any other conv: the pre-activations were computed by one stacked ATen (cuDNN) convolution
       whose output channel of conv m (0 = main, then the dendrites) and channel c = (g, cl) is
       (g * M + m) * Cg + cl, and the kernel loads them.

Accumulation is float32 whatever the storage dtype (float32, bfloat16, float16); float64
inputs accumulate in float64 (``ACC``).  Per-channel sums over pixels are written per
pixel-tile into a ``partials`` (tiles, rows, C) buffer (ACC) that the launcher reduces with one
deterministic ``sum``: no atomics, no host synchronisation.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from pbp_fast.ops.backend import triton_interpreted
from pbp_fast.ops.layout import conv_out_hw, empty_like_layout, is_channels_last

# -- @triton.jit helpers -----------------------------------------------------------------------
@triton.jit
def aligned(v, VEC: tl.constexpr):
    """v, which the launcher checked to be a multiple of VEC, in a form the compiler can see is
    one (so that channel runs load and store as 16-byte vectors)."""
    return v // VEC * VEC


@triton.jit
def tile(P, HWo, Wo, C, BP: tl.constexpr, BC: tl.constexpr, VEC: tl.constexpr):
    """The program's output pixels p (flattened n, oh, ow) and channels c, with their masks."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mp = p < P
    mc = c < aligned(C, VEC)
    n = (p // HWo).to(tl.int64)
    r = p % HWo
    return c, mp, mc, n, r // Wo, r % Wo


@triton.jit
def offsets(n, c, oh, ow, sn, sc, sh, sw, VEC: tl.constexpr):
    """(pixels, channels) element offsets of a 4-D tensor with strides (sn, sc, sh, sw)."""
    return (n * aligned(sn, VEC) + oh * aligned(sh, VEC) + ow * aligned(sw, VEC))[:, None] \
        + c.to(tl.int64)[None, :] * sc


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b; PREC "upcast" computes in float32 (the CPU interpreter's bfloat16 dot is
    wrong), else it is tl.dot's input_precision."""
    if PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def gemm(x_ptr, w_ptr, n, oh, ow, c, mp, mc, C_in, H, W, sxn, sxc, sxh, sxw, SH, SW, PH, PW,
          BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
          ACC: tl.constexpr, VEC: tl.constexpr):
    """(BP, BC) 1x1 conv of the tile: x's pixel rows times the (C, C_in) weights at w_ptr, in
    steps of BK input channels."""
    ih = oh * SH - PH
    iw = ow * SW - PW
    ok = mp & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    row = n * aligned(sxn, VEC) + ih * aligned(sxh, VEC) + iw * aligned(sxw, VEC)
    ci = aligned(C_in, VEC)
    acc = tl.zeros((BP, BC), ACC)
    for k0 in range(0, C_in, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < ci
        xv = tl.load(x_ptr + row[:, None] + k.to(tl.int64)[None, :] * sxc,
                     mask=ok[:, None] & mk[None, :], other=0.0)
        wv = tl.load(w_ptr + c[None, :] * ci + k[:, None], mask=mk[:, None] & mc[None, :],
                     other=0.0)
        acc = dot(xv, wv, acc, PREC)
    return acc


@triton.jit
def stacked(z_ptr, n, oh, ow, c, m2, Cg, M, m, szn, szc, szh, szw, ACC: tl.constexpr,
             VEC: tl.constexpr):
    """(BP, BC) output of conv m of the M convs stacked in z (mode 2): channel (g*M + m)*Cg + cl
    for c = (g, cl)."""
    return tl.load(z_ptr + offsets(n, ((c // Cg) * M + m) * Cg + c % Cg, oh, ow, szn, szc, szh,
                                    szw, VEC), mask=m2, other=0.0).to(ACC)


@triton.jit
def conv_tile(x_ptr, w_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc,
               C_in, H, W, C, Cg, sxn, sxc, sxh, sxw, szn, szc, szh, szw,
               SH, SW, PH, PW, DH, DW,
               MODE: tl.constexpr, HAS_W: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """(BP, BC) main-conv pre-activation of one tile (no bias) and, in mode 0 only, the
    (DP, BP, BC) dendrite pre-activations (each tap of x feeds all D + 1 convs; rows d >= D are
    zero).  Modes 1 and 2 give the dendrites one at a time (:func:`dendrite_pre`), so that no
    (DP, BP, BC) accumulator lives beside the GEMM."""
    acc = tl.zeros((BP, BC), ACC)
    acc_d = tl.zeros((DP, BP, BC), ACC)
    if MODE == 0:
        d = tl.arange(0, DP)
        md = d < D
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW
        x0 = x_ptr + offsets(n, c, ih0, iw0, sxn, sxc, sxh, sxw, VEC)  # tap (0, 0)
        for i in tl.static_range(KH):
            ih = ih0 + i * DH
            okh = mp & (ih >= 0) & (ih < H)
            for j in tl.static_range(KW):
                iw = iw0 + j * DW
                ok = okh & (iw >= 0) & (iw < W)
                xv = tl.load(x0 + (i * DH * aligned(sxh, VEC) + j * DW * aligned(sxw, VEC)),
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
            acc = gemm(x_ptr, w_ptr, n, oh, ow, c, mp, mc, C_in, H, W, sxn, sxc, sxh, sxw,
                        SH, SW, PH, PW, BP, BC, BK, PREC, ACC, VEC)
        else:
            acc = stacked(z_ptr, n, oh, ow, c, mp[:, None] & mc[None, :], Cg, D + 1, 0,
                           szn, szc, szh, szw, ACC, VEC)
    return acc, acc_d


@triton.jit
def dendrite_pre(k, acc_d, x_ptr, dw_ptr, z_ptr, n, oh, ow, c, mp, mc, C_in, H, W, C, Cg,
                  sxn, sxc, sxh, sxw, szn, szc, szh, szw, SH, SW, PH, PW,
                  MODE: tl.constexpr, HAS_W: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                  ACC: tl.constexpr, VEC: tl.constexpr):
    """(BP, BC) pre-activation of dendrite k (no bias): row k of mode 0's accumulator, a GEMM
    (mode 1) or its conv of the stack (mode 2)."""
    if MODE == 0:
        a = tl.sum(tl.where((tl.arange(0, DP) == k)[:, None, None], acc_d, 0.0), axis=0)
    elif MODE == 1:
        a = gemm(x_ptr, dw_ptr + k * C * C_in, n, oh, ow, c, mp, mc, C_in, H, W,
                  sxn, sxc, sxh, sxw, SH, SW, PH, PW, BP, BC, BK, PREC, ACC, VEC)
    elif HAS_W:  # the stack is main, then the dendrites
        a = stacked(z_ptr, n, oh, ow, c, mp[:, None] & mc[None, :], Cg, D + 1, k + 1,
                     szn, szc, szh, szw, ACC, VEC)
    else:
        a = stacked(z_ptr, n, oh, ow, c, mp[:, None] & mc[None, :], Cg, D, k,
                     szn, szc, szh, szw, ACC, VEC)
    return a



# -- launcher helpers --------------------------------------------------------------------------
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


def pow2(n):
    return max(1, triton.next_power_of_2(n))


def blocks(mode, c, d=0):
    """(channels per program, input channels per GEMM step, warps) for a tile of BP pixels of a
    conv of ``mode`` with ``c`` output channels and ``d`` dendrite tiles held beside it.  Eight
    warps keep each thread at 8-16 tile elements: bench/kernel_resources.py shows that every
    MobileNetV3-Small configuration then compiles for sm_90 without spilling, at <= 160
    registers (four warps with 64-channel tiles spilled up to 5.9 KB a thread).  Pointwise
    GEMM tiles are 64 channels wide unless two or more dendrite tiles live beside them."""
    wide = mode == 1 and d < 2
    return min(64 if wide else 32, max(16, pow2(c))), 32, 8


def precision(x):
    """(tl.dot input precision, accumulator dtype): TF32 where cuDNN may use it, as for
    F.conv2d; float64 stays float64."""
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if triton_interpreted() and x.dtype == torch.bfloat16:
        return dict(PREC="upcast", ACC=acc)
    return dict(PREC="tf32" if tf32 else "ieee", ACC=acc)


def vec(channels, *tensors):
    """Elements per 16-byte access along the channels: the largest power of two that divides
    every count in ``channels`` and every stride (of a dimension longer than 1) but the channel
    stride of the 4-D (N, C, H, W) / 5-D (D, N, C, H, W) ``tensors``; 1 unless all of them are
    channels-last (channel stride 1).  The kernels state it to the compiler (``aligned``)."""
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


def read_x(mode, c, c_in, x):
    """The channel counts and x, for :func:`vec`, when the kernel reads x (modes 0 and 1; in
    mode 2 it reads the stacked conv's output)."""
    return ((c, c_in), x) if mode < 2 else ((c,), None)


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def strides(t):
    return tuple(t.stride()) if t is not None and t.dim() == 4 else (0, 0, 0, 0)


def stack_weights(weights, groups):
    """Stack M convs of one shape (list of (C, Cin/g, kh, kw)) into one grouped conv whose output
    channel (g, m, cl) is (g * M + m) * Cg + cl."""
    w = torch.stack(weights)  # (M, C, Cin/g, kh, kw)
    m, c = w.shape[:2]
    return w.view(m, groups, c // groups, *w.shape[2:]).transpose(0, 1).reshape(
        m * c, *w.shape[2:])


def unstack_grad(gw, d, groups):
    """Inverse of :func:`stack_weights` for a weight gradient: (D, C, Cin/g, kh, kw)."""
    c = gw.shape[0] // d
    return gw.view(groups, d, c // groups, *gw.shape[1:]).transpose(0, 1).reshape(
        d, c, *gw.shape[1:])


def conv_geometry(x, weight_shape, stride, padding, dilation):
    return (*x.shape, *conv_out_hw(x, weight_shape[2:], stride, padding, dilation))


def kernel_op(name, mutates_args=()):
    """``triton_op``: torch.compile decomposes the op into its kernels and sees each of them.
    Under the CPU interpreter, whose kernels cannot be traced, the same function becomes an
    opaque ``custom_op`` (its own fake implementation) so that compiled code stays correct."""
    if not triton_interpreted():
        return triton_op(name, mutates_args=mutates_args)

    def dec(fn):
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op
    return dec


def alloc(shape, like):
    """A new tensor in ``like``'s layout (channels_last or NCHW)."""
    return empty_like_layout(shape, like, is_channels_last(like))



def launch(kernel, grid, *args, **meta):
    """Launch through ``wrap_triton`` (traceable by torch.compile).  The CPU interpreter runs
    kernels eagerly and cannot take fake tensors: while tracing under it, the launch is skipped
    (the outputs' shapes come from the allocations around it)."""
    if triton_interpreted() and any(isinstance(a, Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def partials(pixels, rows, c, x):
    """The kernels' per-tile partial rows: (tiles of BP of the ``pixels`` output pixels, rows,
    C), zeroed (rows a kernel does not need stay 0), in the accumulator dtype of ``x``."""
    return torch.zeros((triton.cdiv(pixels, BP), rows, c), dtype=acc_dtype(x), device=x.device)


def partial_sums(part):
    """Deterministic reduction of the per-tile partial rows (tiles, R, C) -> (R, C), in
    float64."""
    return part.sum(0, dtype=torch.float64)
