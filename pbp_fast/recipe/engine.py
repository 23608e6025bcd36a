"""One epoch of training and one evaluation, as free functions over a model, a loader and an
optimizer (as in timm's ``train.py``).  Under ``torch.distributed`` each rank runs its share of
the batches and the returned numbers are summed over the ranks."""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pbp_fast import distributed

__all__ = ["train_one_epoch", "evaluate", "soft_cross_entropy", "autocast", "ProgressBar"]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (N, classes), e.g. those of MixUp / CutMix."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_one_epoch(net: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler,
                    criterion: Callable, *, mix: Callable | None = None, amp: bool = False,
                    progress: "ProgressBar | None" = None) -> tuple[float, float, float]:
    """One pass over ``loader``: forward, ``criterion(x, logits, target)``, backward, optimizer
    and (per step) scheduler.  ``mix(x, y) -> (x, soft target)`` mixes each batch (MixUp /
    CutMix); without it the target is the label.  Returns (mean loss, accuracy in % against the
    labels, the learning rate the epoch started with)."""
    device = loader.dataset.device
    net.train()
    lr = optimizer.param_groups[0]["lr"]
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for i, (x, y) in enumerate(loader):
        x, target = mix(x, y) if mix is not None else (x, y)
        with autocast(device, amp):
            logits = net(x)
        loss = criterion(x, logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if progress is not None and progress.enabled and (i % 10 == 0 or i == len(loader) - 1):
            progress.update(i + 1, loss=f"{float(loss):.3f}")
    if progress is not None:
        progress.close()
    total_loss, correct = distributed.all_reduce_sum(total_loss, correct)
    seen *= distributed.world_size()
    return float(total_loss) / seen, 100.0 * int(correct) / seen, lr


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) of ``model`` over ``loader``."""
    model.eval()
    device = loader.dataset.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    loss, correct = distributed.all_reduce_sum(loss, correct)  # each rank evaluated its share
    n = len(loader.dataset)
    return float(loss) / n, 100.0 * int(correct) / n


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place when stderr is a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc = total, desc
        self.stream = stream or sys.stderr
        self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()

    def update(self, n: int, **info) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * n / max(1, self.total))
        rate = n / max(1e-9, time.perf_counter() - self.start)
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        self.stream.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {n}/{self.total} "
                          f"{rate:.1f} it/s {extra}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
