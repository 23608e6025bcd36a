"""Perforated Backpropagation under ``torch.distributed``: data-parallel training (DDP, torchrun;
NCCL on GPUs, gloo on CPUs) that makes the same decisions as one process on the whole batch.

    device = distributed.init("auto")          # from torchrun's environment; cuda:LOCAL_RANK
    net = distributed.wrap(model)              # after building / loading, and on every
                                               # decision.restructured (then rebuild the optimizer)

What stays identical on every rank, and how:

- Neuron phase: ``wrap`` returns ``DistributedDataParallel(model)`` over the trainable
  parameters (the main layers and the newest alpha), so DDP averages their gradients.
- Dendrite phase: everything but the candidates is frozen and the candidates' gradients come
  from the units' candidate passes in the backward, not from the loss's gradient, so DDP's
  reduction does not apply: ``wrap`` returns the model itself and attaches a
  :class:`CandidateSync` to its units.  Each unit's backward hands
  its batch sums (v, e, v e, e e per channel), its position count and its candidate gradients to
  it; at the end of the backward pass one all-reduce combines those of all units and ranks, and
  every unit applies the same update (running statistics, ``.grad``, snapshot) on every rank.
  The objective is DDP's, the mean of the ranks' losses, so a unit's error is its local
  dL/dy divided by the world size: with equal shards the statistics and gradients are those of
  one process on the whole batch.
- Every ``wrap`` checks that the ranks hold the same structure and broadcasts rank 0's
  parameters and buffers (fresh candidates are drawn from each rank's generator).
- The controller checks, once per epoch, that every rank passed the same validation score:
  all-reduce the metrics (:func:`all_reduce_sum`) before ``add_validation_score``.

Checkpoints hold nothing per rank: write them on rank 0 (:func:`save`) and load them on any
number of ranks.  ``docs/distributed.md`` shows the launch lines.
"""
from __future__ import annotations

import copy
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.nn.parallel import DistributedDataParallel

from pbp_fast.nn import DendriticUnit

__all__ = ["init", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main",
           "barrier", "all_reduce_sum", "broadcast_buffers", "check_agree", "save", "wrap",
           "unwrap", "shard", "ShardedLoader", "CandidateSync"]


# -- the process group ---------------------------------------------------------------------------
def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main(group=None) -> bool:
    """Rank 0: the process that writes files and logs."""
    return rank(group) == 0


def _active(group=None) -> bool:
    return world_size(group) > 1


def init(device: str | torch.device = "auto", backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and return this process's device.

    ``device``: "auto" (CUDA when available), "cuda" or "cpu".  On CUDA each process takes
    ``cuda:LOCAL_RANK`` and the backend is NCCL; on the CPU it is gloo (``backend`` overrides).
    Without torchrun's variables (a plain single process) nothing is initialised and the device
    is returned as it would be for one process.  When the group exists already it is kept."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {str(device)!r} but CUDA is not available here")
    if not (_launched() or is_initialized()):
        return dev
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank() >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK is {local_rank()} but only "
                                 f"{torch.cuda.device_count()} CUDA devices are visible: start "
                                 f"at most that many processes per node (torchrun "
                                 f"--nproc_per_node)")
            dev = torch.device("cuda", local_rank())
        elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError(f"device {str(dev)!r} names one GPU for every rank; pass 'cuda' "
                             f"(or 'auto'): each rank takes cuda:LOCAL_RANK")
        torch.cuda.set_device(dev)
    if not is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    return dev


def shutdown() -> None:
    """Leave the process group (at the end of a run that called :func:`init`)."""
    if is_initialized():
        dist.destroy_process_group()


def _comm_device(group=None) -> torch.device:
    """Where tensors must live for a collective of this group's backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- collectives ---------------------------------------------------------------------------------
def barrier(group=None) -> None:
    if _active(group):
        dist.barrier(group)


def all_reduce_sum(*tensors: torch.Tensor, group=None):
    """Sum each tensor over the ranks, in place (no host synchronisation); returns the tensor, or
    a tuple of them.  One process: returned unchanged.  E.g. the summed loss and the number of
    correct predictions of each rank's share of the validation set."""
    if _active(group):
        for t in tensors:
            dist.all_reduce(t, group=group)
    return tensors[0] if len(tensors) == 1 else tensors


def _broadcast(tensors: list[torch.Tensor], group=None) -> None:
    """Overwrite ``tensors`` with rank 0's values: one broadcast per (device, dtype)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    kinds: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.device, t.dtype), []).append(t)
    for ts in kinds.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.broadcast(flat, src, group=group)
        for t, v in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(v.view_as(t))


def broadcast_buffers(model: nn.Module, group=None) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics: each rank's last training
    batch updated its own), e.g. before validation, so that every rank evaluates, snapshots and
    checkpoints the same model."""
    if _active(group):
        _broadcast([b for b in unwrap(model).buffers()], group)


def check_agree(values, what: str, group=None) -> None:
    """Raise on every rank (no rank is left waiting) unless all ranks passed the same
    ``values`` (numbers)."""
    if not _active(group):
        return
    mine = torch.tensor([float(v) for v in values], dtype=torch.float64,
                        device=_comm_device(group))
    every = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = [t.tolist() for t in every]
    if any(v != every[0] for v in every):
        raise RuntimeError(f"the ranks disagree on {what}: {every} (one row per rank)")


def save(obj, path, group=None) -> None:
    """``torch.save`` on rank 0 only, atomically (a temporary file, then a rename).  Checkpoints
    hold nothing per rank, so they load on any number of ranks."""
    if is_main(group):
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)


# -- the model ------------------------------------------------------------------------------------
def unwrap(net: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or ``net`` itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def _check_same_structure(model: nn.Module, group) -> None:
    """Raise on every rank unless all ranks hold the same parameter and buffer names, shapes,
    dtypes and requires_grad flags (e.g. a rank that missed a restructure)."""
    layout = [(n, tuple(t.shape), str(t.dtype), t.requires_grad) for n, t in
              list(model.named_parameters()) + list(model.named_buffers())]
    crc = zlib.crc32(repr(layout).encode())
    try:
        check_agree([crc, len(layout)], "the model's structure", group)
    except RuntimeError as err:
        raise RuntimeError(f"{err}: every rank must build the same model and apply the same PB "
                           f"decisions before pbp_fast.distributed.wrap") from None


def wrap(model: nn.Module, *, group=None, **ddp_kwargs) -> nn.Module:
    """Prepare ``model`` (converted with :func:`pbp_fast.convert` or not) for data-parallel
    training in its current PB phase and return the module to call in the training loop.

    Every rank calls it after building the model, after loading a checkpoint, and whenever
    ``decision.restructured`` (then rebuild the optimizer over ``pb.parameters()``, as with one
    process).  It checks that the ranks hold the same structure, broadcasts rank 0's parameters
    and buffers, attaches a :class:`CandidateSync` to the dendritic units and returns
    ``DistributedDataParallel(model, **ddp_kwargs)`` when parameters train through autograd (the
    neuron phase, or a model without units), else the model itself (the dendrite phase).
    ``model`` may be a previous return value.  One process: the model, unchanged."""
    model = unwrap(model)
    units = [m for m in model.modules() if isinstance(m, DendriticUnit)]
    if not _active(group):
        for u in units:
            u.candidate_sync = None
        return model
    _check_same_structure(model, group)  # first: a collective, so every rank raises alike
    candidates = {id(p) for u in units for p in u.candidate_parameters()}
    trainable = [n for n, p in model.named_parameters()
                 if p.requires_grad and id(p) not in candidates]
    if candidates and trainable:
        raise ValueError(f"in the dendrite phase only the candidates train (PerforatedBackprop "
                         f"freezes everything else), but {trainable[:4]} require grad too")
    _broadcast([p.detach() for p in model.parameters()] + list(model.buffers()), group)
    sync = CandidateSync(units, group)
    for u in units:
        u.candidate_sync = sync
    if not trainable:  # the dendrite phase: the candidates' gradients come from the units
        return model
    return DistributedDataParallel(model, process_group=group, init_sync=False, **ddp_kwargs)


class CandidateSync:
    """The candidates of one wrapped model, kept identical across the ranks of ``group``.

    Each unit's backward calls :meth:`add` with its batch sums (4, C), its number of
    positions n and its candidate gradients; the first call of a backward pass queues
    :meth:`_reduce` to run when that pass ends.  There one all-reduce sums, per unit, the sums,
    n and n x gradients over the ranks (a unit that did not run on a rank adds zeros), and every
    unit applies the whole batch's update.  No host synchronisation."""

    def __init__(self, units: list[DendriticUnit], group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.structure = {u: (u.has_candidate, u.num_dendrites) for u in units}
        self.units = [u for u in units if u.has_candidate]
        self._pending: dict[DendriticUnit, torch.Tensor] = {}
        self._task = None  # the backward pass whose results are pending

    def __deepcopy__(self, memo):
        """A copied model (e.g. an EMA copy) gets its own sync over the copied units; the
        process group, which cannot be copied, is shared."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.structure = copy.deepcopy(self.structure, memo)
        new.units = copy.deepcopy(self.units, memo)
        new._pending, new._task = {}, None
        return new

    def check(self, unit: DendriticUnit) -> None:
        """Called by each unit's training forward: its structure is still the wrapped one."""
        if self.structure.get(unit) != (unit.has_candidate, unit.num_dendrites):
            raise RuntimeError("the PB structure changed since pbp_fast.distributed.wrap(model) "
                               "(a phase change, a restore or a checkpoint load): call "
                               "wrap(model) again on every rank and rebuild the optimizer")

    def add(self, unit: DendriticUnit, stats: torch.Tensor, n: int, grads) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first unit of this backward pass
            self._pending, self._task = {}, task
            Variable._execution_engine.queue_callback(self._reduce)
        flat = torch.cat([stats.reshape(-1), stats.new_full((1,), n)]
                         + [g.reshape(-1).float() for g in grads])
        flat[stats.numel() + 1:] *= n  # sum_r n_r g_r / sum_r n_r: the whole batch's gradient
        prev = self._pending.get(unit)  # a unit called twice in one forward: one batch of both
        self._pending[unit] = flat if prev is None else prev + flat

    @torch.no_grad()
    def _reduce(self) -> None:
        pending, self._pending, self._task = self._pending, {}, None
        like = next(iter(pending.values()))
        sizes = [[4 * u.out_channels, 1] + [p.numel() for p in u.candidate_parameters()]
                 for u in self.units]
        flat = torch.cat([pending[u] if u in pending else like.new_zeros(sum(s))
                          for u, s in zip(self.units, sizes)])
        dist.all_reduce(flat, group=self.group)
        for u, s, chunk in zip(self.units, sizes, flat.split([sum(s) for s in sizes])):
            stats, n, *grads = chunk.split(s)
            n = n[0]
            u._update_candidate(stats.view(4, -1), n, *(g / n.clamp_min(1) for g in grads))


# -- data ----------------------------------------------------------------------------------------
def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


class ShardedLoader:
    """This rank's share of a :class:`pbp_fast.data.BatchLoader` (see :func:`shard`)."""

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
        from pbp_fast.data import epoch_seed  # the single-process loader's order

        ld, ds = self.loader, self.dataset
        b, w, r = ld.batch_size, self.world_size, self.rank
        order_gen = torch.Generator(device=ds.device)
        order_gen.manual_seed(epoch_seed(ld.seed, ld.epoch))
        n = len(ds)
        order = (torch.randperm(n, generator=order_gen, device=ds.device) if ld.shuffle
                 else torch.arange(n, device=ds.device))
        if ld.drop_last:  # lockstep: global batch i is order[i w b : (i + 1) w b]
            batches = [order[(i * w + r) * b:(i * w + r + 1) * b] for i in range(len(self))]
        else:  # every image exactly once: rank r takes order[r::w]
            batches = order[r::w].split(b)
        aug_gen = torch.Generator(device=ds.device)
        aug_gen.manual_seed(_seed(ld.seed, ld.epoch, r + 1))
        for idx in batches:
            x, y = ds.images[idx], ds.labels[idx]
            if ld.transform is not None:
                x = ld.transform(x, aug_gen)
            yield ld.normalize(x), y


def shard(loader, *, group=None, ranks: tuple[int, int] | None = None):
    """This rank's share of a :class:`pbp_fast.data.BatchLoader` (whose ``batch_size`` is then
    per rank, as in the torchvision and timm reference scripts).  The order is the one
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
