"""Each rank's share of the training and evaluation batches (see the package's docstring)."""
from __future__ import annotations

import torch

from pbp_fast.distributed.group import rank, world_size

__all__ = ["ShardedLoader", "shard"]


class ShardedLoader:
    """This rank's share of a :class:`pbp_fast.recipe.data.BatchLoader` (see :func:`shard`)."""

    def __init__(self, loader, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        n, b = len(loader.dataset), loader.batch_size
        if loader.drop_last and n < b * world_size:
            raise ValueError(f"the global batch ({world_size} ranks x {b}) is larger than the "
                             f"data set ({n} images) and drop_last drops every batch")
        self.loader, self.rank, self.world_size = loader, rank, world_size

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        n, b, w = len(self.dataset), self.batch_size, self.world_size
        if self.loader.drop_last:
            return n // (b * w)
        return -(-len(range(self.rank, n, w)) // b)

    def __iter__(self):
        ld, ds = self.loader, self.dataset
        b, w, r = ld.batch_size, self.world_size, self.rank
        _, order = ld.epoch_order()  # the single-process loader's order
        if order is None:
            order = torch.arange(len(ds), device=ds.device)
        if ld.drop_last:  # lockstep: global batch i is order[i w b : (i + 1) w b]
            batches = [order[(i * w + r) * b:(i * w + r + 1) * b] for i in range(len(self))]
        else:  # every image exactly once: rank r takes order[r::w]
            batches = order[r::w].split(b)
        yield from ld.batches(batches, ld.generator(r + 1))


def shard(loader, *, group=None, ranks: tuple[int, int] | None = None):
    """This rank's share of a :class:`pbp_fast.recipe.data.BatchLoader` (whose ``batch_size`` is
    then per rank, as in the torchvision and timm reference scripts).  The order is the one
    permutation per epoch of the single-process loader (seeded by ``(seed, epoch)``, the same
    on every rank); augmentation draws from a generator seeded by ``(seed, epoch, rank)``.

    - ``drop_last=True`` (training): global batch i is ``order[i*W*B : (i+1)*W*B]`` and rank r
      takes its r-th slice of B, so every rank runs the same number of steps, and W ranks see
      the batches one process with batch W*B would.
    - ``drop_last=False`` (evaluation): rank r takes ``order[r::W]``, every image exactly once;
      ranks may run different numbers of batches (at least one each when the set has W images),
      so nothing may communicate per batch (a DistributedDataParallel module under no_grad does
      so only at its first forward); sum the results with :func:`all_reduce_sum`
      (``len(loader.dataset)`` is still the whole set).

    ``ranks`` = (rank, world size) overrides the process group's.  With one rank the loader is
    returned as it is."""
    r, w = ranks if ranks is not None else (rank(group), world_size(group))
    return loader if w == 1 else ShardedLoader(loader, r, w)
