"""Argument checks of the public ops: each bad argument raises a ``TypeError`` or ``ValueError``
that names it and says what was expected."""
from __future__ import annotations

import torch

from pbp_fast.ops.layout import conv_out_size

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def pair(v, name):
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def tensor(t, name, dim=None, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def shape(t, name, expected):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_kind(x, named):
    """Every tensor of ``named`` ((name, tensor or None) pairs) has x's dtype and device."""
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors of a "
                            f"unit must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def input_x(x):
    tensor(x, "x", 4)
    if x.dtype not in FLOATS:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("x must be contiguous in NCHW or channels_last layout; call "
                         ".contiguous() or .contiguous(memory_format=torch.channels_last)")


def conv_args(x, c_out, kernel, stride, padding, dilation, groups):
    """``(stride, padding, dilation, groups)`` as lists of two ints and an int, checked against
    x and the weight's ``kernel`` = (Cin/groups, kh, kw)."""
    stride, padding, dilation = (pair(stride, "stride"), pair(padding, "padding"),
                                 pair(dilation, "dilation"))
    if not isinstance(groups, int) or groups < 1:
        raise TypeError(f"groups must be a positive int, got {groups!r}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    c_in = x.shape[1]
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide both the input channels ({c_in}) and the "
                         f"output channels ({c_out})")
    if kernel[0] != c_in // groups:
        raise ValueError(f"the weight's second dimension must be in_channels / groups = "
                         f"{c_in // groups}, got {kernel[0]}")
    for i, (size, k) in enumerate(zip(x.shape[2:], kernel[1:])):
        if conv_out_size(size, k, stride[i], padding[i], dilation[i]) < 1:
            raise ValueError(f"the input's spatial size {tuple(x.shape[2:])} is too small for "
                             f"kernel {tuple(kernel[1:])} with padding {padding} and dilation "
                             f"{dilation}")
    return stride, padding, dilation, groups


def state(t, name, dims):
    """A candidate's running state: a contiguous float64 tensor of ``dims`` (None: any size)."""
    tensor(t, name)
    if (t.dim() != len(dims) or any(s is not None and s != d for s, d in zip(dims, t.shape))
            or t.dtype != torch.float64 or not t.is_contiguous()):
        want = tuple("C" if s is None else s for s in dims)
        raise ValueError(f"{name} must be a contiguous float64 tensor of shape {want}, got "
                         f"{t.dtype} {tuple(t.shape)}")
