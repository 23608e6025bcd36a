"""Shapes and memory layouts shared by every backend (the fake implementations here, the C++
kernels' rule in csrc/cpu/common.h, the Triton launchers in kernels/).

A tensor is NHWC when it is channels_last-contiguous and not also NCHW-contiguous (ambiguous
shapes, e.g. C = 1 or H = W = 1, count as NCHW).  Outputs take the layout of the input ``x``;
a stack of D per-dendrite activations (D, N, C, H, W) has that layout in every slice.
"""
from __future__ import annotations

import torch

__all__ = ["is_channels_last", "conv_out_size", "conv_out_hw", "conv_out_shape",
           "empty_like_layout", "stacked_like"]


def is_channels_last(t: torch.Tensor) -> bool:
    """The layout rule of every kernel: NHWC when ``t`` is channels_last-contiguous and not also
    NCHW-contiguous."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous()


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a conv along one spatial dimension."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv_out_hw(x, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a conv of the (N, C, H, W) ``x`` with a kernel of spatial size ``kernel_hw``."""
    return tuple(conv_out_size(x.shape[2 + i], kernel_hw[i], stride[i], padding[i], dilation[i])
                 for i in range(2))


def conv_out_shape(x, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, Cout, Ho, Wo) of a conv of ``x`` with a (Cout, Cin/g, kh, kw) weight."""
    return (x.shape[0], weight_shape[0]) + conv_out_hw(x, weight_shape[-2:], stride, padding,
                                                       dilation)


def empty_like_layout(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, NHWC or NCHW."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return like.new_empty(shape).contiguous(memory_format=fmt)


def stacked_like(d: int, y: torch.Tensor) -> torch.Tensor:
    """An uninitialised (d, *y.shape) tensor each of whose slices has ``y``'s layout."""
    if is_channels_last(y):
        n, c, h, w = y.shape
        return y.new_empty((d, n, h, w, c)).permute(0, 1, 4, 2, 3)
    return y.new_empty((d,) + tuple(y.shape))
