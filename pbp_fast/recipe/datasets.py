"""Image data sets as decoded uint8 tensors: :class:`ImageDataset`, a seeded stratified
validation split carved from a training set, and the offline digits set of the demo.

Images are kept decoded as one uint8 tensor (N, C, H, W) per split: CIFAR-10 is 150 MB, small
enough to sit in GPU memory, so a training epoch never touches the host (see
:class:`pbp_fast.recipe.data.BatchLoader` and :mod:`pbp_fast.recipe.augment`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["ImageDataset", "DataSplits", "stratified_order", "train_val_split", "digits"]


class ImageDataset(torch.utils.data.Dataset):
    """Decoded images (N, C, H, W) uint8 and labels (N,) int64, with class names and the
    per-channel ``mean`` / ``std`` (in [0, 1] units) used to normalise them.

    Indexing gives ``(image, label)`` like any map-style data set; for training use
    :class:`BatchLoader`, which works on whole batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
                or images.dim() != 4:
            raise TypeError(f"images must be a uint8 tensor (N, C, H, W), got "
                            f"{getattr(images, 'dtype', type(images).__name__)} "
                            f"{tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 \
                or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a 1-d tensor with one entry per image "
                             f"({images.shape[0]}), got {tuple(getattr(labels, 'shape', ()))}")
        self.images = images
        self.labels = labels.long()
        self.classes = tuple(str(c) for c in classes)
        if self.labels.numel() and (int(self.labels.min()) < 0
                                    or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        c = images.shape[1]
        if mean is None or std is None:
            x = images.float() / 255.0
            mean = x.mean(dim=(0, 2, 3)).tolist() if len(x) else [0.5] * c
            std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist() if len(x) > 1 else [0.25] * c
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} entries (one per channel), got "
                             f"{len(mean)} and {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def resized(self, size: int) -> "ImageDataset":
        """The images area-averaged down (or bilinearly up) to ``size`` x ``size``, rounded back
        to uint8; labels, classes and normalisation unchanged."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if tuple(self.images.shape[2:]) == (size, size):
            return self
        x = self.images.float()
        down = size <= min(self.images.shape[2:])
        x = torch.nn.functional.interpolate(x, size=(size, size),
                                            mode="area" if down else "bilinear")
        images = x.round_().clamp_(0, 255).to(torch.uint8)
        return ImageDataset(images, self.labels, self.classes, self.mean, self.std)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, indices) -> "ImageDataset":
        """The images at ``indices``, with the same classes and normalisation."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.images.device)
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.mean, self.std)

    def to(self, device) -> "ImageDataset":
        """The data set with images and labels on ``device``."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes,
                            self.mean, self.std)

    def __repr__(self) -> str:
        return (f"ImageDataset({len(self)} images {tuple(self.image_shape)}, "
                f"{self.num_classes} classes, device={self.device})")


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test data sets."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def stratified_order(labels, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix holds the classes in
    (nearly) their overall proportions: take the first k indices for a stratified sample of k."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    grouped = perm[np.argsort(labels[perm], kind="stable")]       # by class, random within
    _, start, counts = np.unique(labels[grouped], return_index=True, return_counts=True)
    rank = np.arange(len(grouped)) - np.repeat(start, counts)
    position = (rank + rng.random(len(grouped))) / np.repeat(counts, counts)
    return grouped[np.argsort(position, kind="stable")]


def train_val_split(dataset: ImageDataset, val_size: int | float,
                    seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Carve a stratified validation set of ``val_size`` images (an int) or of that fraction of
    the data (a float in (0, 1)) out of ``dataset``; seeded.  Returns ``(train, val)``."""
    n = len(dataset)
    if isinstance(val_size, float) and not isinstance(val_size, bool):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size!r}")
        val_size = int(round(val_size * n))
    if not isinstance(val_size, int) or isinstance(val_size, bool) or not 0 < val_size < n:
        raise ValueError(f"val_size must be an int in [1, {n - 1}] or a fraction, got "
                         f"{val_size!r}")
    order = stratified_order(dataset.labels.cpu().numpy(), seed)
    return dataset.subset(np.sort(order[val_size:])), dataset.subset(np.sort(order[:val_size]))



def digits(size: int = 16, val_fraction: float = 0.2, test_fraction: float = 0.2,
           seed: int = 0) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 grayscale images, 10 classes; shipped inside
    scikit-learn, so no download), upsampled bilinearly to ``size`` x ``size`` and split into
    stratified train / validation / test sets (seeded).  Images are (1, size, size) uint8."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a demo/test dependency
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") \
            from exc
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 0.9:
        raise ValueError(f"val_fraction + test_fraction must leave room for training, got "
                         f"{val_fraction} + {test_fraction}")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)   # (N, 1, 8, 8)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(c) for c in bunch.target_names]
    n = len(labels)
    n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    order = stratified_order(labels.numpy(), seed)
    test_idx, val_idx, train_idx = (np.sort(order[:n_test]), np.sort(order[n_test:n_test + n_val]),
                                    np.sort(order[n_test + n_val:]))
    train = ImageDataset(images[train_idx], labels[train_idx], classes)
    return DataSplits(train, *(ImageDataset(images[i], labels[i], classes, train.mean, train.std)
                               for i in (val_idx, test_idx)))
