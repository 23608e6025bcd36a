"""The two dendritic units a model is converted to: :class:`DendriticConv2d` (an ``nn.Conv2d`` and
its ``nn.BatchNorm2d``) and :class:`DendriticLinear` (an ``nn.Linear`` and its
``nn.BatchNorm1d``, computed as a 1x1 conv).  Everything else is :class:`DendriticUnit`'s."""
from __future__ import annotations

import torch
from torch import nn

from pbp_fast.core.unit import DendriticUnit

__all__ = ["DendriticConv2d", "DendriticLinear"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class DendriticConv2d(DendriticUnit):
    """A dendritic unit around an ``nn.Conv2d`` (any groups) and an optional ``nn.BatchNorm2d``
    applied to its output.  The original modules are kept as ``.conv`` and ``.bn``."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        if bn is not None and (not isinstance(bn, nn.BatchNorm2d)
                               or bn.num_features != conv.out_channels):
            raise ValueError(f"bn must be an nn.BatchNorm2d with num_features = "
                             f"conv.out_channels = {conv.out_channels}, got {bn!r}")
        padding = conv.padding
        if isinstance(padding, str):
            padding = _same_padding(conv) if padding == "same" else (0, 0)
        kw = dict(stride=_pair(conv.stride), padding=_pair(padding),
                  dilation=_pair(conv.dilation), groups=conv.groups)
        super().__init__(("conv", conv), bn, kw)

    def _main(self, x):
        z = self.conv(x)
        return z if self.bn is None else self.bn(z)

    def main_weight_bias(self):
        return self.conv.weight, self.conv.bias

    def _to_4d(self, x, z):
        if x.dim() == 3:
            raise ValueError("DendriticConv2d needs a batched 4-D input (N, C, H, W)")
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        return x, z

    def _from_4d(self, y, z, x=None):
        return y


def _same_padding(conv):
    pads = []
    for k, d in zip(_pair(conv.kernel_size), _pair(conv.dilation)):
        if (d * (k - 1)) % 2:
            raise ValueError(f"conv padding='same' with kernel {conv.kernel_size} and dilation "
                             f"{conv.dilation} pads asymmetrically, which the fused op does not "
                             f"support")
        pads.append(d * (k - 1) // 2)
    return tuple(pads)


class DendriticLinear(DendriticUnit):
    """A dendritic unit around an ``nn.Linear`` and an optional ``nn.BatchNorm1d`` on its output,
    computed as a 1x1 conv over all leading dimensions.  Kept as ``.linear`` and ``.bn``."""

    def __init__(self, linear: nn.Linear, bn: nn.BatchNorm1d | None = None):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if bn is not None and (not isinstance(bn, nn.BatchNorm1d)
                               or bn.num_features != linear.out_features):
            raise ValueError(f"bn must be an nn.BatchNorm1d with num_features = "
                             f"linear.out_features = {linear.out_features}, got {bn!r}")
        super().__init__(("linear", linear), bn,
                         dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1))

    def _main(self, x):
        z = self.linear(x)
        return z if self.bn is None else self.bn(z)

    def main_weight_bias(self):
        w = self.linear.weight
        return w.view(w.shape[0], w.shape[1], 1, 1), self.linear.bias

    def _to_4d(self, x, z):
        c_in = self.linear.in_features
        return x.reshape(-1, c_in, 1, 1), None if z is None else z.reshape(-1, self.out_channels,
                                                                             1, 1)

    def _from_4d(self, y, z, x=None):
        shape = z.shape if z is not None else tuple(x.shape[:-1]) + (self.out_channels,)
        return y.reshape(shape)
