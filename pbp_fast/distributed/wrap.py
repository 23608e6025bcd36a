"""The model under data parallelism: :func:`wrap` for the current PB phase, and
:class:`CandidateSync`, which keeps the candidates identical across ranks (see the package's
docstring)."""
from __future__ import annotations

import copy
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.nn.parallel import DistributedDataParallel

# The unit module by name, not its class: pbp_fast.core.unit imports this package's group module.
from pbp_fast.core import unit as unit_mod
from pbp_fast.distributed.group import active, broadcast_from_rank0, check_agree, unwrap

__all__ = ["wrap", "CandidateSync"]


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
    units = [m for m in model.modules() if isinstance(m, unit_mod.DendriticUnit)]
    if not active(group):
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
    broadcast_from_rank0([p.detach() for p in model.parameters()] + list(model.buffers()), group)
    sync = CandidateSync(units, group)
    for u in units:
        u.candidate_sync = sync
    if not trainable:  # the dendrite phase: the candidates' gradients come from the units
        return model
    return DistributedDataParallel(model, process_group=group, init_sync=False, **ddp_kwargs)


class CandidateSync:
    """The candidates of one wrapped model, kept identical across the ranks of ``group``.

    Each unit's backward calls :meth:`add` with its batch sums (5, C), its number of
    positions n, its candidate gradients and, for a candidate with a BatchNorm, its conv
    output's moments (each rank normalises with its own batch's statistics, as
    nn.BatchNorm2d under DDP does; the running statistics follow the whole batch's, the same
    on every rank); the first call of a backward pass queues
    :meth:`_reduce` to run when that pass ends.  There one all-reduce sums, per unit, the sums,
    n and n x gradients over the ranks (a unit that did not run on a rank adds zeros), and every
    unit applies the whole batch's update.  No host synchronisation."""

    def __init__(self, units: list[unit_mod.DendriticUnit], group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.structure = {u: (u.has_candidate, u.num_dendrites) for u in units}
        self.units = [u for u in units if u.has_candidate]
        self._pending: dict[unit_mod.DendriticUnit, torch.Tensor] = {}
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

    def check(self, unit: unit_mod.DendriticUnit) -> None:
        """Called by each unit's training forward: its structure is still the wrapped one."""
        if self.structure.get(unit) != (unit.has_candidate, unit.num_dendrites):
            raise RuntimeError("the PB structure changed since pbp_fast.distributed.wrap(model) "
                               "(a phase change, a restore or a checkpoint load): call "
                               "wrap(model) again on every rank and rebuild the optimizer")

    def add(self, unit: unit_mod.DendriticUnit, stats: torch.Tensor, n: int, grads,
            moments=None) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first unit of this backward pass
            self._pending, self._task = {}, task
            Variable._execution_engine.queue_callback(self._reduce)
        flat = torch.cat([stats.reshape(-1), stats.new_full((1,), n)]
                         + [g.reshape(-1).float() for g in grads]
                         + ([] if moments is None else [moments.reshape(-1).float()]))
        # sum_r n_r g_r / sum_r n_r: the whole batch's gradient (and BatchNorm moments)
        flat[stats.numel() + 1:] *= n
        prev = self._pending.get(unit)  # a unit called twice in one forward: one batch of both
        self._pending[unit] = flat if prev is None else prev + flat

    @torch.no_grad()
    def _reduce(self) -> None:
        pending, self._pending, self._task = self._pending, {}, None
        like = next(iter(pending.values()))
        sizes = [[u.candidate.stats.numel(), 1] + [p.numel() for p in u.candidate_parameters()]
                 + ([3 * u.out_channels] if u.candidate.bn else []) for u in self.units]
        flat = torch.cat([pending[u] if u in pending else like.new_zeros(sum(s))
                          for u, s in zip(self.units, sizes)])
        dist.all_reduce(flat, group=self.group)
        for u, s, chunk in zip(self.units, sizes, flat.split([sum(s) for s in sizes])):
            stats, n, *grads = chunk.split(s)
            n = n[0]
            moments = grads.pop().view(3, -1) / n.clamp_min(1) if u.candidate.bn else None
            u.update_candidate(stats.view_as(u.candidate.stats), n,
                               [g / n.clamp_min(1) for g in grads], moments)
