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
  :class:`CandidateSync` to its units.  Each unit's backward hands its batch sums (v, e, v e,
  e e, v v per channel), its position count and its candidate gradients to it; at the end of
  the backward pass one all-reduce combines those of all units and ranks, and every unit
  applies the same update (running statistics, ``.grad``, snapshot) on every rank.
  The objective is DDP's, the mean of the ranks' losses, so a unit's error is its local
  dL/dy divided by the world size: with equal shards the statistics and gradients are those of
  one process on the whole batch.
- Every ``wrap`` checks that the ranks hold the same structure and broadcasts rank 0's
  parameters and buffers (fresh candidates are drawn from each rank's generator).
- The controller checks, once per epoch, that every rank passed the same validation score:
  all-reduce the metrics (:func:`all_reduce_sum`) before ``add_validation_score``.

Checkpoints hold nothing per rank: write them on rank 0 (:func:`save`) and load them on any
number of ranks.  ``docs/distributed.md`` shows the launch lines.

    group.py    the process group: init, ranks, collectives, check_agree, rank-0 save
    wrap.py     wrap(model) for the current phase; CandidateSync
    loader.py   shard(loader): each rank's share of the batches
"""
from pbp_fast.distributed.group import (active, all_reduce_sum, barrier, broadcast_buffers,
                                        broadcast_from_rank0, check_agree, init, is_initialized,
                                        is_main, local_rank, rank, resolve_device, save, shutdown,
                                        unwrap, world_size)
from pbp_fast.distributed.loader import ShardedLoader, shard
from pbp_fast.distributed.wrap import CandidateSync, wrap

__all__ = ["init", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main",
           "active", "barrier", "all_reduce_sum", "broadcast_from_rank0", "broadcast_buffers",
           "check_agree", "save", "resolve_device", "wrap", "unwrap", "shard", "ShardedLoader",
           "CandidateSync"]
