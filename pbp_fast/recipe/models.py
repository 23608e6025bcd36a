"""MobileNetV2 and MobileNetV3-Small / -Large for 32x32 inputs (CIFAR-10).

The blocks, channel widths, activations, squeeze-and-excitation, BatchNorm settings, dropout and
weight initialisation follow torchvision's ImageNet models exactly; only the strides change.  An
ImageNet MobileNet downsamples 32x; on a 32x32 image that leaves a 1x1 map before the last
stages.  The CIFAR variants here run the stem and the first stride-2 stage at stride 1, so the
network downsamples 8x and the last stages see 4x4 maps (the usual CIFAR adaptation of MobileNets).

    >>> import pbp_fast as pbp
    >>> model = pbp.models.mobilenet_v3_small(width_mult=1.0, num_classes=10)

``width_mult`` scales every channel count (rounded to a multiple of ``round_nearest``, 8 as in
torchvision); ``in_channels`` lets grayscale data in without copying it to three channels.

:func:`mobilenet_tiny` is not a published architecture: three MobileNetV3 bottlenecks, a
deliberately small network for tiny inputs and CPU demonstrations (``pbp-fast demo``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["MobileNetV2", "MobileNetV3", "mobilenet_v2", "mobilenet_v3_small",
           "mobilenet_v3_large", "mobilenet_tiny", "MODELS", "create_model"]


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``min_value`` (default
    ``divisor``) and never more than 10 % below ``value`` (the rule of the MobileNet papers)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, "same" padding; torchvision's
    ``Conv2dNormActivation``.  Children are named ``0`` (conv), ``1`` (BN), ``2`` (activation)
    so that a conversion pass sees the conv + BN pair in order."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act: Callable[..., nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            norm(c_out)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(avgpool(x))))), with 1x1 convolutions as the two FCs
    (torchvision's ``SqueezeExcitation`` as configured by MobileNetV3)."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation: Kaiming-normal (fan-out) convs, unit BN, N(0, 0.01)
    linear layers, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _check_common(width_mult, num_classes, in_channels, dropout, round_nearest):
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("round_nearest", round_nearest)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


# ----------------------------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------------------------

class InvertedResidualV2(nn.Module):
    """MobileNetV2 block: [1x1 expand, ReLU6] -> 3x3 depthwise, ReLU6 -> 1x1 project (linear),
    with a residual connection when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int,
                 norm: Callable[[int], nn.Module]):
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(c_in, hidden, 1, norm=norm, act=nn.ReLU6))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden, norm=norm, act=nn.ReLU6),
                   nn.Conv2d(hidden, c_out, 1, bias=False), norm(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expand ratio t, channels c, repeats n, stride s); the CIFAR change: stage 2 has s = 1.
_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 inputs: stem and stage 2 at stride 1."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.2, round_nearest: int = 8):
        super().__init__()
        _check_common(width_mult, num_classes, in_channels, dropout, round_nearest)
        norm = nn.BatchNorm2d
        c_in = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNAct(in_channels, c_in, 3, 1, norm=norm, act=nn.ReLU6)]
        for t, c, n, s in _V2_SETTING:
            c_out = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidualV2(c_in, c_out, s if i == 0 else 1, t, norm))
                c_in = c_out
        features.append(ConvBNAct(c_in, self.last_channel, 1, norm=norm, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------------------------------
# MobileNetV3
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockConfig:
    """One MobileNetV3 bottleneck, in unscaled channels (torchvision's
    ``InvertedResidualConfig``)."""

    c_in: int
    kernel: int
    expanded: int
    c_out: int
    use_se: bool
    use_hs: bool
    stride: int

    def scaled(self, width_mult: float, divisor: int) -> "BlockConfig":
        def adjust(c):
            return make_divisible(c * width_mult, divisor)
        return BlockConfig(adjust(self.c_in), self.kernel, adjust(self.expanded),
                           adjust(self.c_out), self.use_se, self.use_hs, self.stride)


class InvertedResidualV3(nn.Module):
    """MobileNetV3 bottleneck: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project (linear),
    ReLU or hardswish, residual when the shape is kept."""

    def __init__(self, cfg: BlockConfig, norm: Callable[[int], nn.Module], divisor: int):
        super().__init__()
        self.use_res_connect = cfg.stride == 1 and cfg.c_in == cfg.c_out
        act = nn.Hardswish if cfg.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.c_in:
            layers.append(ConvBNAct(cfg.c_in, cfg.expanded, 1, norm=norm, act=act))
        layers.append(ConvBNAct(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride,
                                groups=cfg.expanded, norm=norm, act=act))
        if cfg.use_se:
            layers.append(SqueezeExcitation(cfg.expanded,
                                            make_divisible(cfg.expanded // 4, divisor)))
        layers.append(ConvBNAct(cfg.expanded, cfg.c_out, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


# Tables from the MobileNetV3 paper / torchvision; "RE" = ReLU, "HS" = hardswish.  The CIFAR change
# is marked: the first stride-2 bottleneck runs at stride 1 (and the stem too, in MobileNetV3).
def _bneck(c_in, k, exp, c_out, se, act, s):
    return BlockConfig(c_in, k, exp, c_out, se, act == "HS", s)


_V3_SMALL = (
    _bneck(16, 3, 16, 16, True, "RE", 1),  # ImageNet: stride 2
    _bneck(16, 3, 72, 24, False, "RE", 2),
    _bneck(24, 3, 88, 24, False, "RE", 1),
    _bneck(24, 5, 96, 40, True, "HS", 2),
    _bneck(40, 5, 240, 40, True, "HS", 1),
    _bneck(40, 5, 240, 40, True, "HS", 1),
    _bneck(40, 5, 120, 48, True, "HS", 1),
    _bneck(48, 5, 144, 48, True, "HS", 1),
    _bneck(48, 5, 288, 96, True, "HS", 2),
    _bneck(96, 5, 576, 96, True, "HS", 1),
    _bneck(96, 5, 576, 96, True, "HS", 1),
)
_V3_LARGE = (
    _bneck(16, 3, 16, 16, False, "RE", 1),
    _bneck(16, 3, 64, 24, False, "RE", 1),  # ImageNet: stride 2
    _bneck(24, 3, 72, 24, False, "RE", 1),
    _bneck(24, 5, 72, 40, True, "RE", 2),
    _bneck(40, 5, 120, 40, True, "RE", 1),
    _bneck(40, 5, 120, 40, True, "RE", 1),
    _bneck(40, 3, 240, 80, False, "HS", 2),
    _bneck(80, 3, 200, 80, False, "HS", 1),
    _bneck(80, 3, 184, 80, False, "HS", 1),
    _bneck(80, 3, 184, 80, False, "HS", 1),
    _bneck(80, 3, 480, 112, True, "HS", 1),
    _bneck(112, 3, 672, 112, True, "HS", 1),
    _bneck(112, 5, 672, 160, True, "HS", 2),
    _bneck(160, 5, 960, 160, True, "HS", 1),
    _bneck(160, 5, 960, 160, True, "HS", 1),
)


class MobileNetV3(nn.Module):
    """MobileNetV3 (Howard et al., 2019) for 32x32 inputs: stem at stride 1 (ImageNet: 2)."""

    def __init__(self, setting: tuple[BlockConfig, ...], last_channel: int,
                 width_mult: float = 1.0, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.2, round_nearest: int = 8, bn_momentum: float = 0.01):
        super().__init__()
        _check_common(width_mult, num_classes, in_channels, dropout, round_nearest)
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")

        # BatchNorm as torchvision's MobileNetV3: eps 1e-3, momentum 0.01.
        def norm(c):
            return nn.BatchNorm2d(c, eps=0.001, momentum=bn_momentum)
        blocks = [b.scaled(width_mult, round_nearest) for b in setting]
        features: list[nn.Module] = [
            ConvBNAct(in_channels, blocks[0].c_in, 3, 1, norm=norm, act=nn.Hardswish)]
        features += [InvertedResidualV3(b, norm, round_nearest) for b in blocks]
        last_conv = 6 * blocks[-1].c_out
        features.append(ConvBNAct(blocks[-1].c_out, last_conv, 1, norm=norm, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.last_channel = make_divisible(last_channel * width_mult, round_nearest)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, self.last_channel), nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True), nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 10, **kwargs) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs.  ``kwargs``: ``in_channels`` (3), ``dropout`` (0.2),
    ``round_nearest`` (8)."""
    return MobileNetV2(width_mult=width_mult, num_classes=num_classes, **kwargs)


def mobilenet_v3_small(width_mult: float = 1.0, num_classes: int = 10, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small for 32x32 inputs.  ``kwargs``: ``in_channels`` (3), ``dropout`` (0.2),
    ``round_nearest`` (8), ``bn_momentum`` (0.01)."""
    return MobileNetV3(_V3_SMALL, 1024, width_mult=width_mult, num_classes=num_classes, **kwargs)


def mobilenet_v3_large(width_mult: float = 1.0, num_classes: int = 10, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large for 32x32 inputs.  ``kwargs``: ``in_channels`` (3), ``dropout`` (0.2),
    ``round_nearest`` (8), ``bn_momentum`` (0.01)."""
    return MobileNetV3(_V3_LARGE, 1280, width_mult=width_mult, num_classes=num_classes, **kwargs)


# Three bottlenecks (downsampling 4x) for 8-32 px inputs.
_TINY = (
    _bneck(8, 3, 16, 8, False, "RE", 2),
    _bneck(8, 3, 32, 16, True, "RE", 2),
    _bneck(16, 3, 48, 16, True, "HS", 1),
)


def mobilenet_tiny(width_mult: float = 1.0, num_classes: int = 10, **kwargs) -> MobileNetV3:
    """A deliberately small MobileNetV3-style network (not a published architecture): a stem,
    three bottlenecks (inverted residuals, SE, hardswish) downsampling 4x, the V3 head.  Channels
    round to multiples of 4 and BatchNorm uses momentum 0.1, so that it trains in a few hundred
    steps.  ``kwargs``: ``in_channels`` (3), ``dropout`` (0.2), ``round_nearest`` (4),
    ``bn_momentum`` (0.1)."""
    kwargs = {"round_nearest": 4, "bn_momentum": 0.1, **kwargs}
    return MobileNetV3(_TINY, 64, width_mult=width_mult, num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_tiny": mobilenet_tiny,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """A model of :data:`MODELS` by name, e.g. ``create_model("mobilenet_v2", width_mult=0.5)``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)
