"""The optimizers and learning-rate schedules of a run: SGD or AdamW with weight decay on weight
tensors only, and a per-step linear warmup then cosine (or constant) schedule."""
from __future__ import annotations

import functools
import math

import torch

from pbp_fast.recipe.config import TrainConfig

__all__ = ["PB_LR", "optimizer_field", "build_optimizer", "build_scheduler"]


def optimizer_field(phase: str) -> str:
    """The TrainConfig field naming the optimizer of a phase: dendrite phases have their own."""
    return "pb_opt" if phase == "dendrite" else "opt"


# The candidates' default peak learning rate per --pb-opt (SGD: the network's --lr).  AdamW's
# steps do not depend on the gradient's scale; 0.01 trains a candidate well within a dendrite
# phase (docs/core.md, "The candidates' optimizer").
PB_LR = {"adamw": 0.01}


def build_optimizer(params, cfg: TrainConfig, lr: float | None = None,
                    opt: str | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov-free, torchvision's default) or AdamW (``opt``, default ``cfg.opt``) over
    ``params``; weight decay on weight tensors only (not on 1-d parameters: biases, norms,
    dendrite scales)."""
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    lr = cfg.lr if lr is None else lr
    if (opt or cfg.opt) == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def _warmup_cosine(step: int, warmup: int, total: int, start: float, floor: float) -> float:
    if step < warmup:
        return start + (1.0 - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _shifted(step: int, offset: int, fn) -> float:
    return fn(step + offset)


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int,
                    start_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over ``epochs``: linear warmup from ``lr * lr_warmup_decay`` over
    ``lr_warmup_epochs`` (at most half of ``epochs``), then cosine decay to ``lr_min`` (relative
    to the optimizer's lr), or with ``sched="constant"`` the peak rate to the end.
    ``start_epoch`` > 0 joins the schedule there (a rebuilt optimizer continuing a run's
    schedule)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(steps_per_epoch * cfg.lr_warmup_epochs, total // 2)
    floor = 1.0 if cfg.sched == "constant" else cfg.lr_min / cfg.lr
    fn = functools.partial(_warmup_cosine, warmup=warmup, total=total,
                           start=cfg.lr_warmup_decay, floor=floor)
    if start_epoch:
        fn = functools.partial(_shifted, offset=steps_per_epoch * start_epoch, fn=fn)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
