"""Data for the recipe: the data sets (:mod:`pbp_fast.recipe.datasets`: containers, splits, the
digits; :mod:`pbp_fast.recipe.cifar10`: CIFAR-10's formats), all importable from here, and
:class:`BatchLoader`, which iterates over a data set that lives on the device in augmented,
normalised batches.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from pbp_fast.recipe.cifar10 import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, cifar10,
                                     default_cache_dir, download_cifar10, encode_jpegs,
                                     load_packed_jpeg, load_python_batches, save_packed_jpeg)
from pbp_fast.recipe.datasets import (DataSplits, ImageDataset, digits, stratified_order,
                                      train_val_split)

__all__ = ["ImageDataset", "DataSplits", "BatchLoader", "cifar10", "digits",
           "train_val_split", "stratified_order", "load_packed_jpeg", "save_packed_jpeg",
           "encode_jpegs", "load_python_batches", "download_cifar10", "default_cache_dir",
           "epoch_seed", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_CLASSES"]


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch, *more)``: each epoch's randomness (and, with
    ``more``, e.g. each rank's) on its own."""
    words = [seed, epoch, *more]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Iterates over an :class:`ImageDataset` in batches of normalised float tensors, entirely on
    the data set's device: index with a (seeded) permutation, apply ``transform`` to the uint8
    batch, convert to float and normalise.

    Randomness (order and augmentation) comes from a generator seeded with ``(seed, epoch)``, so
    an epoch is reproducible on its own: call :meth:`set_epoch` before iterating, as with a
    ``DistributedSampler``.  ``transform(x_uint8, generator) -> x_uint8`` is e.g. a
    :class:`pbp_fast.recipe.augment.TrainTransform`."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 seed: int = 0, channels_last: bool = False, dtype: torch.dtype = torch.float32):
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"batch_size ({batch_size}) is larger than the data set "
                             f"({len(dataset)} images) and drop_last drops every batch")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last, self.transform = shuffle, drop_last, transform
        self.seed, self.channels_last, self.dtype = seed, channels_last, dtype
        self.epoch = 0
        dev = dataset.device
        self._mean = torch.tensor(dataset.mean, device=dev).view(1, -1, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(dataset.std, device=dev).view(1, -1, 1, 1) * 255.0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float."""
        x = ((x.float() - self._mean) * self._inv_std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def generator(self, *more: int) -> torch.Generator:
        """A generator on the data's device seeded with ``(seed, epoch, *more)``."""
        gen = torch.Generator(device=self.dataset.device)
        return gen.manual_seed(epoch_seed(self.seed, self.epoch, *more))

    def epoch_order(self) -> tuple[torch.Generator, torch.Tensor | None]:
        """The epoch's generator, seeded with ``(seed, epoch)``, and the permutation drawn from
        it first (None without ``shuffle``: the data set's order)."""
        gen = self.generator()
        order = torch.randperm(len(self.dataset), generator=gen, device=self.dataset.device) \
            if self.shuffle else None
        return gen, order

    def batches(self, indices, generator: torch.Generator):
        """The normalised ``(x, y)`` of each batch of ``indices`` (index tensors or slices),
        augmented by ``transform`` with ``generator``."""
        for idx in indices:
            x, y = self.dataset.images[idx], self.dataset.labels[idx]
            if self.transform is not None:
                x = self.transform(x, generator)
            yield self.normalize(x), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen, order = self.epoch_order()
        b = self.batch_size
        spans = [slice(i * b, min((i + 1) * b, len(self.dataset))) for i in range(len(self))]
        yield from self.batches(spans if order is None else [order[s] for s in spans], gen)
