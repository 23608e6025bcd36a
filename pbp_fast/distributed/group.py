"""The process group and its collectives, for data-parallel PB training (see the package's
docstring): joining torchrun's group, ranks, sums and broadcasts, checks that the ranks agree,
and rank-0 saving."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["resolve_device", "init", "shutdown", "is_initialized", "rank", "world_size",
           "local_rank", "is_main", "active", "barrier", "all_reduce_sum",
           "broadcast_from_rank0", "broadcast_buffers", "check_agree", "save", "unwrap"]


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


def active(group=None) -> bool:
    """More than one rank in ``group``."""
    return world_size(group) > 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``device`` as a ``torch.device``; "auto" is CUDA when available, else the CPU.  A CUDA
    device where CUDA is not available is a ValueError."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {str(device)!r} but CUDA is not available here")
    return dev


def init(device: str | torch.device = "auto", backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and return this process's device.

    ``device``: "auto" (CUDA when available), "cuda" or "cpu".  On CUDA each process takes
    ``cuda:LOCAL_RANK`` and the backend is NCCL; on the CPU it is gloo (``backend`` overrides).
    Without torchrun's variables (a plain single process) nothing is initialised and the device
    is returned as it would be for one process.  When the group exists already it is kept."""
    dev = resolve_device(device)
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
    if active(group):
        dist.barrier(group)


def all_reduce_sum(*tensors: torch.Tensor, group=None):
    """Sum each tensor over the ranks, in place (no host synchronisation); returns the tensor, or
    a tuple of them.  One process: returned unchanged.  E.g. the summed loss and the number of
    correct predictions of each rank's share of the validation set."""
    if active(group):
        for t in tensors:
            dist.all_reduce(t, group=group)
    return tensors[0] if len(tensors) == 1 else tensors


def broadcast_from_rank0(tensors: list[torch.Tensor], group=None) -> None:
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
    if active(group):
        broadcast_from_rank0(list(unwrap(model).buffers()), group)


def check_agree(values, what: str, group=None) -> None:
    """Raise on every rank (no rank is left waiting) unless all ranks passed the same
    ``values`` (numbers)."""
    if not active(group):
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


def unwrap(net: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or ``net`` itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net
