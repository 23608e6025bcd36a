"""Batched data augmentation on uint8 image tensors, on whatever device the batch lives on.

Every function takes a whole batch ``x`` (N, C, H, W) uint8 and an explicit ``torch.Generator``
on the batch's device, draws per-sample parameters from it, and returns a new uint8 batch; the
same generator state gives the same result.  There is no per-image Python loop, so the
augmentation of a CIFAR-10 batch costs a handful of kernel launches on a GPU.

- :func:`random_crop_flip`: pad-and-crop plus horizontal flip (the CIFAR standard).
- :class:`RandAugment` and :class:`TrivialAugmentWide`: the operations, magnitude ranges and
  sampling of torchvision's transforms of those names (Cubuk et al., 2020; Muller & Hutter,
  2021), re-implemented as batched tensor ops (nearest interpolation, zero fill).
- :func:`mixup_cutmix`: batch-level MixUp / CutMix with label smoothing, producing soft targets.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip", "RandAugment", "TrivialAugmentWide", "build_auto_augment",
           "AUTO_AUGMENT", "TrainTransform", "mixup_cutmix", "OPS"]


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.uint8:
        raise TypeError(f"x must be a uint8 tensor of shape (N, C, H, W), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def _rand(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=x.device)


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip_prob: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels, crop a random window of the original size, and flip it
    horizontally with probability ``flip_prob``, independently per image (one gather)."""
    _check_batch(x)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
    n, _, h, w = x.shape
    if n == 0 or (padding == 0 and flip_prob == 0.0):
        return x.clone()
    xp = F.pad(x, (padding,) * 4) if padding else x
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    flip = _rand(n, x, generator) < flip_prob
    rows = oy[:, None] + torch.arange(h, device=x.device)                      # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]        # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]    # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Photometric operations: uint8 batch and per-sample magnitude (N,) -> uint8 batch.  Blends
# truncate to uint8 as torchvision does for integer images.
# ----------------------------------------------------------------------------------------------

def _per_sample(m: torch.Tensor) -> torch.Tensor:
    return m.view(-1, 1, 1, 1)


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * img.float() + (1.0 - f) * other).clamp(0, 255).to(torch.uint8)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, (N, 1, H, W) float, truncated as torchvision does for uint8."""
    if img.shape[1] == 1:
        return img.float()
    r, g, b = img.float().unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).float().unsqueeze(1)


def brightness(img, m):
    return _blend(img, torch.zeros((), device=img.device), 1.0 + m)


def color(img, m):
    if img.shape[1] == 1:
        return img.clone()
    return _blend(img, _grayscale(img), 1.0 + m)


def contrast(img, m):
    mean = _grayscale(img).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(img, mean, 1.0 + m)


def sharpness(img, m):
    """Blend with a smoothed image (3x3 kernel, centre weight 5); border pixels stay."""
    c = img.shape[1]
    if img.shape[2] <= 2 or img.shape[3] <= 2:
        return img.clone()
    kernel = torch.ones(c, 1, 3, 3, device=img.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = F.conv2d(img.float(), kernel / 13.0, groups=c).round()
    degenerate = img.float().clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(img, degenerate, 1.0 + m)


def posterize(img, bits):
    shift = (8 - bits.long()).clamp(0, 8).view(-1, 1, 1, 1)
    mask = torch.bitwise_left_shift(torch.bitwise_right_shift(torch.full_like(shift, 255), shift),
                                    shift)
    return (img.long() & mask).to(torch.uint8)


def solarize(img, threshold):
    return torch.where(img.float() >= _per_sample(threshold), 255 - img, img)


def autocontrast(img, m=None):
    x = img.float()
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp_min(1e-6))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp(0, 255).to(torch.uint8)


def equalize(img, m=None):
    """Histogram equalisation per image and channel (torchvision's lookup-table rule)."""
    n, c, h, w = img.shape
    flat = img.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, device=img.device, dtype=torch.long)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(1, keepdim=True))            # count of the top value
    step = (h * w - last) // 255                                   # (NC, 1)
    safe = step.clamp_min(1)
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.to(torch.uint8).view(n, c, h, w)


# ----------------------------------------------------------------------------------------------
# Geometric operations: one inverse affine map per sample, applied with a single grid_sample.
# Matrices act on pixel-centre coordinates measured from the image centre.
# ----------------------------------------------------------------------------------------------

def _affine_matrices(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 2, 3) inverse maps (output -> input pixel) for the geometric op codes in ``op``."""
    n = op.shape[0]
    theta = torch.zeros(n, 2, 3, device=m.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    code = {name: i for i, name in enumerate(OPS)}
    # Shears about the top-left corner (torchvision: center=[0, 0]).
    sx, sy = op == code["ShearX"], op == code["ShearY"]
    theta[:, 0, 1] = torch.where(sx, m, theta[:, 0, 1])
    theta[:, 0, 2] = torch.where(sx, m * h / 2, theta[:, 0, 2])
    theta[:, 1, 0] = torch.where(sy, m, theta[:, 1, 0])
    theta[:, 1, 2] = torch.where(sy, m * w / 2, theta[:, 1, 2])
    tx, ty = op == code["TranslateX"], op == code["TranslateY"]
    theta[:, 0, 2] = torch.where(tx, -m.trunc(), theta[:, 0, 2])
    theta[:, 1, 2] = torch.where(ty, -m.trunc(), theta[:, 1, 2])
    rot = op == code["Rotate"]
    rad = torch.deg2rad(torch.where(rot, m, torch.zeros_like(m)))
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta[:, 0, 0] = torch.where(rot, cos, theta[:, 0, 0])
    theta[:, 0, 1] = torch.where(rot, -sin, theta[:, 0, 1])   # counter-clockwise, as torchvision
    theta[:, 1, 0] = torch.where(rot, sin, theta[:, 1, 0])
    theta[:, 1, 1] = torch.where(rot, cos, theta[:, 1, 1])
    return theta


def _warp(img: torch.Tensor, theta_px: torch.Tensor) -> torch.Tensor:
    """Apply pixel-space inverse maps with nearest sampling and zero fill."""
    _, _, h, w = img.shape
    half = torch.tensor([w / 2.0, h / 2.0], device=img.device)
    theta = theta_px.clone()
    theta[:, :, :2] = theta_px[:, :, :2] * half[None, None, :] / half[None, :, None]
    theta[:, :, 2] = theta_px[:, :, 2] / half[None, :]
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img.float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out.round().to(torch.uint8)


# Operation table: name -> (function or None for geometric, signed magnitude?).  Order as
# torchvision's RandAugment / TrivialAugmentWide augmentation spaces.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_PHOTOMETRIC = {"Brightness": brightness, "Color": color, "Contrast": contrast,
                "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize,
                "AutoContrast": autocontrast, "Equalize": equalize}
_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
           "Contrast", "Sharpness")


def _magnitude_table(num_bins: int, h: int, w: int, wide: bool) -> torch.Tensor:
    """(len(OPS), num_bins) magnitudes per op and bin, as torchvision's augmentation spaces."""
    b = num_bins

    def lin(a, z):
        return torch.linspace(a, z, b)

    zero = torch.zeros(b)
    if wide:
        shear, tx, ty, rot, enh = lin(0, 0.99), lin(0, 32.0), lin(0, 32.0), lin(0, 135), \
            lin(0, 0.99)
        post = 8 - (torch.arange(b) / ((b - 1) / 6)).round()
    else:
        shear, tx, ty, rot, enh = lin(0, 0.3), lin(0, 150 / 331 * w), lin(0, 150 / 331 * h), \
            lin(0, 30), lin(0, 0.9)
        post = 8 - (torch.arange(b) / ((b - 1) / 4)).round()
    table = {"Identity": zero, "ShearX": shear, "ShearY": shear, "TranslateX": tx,
             "TranslateY": ty, "Rotate": rot, "Brightness": enh, "Color": enh, "Contrast": enh,
             "Sharpness": enh, "Posterize": post.float(), "Solarize": lin(255.0, 0.0),
             "AutoContrast": zero, "Equalize": zero}
    return torch.stack([table[name] for name in OPS])


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply op ``OPS[op[i]]`` with magnitude ``magnitude[i]`` to image i, batched by op."""
    _check_batch(x)
    out = x.clone()
    geo = torch.zeros_like(op, dtype=torch.bool)
    for name in _GEOMETRIC:
        geo |= op == OPS.index(name)
    idx = geo.nonzero().squeeze(1)
    if idx.numel():
        theta = _affine_matrices(op[idx], magnitude[idx], x.shape[2], x.shape[3])
        out[idx] = _warp(x[idx], theta)
    for name, fn in _PHOTOMETRIC.items():
        idx = (op == OPS.index(name)).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = fn(x[idx], magnitude[idx])
    return out


class _AutoAugment:
    """Shared sampling: ``num_ops`` rounds; each round picks one op per image uniformly, a
    magnitude bin (fixed or uniform) and a random sign for signed ops."""

    wide = False

    def __init__(self, num_ops: int, magnitude: int | None, num_magnitude_bins: int):
        if not isinstance(num_ops, int) or num_ops < 1:
            raise ValueError(f"num_ops must be a positive int, got {num_ops!r}")
        if not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
            raise ValueError(f"num_magnitude_bins must be an int >= 2, got "
                             f"{num_magnitude_bins!r}")
        if magnitude is not None and not (isinstance(magnitude, int)
                                          and 0 <= magnitude < num_magnitude_bins):
            raise ValueError(f"magnitude must be an int in [0, {num_magnitude_bins - 1}], got "
                             f"{magnitude!r}")
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, \
            num_magnitude_bins
        self._signed = torch.tensor([name in _SIGNED for name in OPS])

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        n, dev = x.shape[0], x.device
        table = _magnitude_table(self.num_magnitude_bins, x.shape[2], x.shape[3],
                                 self.wide).to(dev)
        signed = self._signed.to(dev)
        for _ in range(self.num_ops):
            op = torch.randint(0, len(OPS), (n,), generator=generator, device=dev)
            if self.magnitude is None:
                bins = torch.randint(0, self.num_magnitude_bins, (n,), generator=generator,
                                     device=dev)
            else:
                bins = torch.full((n,), self.magnitude, device=dev, dtype=torch.long)
            negate = (torch.rand(n, generator=generator, device=dev) < 0.5) & signed[op]
            mag = table[op, bins]
            x = apply_ops(x, op, torch.where(negate, -mag, mag))
        return x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"num_magnitude_bins={self.num_magnitude_bins})")


class RandAugment(_AutoAugment):
    """RandAugment: ``num_ops`` random ops per image at a fixed ``magnitude`` (of 31 bins)."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        super().__init__(num_ops, magnitude, num_magnitude_bins)


class TrivialAugmentWide(_AutoAugment):
    """TrivialAugment (wide space): one random op per image at a uniformly random magnitude."""

    wide = True

    def __init__(self, num_magnitude_bins: int = 31):
        super().__init__(1, None, num_magnitude_bins)


AUTO_AUGMENT = ("none", "ra", "ta_wide")


def build_auto_augment(name: str, magnitude: int = 9, num_ops: int = 2):
    """``"ra"`` (RandAugment), ``"ta_wide"`` (TrivialAugmentWide) or ``"none"`` (None);
    torchvision's ``--auto-augment`` names."""
    if name == "ra":
        return RandAugment(num_ops=num_ops, magnitude=magnitude)
    if name == "ta_wide":
        return TrivialAugmentWide()
    if name in ("none", None):
        return None
    raise ValueError(f"auto_augment must be one of {AUTO_AUGMENT}, got {name!r}")


class TrainTransform:
    """The training-time batch transform: pad-and-crop + flip, then an optional auto-augment."""

    def __init__(self, padding: int = 4, flip_prob: float = 0.5, auto_augment: str = "none",
                 magnitude: int = 9, num_ops: int = 2):
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        self.padding, self.flip_prob = padding, flip_prob
        self.auto_augment = build_auto_augment(auto_augment, magnitude, num_ops)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop_flip(x, self.padding, self.flip_prob, generator)
        if self.auto_augment is not None:
            x = self.auto_augment(x, generator)
        return x

    def __repr__(self) -> str:
        return (f"TrainTransform(padding={self.padding}, flip_prob={self.flip_prob}, "
                f"auto_augment={self.auto_augment!r})")


# ----------------------------------------------------------------------------------------------
# MixUp / CutMix
# ----------------------------------------------------------------------------------------------

def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot float targets with label smoothing: 1 - s + s/K on the class, s/K elsewhere."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device)
    return out.scatter_(1, target.view(-1, 1), 1.0 - smoothing + off)


def mixup_cutmix(x: torch.Tensor, target: torch.Tensor, num_classes: int, *,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 label_smoothing: float = 0.0, switch_prob: float = 0.5,
                 generator: torch.Generator | None = None):
    """Batch-level MixUp (Zhang et al., 2018) or CutMix (Yun et al., 2019) with the batch rolled
    by one, as torchvision's reference ``RandomMixUp`` / ``RandomCutMix`` and timm's ``Mixup``
    (mode "batch").  With both alphas positive, CutMix is chosen with probability
    ``switch_prob``.  ``x`` is a float batch; returns ``(x_mixed, soft_targets)``.

    The per-batch scalars (choice, lambda, box) come from ``generator``, which must be a CPU
    generator (or None for the global one)."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha!r}, "
                         f"{cutmix_alpha!r}")
    y = smooth_one_hot(target, num_classes, label_smoothing)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return x, y
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    x_rolled, y_rolled = x.roll(1, 0), y.roll(1, 0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x_rolled[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + x_rolled * (1.0 - lam)
    return x, y * lam + y_rolled * (1.0 - lam)
