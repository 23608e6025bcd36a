"""The training loop behind ``pbp-fast train`` (and the demo): a compact image-classification
recipe in the style of the timm / torchvision reference scripts, with optional Perforated
Backpropagation.

    from pbp_fast.train import TrainConfig, train
    result = train(TrainConfig(model="mobilenet_v3_small", data="digits", epochs=10))

One run writes into ``output_dir``:

- ``args.json``        the :class:`TrainConfig`
- ``metrics.csv``      one row per epoch (phase, lr, losses, accuracies, parameters, time)
- ``last.pt``          everything needed to resume exactly: model, optimizer, scheduler, PB
                       controller, epoch, loop state and RNG states (all ``state_dict``s)
- ``best.pt``          the model with the best validation accuracy (and its epoch / accuracy)
- ``pb_history.csv`` / ``pb_history.png``   the PB controller's record and figure (``dendrites``)
- ``results.json``     the final numbers (parameters, validation and test accuracy, time)

Data stay on the device for the whole run; augmentation runs there in batches
(:mod:`pbp_fast.augment`).  Every epoch draws its order and augmentation from generators seeded
with ``(seed, epoch)``, and the checkpoint holds the global RNG states, so ``resume`` continues a
run bit for bit (on the CPU; CUDA kernels may add their own nondeterminism).

With ``dendrites``, the model is converted (:func:`pbp_fast.convert`) and a
:class:`pbp_fast.PerforatedBackprop` controller receives the validation accuracy after every
epoch.  Each phase change rebuilds the optimizer over the now-trainable parameters.  Neuron
phases keep the run's learning-rate schedule (``pb_schedule="global"``: the rates of the same run
without dendrites) or restart it over the phase (``"phase"``); dendrite phases train fresh
candidates on a warmup-cosine schedule of their own.  The run ends when the controller says so
or after ``epochs`` epochs, whichever comes first; the final numbers are those of the best model
by validation accuracy.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pbp_fast import augment as aug
from pbp_fast import data as data_mod
from pbp_fast import distill, distributed
from pbp_fast import models

__all__ = ["TrainConfig", "TrainResult", "EpochRecord", "train", "add_train_arguments",
           "config_from_args", "build_optimizer", "build_scheduler", "evaluate", "run_cli",
           "format_table"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
DATA_ENV = "PBP_FAST_DATA"
_PB_FIELDS = ("switch_mode", "n_patience", "p_patience", "n_epochs", "p_epochs",
              "max_dendrites", "max_tries", "improvement_threshold")


def _default_data() -> str:
    return os.environ.get(DATA_ENV, "data")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run (the CLI flags, one to one).  Invalid values raise ``ValueError``
    naming the field."""

    # model and data
    model: str = "mobilenet_v3_small"
    width_mult: float = 1.0
    dropout: float = 0.2
    data: str = field(default_factory=_default_data)   # CIFAR-10 path, or "digits"
    val_size: int = 5000          # CIFAR-10: images carved out of the training set (seeded)
    image_size: int = 16          # digits only: upsampled size
    cache_dir: str | None = None  # decoded-JPEG cache (default: ~/.cache/pbp_fast)
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    eval_batch_size: int = 1024
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-5
    sched: str = "cosine"           # after the warmup: "cosine" decay to lr_min, or "constant"
    lr_warmup_epochs: int = 3
    lr_warmup_decay: float = 0.01   # the warmup starts at lr * lr_warmup_decay
    lr_min: float = 0.0
    label_smoothing: float = 0.1
    # augmentation
    random_crop_padding: int = 4
    hflip: float = 0.5
    auto_augment: str = "none"      # "none", "ra" (RandAugment) or "ta_wide" (TrivialAugment)
    ra_magnitude: int = 9
    ra_num_ops: int = 2
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # performance
    device: str = "auto"
    amp: bool = False               # bfloat16 autocast
    channels_last: bool = False
    compile: bool = False
    # Perforated Backpropagation
    dendrites: bool = False
    pb_switch_mode: str = "fixed"   # "fixed" phases of pb_n_epochs / pb_p_epochs, or "patience"
    pb_n_epochs: int | None = 10
    pb_p_epochs: int | None = 5
    pb_n_patience: int = 10
    pb_p_patience: int = 5
    pb_max_dendrites: int = 3
    pb_max_tries: int = 2
    pb_improvement_threshold: float = 1e-4
    pb_schedule: str = "global"     # neuron phases: one schedule over the run, or "phase"
    pb_opt: str = "adamw"           # optimizer of dendrite phases (the candidates)
    pb_lr: float | None = None      # its peak learning rate (None: PB_LR[pb_opt], or lr)
    # knowledge distillation (pbp_fast.distill)
    teacher: str | None = None      # checkpoint of a trained model to distill from
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    # run
    seed: int = 0
    output_dir: str | None = None
    resume: str | None = None
    progress: bool = True

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.model not in models.MODELS:
            bad("model", f"one of {sorted(models.MODELS)}")
        if self.opt not in OPTIMIZERS:
            bad("opt", f"one of {OPTIMIZERS}")
        if self.sched not in SCHEDULES:
            bad("sched", f"one of {SCHEDULES}")
        if self.auto_augment not in aug.AUTO_AUGMENT:
            bad("auto_augment", f"one of {aug.AUTO_AUGMENT}")
        if self.pb_switch_mode not in ("fixed", "patience"):
            bad("pb_switch_mode", "'fixed' or 'patience'")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.data, str) or not self.data:
            bad("data", "'digits' or a CIFAR-10 path")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1),
                          ("val_size", 1), ("image_size", 8), ("lr_warmup_epochs", 0),
                          ("random_crop_padding", 0), ("ra_num_ops", 1), ("ra_magnitude", 0),
                          ("pb_n_patience", 1), ("pb_p_patience", 1), ("pb_max_dendrites", 0),
                          ("pb_max_tries", 1), ("seed", 0)):
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                bad(name, f"an int >= {low}")
        if self.ra_magnitude > 30:
            bad("ra_magnitude", "an int in [0, 30]")
        for name in ("pb_n_epochs", "pb_p_epochs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                bad(name, "None or an int >= 1")
            if v is None and self.dendrites and self.pb_switch_mode == "fixed":
                bad(name, "set when pb_switch_mode is 'fixed'")
        for name in ("width_mult", "lr"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a positive number")
        if self.pb_schedule not in ("global", "phase"):
            bad("pb_schedule", "'global' or 'phase'")
        if self.pb_opt not in OPTIMIZERS:
            bad("pb_opt", f"one of {OPTIMIZERS}")
        if self.pb_lr is not None and (not is_num(self.pb_lr) or self.pb_lr <= 0):
            bad("pb_lr", "None or a positive number")
        for name in ("momentum", "weight_decay", "lr_min", "mixup_alpha", "cutmix_alpha",
                     "pb_improvement_threshold"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "a number >= 0")
        for name, hi in (("dropout", 1.0), ("label_smoothing", 1.0), ("lr_warmup_decay", 1.0)):
            v = getattr(self, name)
            if not is_num(v) or not 0 <= v < hi or (name == "lr_warmup_decay" and v == 0):
                bad(name, f"a number in {'(0' if name == 'lr_warmup_decay' else '[0'}, {hi})")
        distill.check_distill_args(self.teacher, self.kd_temperature, self.kd_alpha)
        if not is_num(self.hflip) or not 0 <= self.hflip <= 1:
            bad("hflip", "a probability in [0, 1]")
        if self.lr_min >= self.lr:
            bad("lr_min", f"smaller than lr ({self.lr})")

    @property
    def uses_digits(self) -> bool:
        return self.data == "digits"

    def pb_config(self) -> dict:
        """Keyword arguments for :class:`pbp_fast.PerforatedBackprop`."""
        return {name: getattr(self, "pb_" + name) for name in _PB_FIELDS}


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {name!r} but CUDA is not available here")
    return dev


def load_data(cfg: TrainConfig) -> data_mod.DataSplits:
    """Train / validation / test splits for ``cfg.data``: the digits, or CIFAR-10 with the
    validation set carved (stratified, seeded) out of the training set."""
    if cfg.uses_digits:
        return data_mod.digits(size=cfg.image_size, seed=cfg.seed)
    full = data_mod.cifar10(cfg.data, train=True, cache_dir=cfg.cache_dir)
    test = data_mod.cifar10(cfg.data, train=False, cache_dir=cfg.cache_dir)
    if cfg.val_size >= len(full):
        raise ValueError(f"val_size ({cfg.val_size}) must be smaller than the training set "
                         f"({len(full)} images)")
    train_set, val = data_mod.train_val_split(full, cfg.val_size, seed=cfg.seed)
    return data_mod.DataSplits(train_set, val, test)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    return models.create_model(cfg.model, width_mult=cfg.width_mult, num_classes=num_classes,
                               in_channels=in_channels, dropout=cfg.dropout)


def build_train_loader(cfg: TrainConfig,
                       train_set: data_mod.ImageDataset) -> data_mod.BatchLoader:
    """Shuffled batches of ``train_set`` (last partial one dropped) with the training
    augmentation of ``cfg``."""
    transform = aug.TrainTransform(cfg.random_crop_padding, cfg.hflip, cfg.auto_augment,
                                   cfg.ra_magnitude, cfg.ra_num_ops)
    return data_mod.BatchLoader(train_set, min(cfg.batch_size, len(train_set)), shuffle=True,
                                drop_last=True, transform=transform, seed=cfg.seed,
                                channels_last=cfg.channels_last)


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


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, loader: data_mod.BatchLoader, amp: bool = False):
    """(mean cross-entropy, accuracy in %) of ``model`` over ``loader``."""
    model.eval()
    device = loader.dataset.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in loader:
        with _autocast(device, amp):
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


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

@dataclass
class EpochRecord:
    """One row of ``metrics.csv``."""

    epoch: int
    phase: str
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    params: int
    dendrites: int
    event: str
    seconds: float


@dataclass
class TrainResult:
    """The final numbers of a run (those of the best model by validation accuracy)."""

    model: str
    dendrites: bool
    params: int               # every parameter, dendrites included
    params_dendrites: int
    num_dendrites: int
    best_epoch: int
    val_acc: float
    test_acc: float
    epochs: int               # epochs trained
    seconds: float            # wall time of the training loop
    output_dir: str
    history: list = field(default_factory=list)   # EpochRecord dicts

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(obj, path: Path) -> None:
    if not distributed.is_main():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _count(model):
    """(total parameters, dendrite parameters, dendrites per unit)."""
    import pbp_fast
    from pbp_fast.nn import DendriticUnit
    c = pbp_fast.count_parameters(model)
    units = [m for m in model.modules() if isinstance(m, DendriticUnit)]
    return c.main + c.dendrites, c.dendrites, max((u.num_dendrites for u in units), default=0)


class _Run:
    """State of one training run; :func:`train` drives it."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.device = distributed.init(resolve_device(cfg.device))  # torchrun: cuda:LOCAL_RANK
        torch.manual_seed(cfg.seed)
        splits = load_data(cfg)
        self.splits = data_mod.DataSplits(*(s.to(self.device) for s in
                                            (splits.train, splits.val, splits.test)))
        train_set = self.splits.train
        c, h, w = train_set.image_shape
        self.num_classes = train_set.num_classes
        kw = dict(channels_last=cfg.channels_last)
        self.train_loader = distributed.shard(build_train_loader(cfg, train_set))
        self.val_loader = distributed.shard(
            data_mod.BatchLoader(self.splits.val, cfg.eval_batch_size, **kw))
        self.test_loader = distributed.shard(
            data_mod.BatchLoader(self.splits.test, cfg.eval_batch_size, **kw))

        self.model = build_model(cfg, self.num_classes, c).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pb = None
        if cfg.dendrites:
            import pbp_fast
            pbp_fast.convert(self.model)
            self.pb = pbp_fast.PerforatedBackprop(self.model, **cfg.pb_config())
        self.distiller = distill.distiller_from_config(cfg, self.device)
        self._wrap()
        self.epoch = 0              # epochs completed
        self.phase_start = 0        # epoch at which the current phase (and schedule) began
        self.best_acc, self.best_epoch = -1.0, 0
        self.best_state = None      # baseline: the best model's weights (PB: the controller's)
        self.done = False
        self._build_optimizer()

    def _wrap(self) -> None:
        """The module the loop calls: under torchrun DDP (neuron phase) or the model with its
        candidates synchronised (dendrite phase); again after every restructure and resume."""
        net = distributed.wrap(self.model)
        if self.cfg.compile:
            # The graphs of the previous structure are of no more use, and Dynamo keeps at most
            # ``recompile_limit`` (8) per function: without a reset, a run's fourth or fifth
            # structure (train and eval graphs each) would silently run eagerly.
            torch.compiler.reset()
            net = torch.compile(net)
        self.net = net

    # -- optimizer / schedule per phase ----------------------------------------------------
    @property
    def phase(self) -> str:
        return self.pb.phase if self.pb is not None else "neuron"

    def _schedule(self) -> tuple[int, int]:
        """(length in epochs, epoch of the schedule at which this phase starts).  Neuron phases
        follow one schedule over the run ("global") or restart it ("phase"); a dendrite phase
        trains fresh candidates, so it always has its own schedule."""
        cfg = self.cfg
        if self.pb is None or (cfg.pb_schedule == "global" and self.phase == "neuron"):
            return cfg.epochs, self.phase_start
        cap = cfg.pb_n_epochs if self.phase == "neuron" else cfg.pb_p_epochs
        left = max(1, cfg.epochs - self.phase_start)
        return (min(cap, left) if cap is not None else left), 0

    def _build_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.cfg
        opt = getattr(cfg, optimizer_field(self.phase))
        lr = cfg.lr
        if self.phase == "dendrite":
            lr = cfg.pb_lr if cfg.pb_lr is not None else PB_LR.get(opt, cfg.lr)
        self.optimizer = build_optimizer(params, cfg, lr, opt)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(self.train_loader),
                                         *self._schedule())

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "pb": self.pb.state_dict() if self.pb is not None else None,
                "epoch": self.epoch,
                "loop": {"phase_start": self.phase_start, "best_acc": self.best_acc,
                         "best_epoch": self.best_epoch},
                "best_state": self.best_state if self.pb is None else None,
                "rng": _rng_state(self.device), "config": asdict(self.cfg)}

    def resume(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # RNG states stay CPU
        if (ckpt["pb"] is None) != (self.pb is None):
            raise ValueError(f"{path} was {'not ' if ckpt['pb'] is None else ''}trained with "
                             f"dendrites; pass the same --dendrites setting to resume it")
        saved = ckpt.get("config", {})
        key = optimizer_field(ckpt["pb"]["state"] if ckpt["pb"] is not None else "neuron")
        had = saved.get(key, saved.get("opt"))  # before --pb-opt, dendrite phases used --opt
        if had is not None and had != getattr(self.cfg, key):
            raise ValueError(f"{path} holds the {had} optimizer of its current phase; pass "
                             f"--{key.replace('_', '-')} {had} to resume it")
        ignore = {"resume", "output_dir", "progress", "device", "compile", "cache_dir"}
        diff = sorted(k for k, v in asdict(self.cfg).items()
                      if k not in ignore and k in saved and saved[k] != v)
        if diff:
            warnings.warn(f"resuming {path} with settings that differ from the saved run: "
                          f"{diff}; the run will not continue exactly", stacklevel=3)
        self.model.load_state_dict(ckpt["model"])      # rebuilds dendrites and candidates
        if self.pb is not None:
            self.pb.load_state_dict(ckpt["pb"])        # sets requires_grad for the phase
        self._wrap()
        self.epoch = ckpt["epoch"]
        loop = ckpt["loop"]
        self.phase_start, self.best_acc, self.best_epoch = (loop["phase_start"], loop["best_acc"],
                                                            loop["best_epoch"])
        self.best_state = ckpt.get("best_state")
        self.done = self.pb is not None and self.pb.phase == "done"
        self._build_optimizer()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], self.device)

    # -- one epoch -----------------------------------------------------------------------------
    def train_one_epoch(self) -> tuple[float, float, float]:
        cfg, device = self.cfg, self.device
        self.net.train()
        self.train_loader.set_epoch(self.epoch)
        mix_gen = torch.Generator().manual_seed(data_mod.epoch_seed(cfg.seed + 1, self.epoch))
        mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
        lr = self.optimizer.param_groups[0]["lr"]
        total_loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = ProgressBar(len(self.train_loader), f"epoch {self.epoch + 1}/{cfg.epochs}",
                          cfg.progress and distributed.is_main())
        for i, (x, y) in enumerate(self.train_loader):
            if mixing:
                x, target = aug.mixup_cutmix(x, y, self.num_classes, mixup_alpha=cfg.mixup_alpha,
                                             cutmix_alpha=cfg.cutmix_alpha,
                                             label_smoothing=cfg.label_smoothing,
                                             generator=mix_gen)
            with _autocast(device, cfg.amp):
                logits = self.net(x)
            if self.distiller is not None:
                loss = self.distiller.loss(x, logits, target if mixing else y)
            else:
                loss = (_soft_cross_entropy(logits, target) if mixing else
                        F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if bar.enabled and (i % 10 == 0 or i == len(self.train_loader) - 1):
                bar.update(i + 1, loss=f"{float(loss):.3f}")
        bar.close()
        total_loss, correct = distributed.all_reduce_sum(total_loss, correct)
        seen *= distributed.world_size()
        return float(total_loss) / seen, 100.0 * int(correct) / seen, lr

    def step(self) -> EpochRecord:
        """Train one epoch, validate, let the controller decide, checkpoint."""
        t0 = time.perf_counter()
        phase = self.phase
        train_loss, train_acc, lr = self.train_one_epoch()
        distributed.broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics
        val_loss, val_acc = evaluate(self.net, self.val_loader, self.cfg.amp)
        params, _, num_d = _count(self.model)
        event = ""
        self.epoch += 1
        if self.pb is not None:
            decision = self.pb.add_validation_score(val_acc, train_loss=train_loss,
                                                    train_acc=train_acc, val_loss=val_loss, lr=lr)
            improved, event = decision.improved, decision.event
            best_model = self.pb.best_model
            self.done = decision.done
        else:
            improved = val_acc > self.best_acc
            best_model = self.model.state_dict() if improved else None
            self.done = False
        if improved:
            self.best_acc, self.best_epoch = val_acc, self.epoch
            state = {k: v.detach().to("cpu", copy=True) for k, v in best_model.items()}
            if self.pb is None:
                self.best_state = state
            self.save_best(state)
        if self.pb is not None and decision.restructured and not decision.done:
            self.phase_start = self.epoch
            self._wrap()
            self._build_optimizer()
        record = EpochRecord(self.epoch, phase, lr, train_loss, train_acc, val_loss, val_acc,
                             params, num_d, event, time.perf_counter() - t0)
        return record

    def save_best(self, state) -> None:
        _save({"model": state, "epoch": self.epoch, "val_acc": self.best_acc,
               "config": asdict(self.cfg)}, self.out / "best.pt")

    def best_model_state(self):
        return self.pb.best_model if self.pb is not None else self.best_state


_CSV_FIELDS = [f.name for f in dataclasses.fields(EpochRecord)]


def _write_csv(path: Path, records: list[EpochRecord]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow(asdict(r))


def _read_csv(path: Path, upto: int) -> list[EpochRecord]:
    if not path.exists():
        return []
    types = {f.name: f.type for f in dataclasses.fields(EpochRecord)}
    conv = {"int": int, "float": float, "str": str}
    with open(path, newline="") as f:
        rows = [EpochRecord(**{k: conv[types[k]](v) for k, v in row.items()})
                for row in csv.DictReader(f)]
    return [r for r in rows if r.epoch <= upto]


def _default_output_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = f"{cfg.model}-w{cfg.width_mult:g}{'-pb' if cfg.dendrites else ''}"
    return Path("runs") / f"{stamp}-{tag}"


def _resume_path(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None,
          on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Run the recipe of ``cfg``; returns the final numbers.  ``log`` receives progress lines
    (default: stderr); ``on_epoch_end`` is called with each epoch's record after the epoch's
    checkpoint is written (an exception raised there stops the run, as an interruption would)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    resume = _resume_path(cfg.resume) if cfg.resume else None
    out = Path(cfg.output_dir) if cfg.output_dir else (
        resume.parent if resume else _default_output_dir(cfg))
    out.mkdir(parents=True, exist_ok=True)

    run = _Run(cfg, out)
    main = distributed.is_main()
    if not main:
        log = lambda s: None  # noqa: E731
    if resume is not None:
        run.resume(resume)
        log(f"resumed {resume} at epoch {run.epoch} (phase {run.phase})")
    if main:
        with open(out / "args.json", "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    records = _read_csv(out / "metrics.csv", run.epoch) if resume else []
    params, _, _ = _count(run.model)
    log(f"{cfg.model} (width {cfg.width_mult:g}): {params:,} parameters; data {cfg.data}: "
        f"{len(run.splits.train)} train / {len(run.splits.val)} val / {len(run.splits.test)} "
        f"test on {run.device}; output {out}")

    t0 = time.perf_counter()
    while run.epoch < cfg.epochs and not run.done:
        rec = run.step()
        records.append(rec)
        _save(run.checkpoint(), out / "last.pt")
        if main:
            _write_csv(out / "metrics.csv", records)
            if run.pb is not None:
                run.pb.history.to_csv(out / "pb_history.csv")
        log(f"epoch {rec.epoch:3d}/{cfg.epochs} {rec.phase:8s} lr {rec.lr:.4g} "
            f"train loss {rec.train_loss:.4f} acc {rec.train_acc:6.2f} | val loss "
            f"{rec.val_loss:.4f} acc {rec.val_acc:6.2f} | {rec.params:,} params"
            f"{f' ({rec.dendrites} dendrites)' if cfg.dendrites else ''} {rec.seconds:.1f}s"
            f"{f' [{rec.event}]' if rec.event else ''}")
        if on_epoch_end is not None:
            on_epoch_end(rec)
    seconds = time.perf_counter() - t0

    best = run.best_model_state()
    if best is not None:
        run.model.load_state_dict(best)
    _, val_acc = evaluate(run.net, run.val_loader, cfg.amp)
    _, test_acc = evaluate(run.net, run.test_loader, cfg.amp)
    params, params_d, num_d = _count(run.model)
    if run.pb is not None and main:
        run.pb.history.to_csv(out / "pb_history.csv")
        _try_plot(run.pb.history, out / "pb_history.png",
                  f"{cfg.model} (width {cfg.width_mult:g}) with PB", log)
    result = TrainResult(cfg.model, cfg.dendrites, params, params_d, num_d, run.best_epoch,
                         val_acc, test_acc, run.epoch, seconds, str(out),
                         [asdict(r) for r in records])
    if main:
        with open(out / "results.json", "w") as f:
            json.dump(result.summary(), f, indent=2)
    return result


def _try_plot(history, path, title, log) -> None:
    try:
        history.plot(path, title=title)
    except ImportError:
        log(f"matplotlib is not installed: skipped the figure {path}")


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (header, key, format spec)."""
    cells = [[h for h, _, _ in columns]] + [[format(r[k], f) for _, k, f in columns]
                                            for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RESULT_COLUMNS = [("model", "name", ""), ("params", "params", ","),
                  ("dendrites", "num_dendrites", "d"), ("best epoch", "best_epoch", "d"),
                  ("val acc %", "val_acc", ".2f"), ("test acc %", "test_acc", ".2f"),
                  ("epochs", "epochs", "d"), ("time s", "seconds", ".1f")]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pbp-fast train`` flags (torchvision / timm reference-script names); each maps to the
    :class:`TrainConfig` field of the same name."""
    fields_ = TrainConfig.__dataclass_fields__

    def default(name):
        f = fields_[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def add(group, flag, name, help, **kw):
        group.add_argument(*([flag] if isinstance(flag, str) else flag), dest=name,
                           default=default(name), help=help, **kw)

    g = parser.add_argument_group("model and data")
    add(g, "--model", "model", "network", choices=sorted(models.MODELS))
    add(g, "--width-mult", "width_mult", "channel width multiplier", type=float)
    add(g, "--dropout", "dropout", "dropout before the classifier", type=float)
    add(g, ("--data", "--data-path"), "data",
        f"CIFAR-10 as a packed-JPEG .npz, a folder holding the train/test pair, or a "
        f"cifar-10-batches-py folder (downloaded there if missing); or 'digits' for "
        f"scikit-learn's digits (the default comes from ${DATA_ENV} when set)")
    add(g, "--val-size", "val_size", "CIFAR-10 training images held out for validation (seeded, "
        "stratified)", type=int)
    add(g, "--image-size", "image_size", "digits: upsampled image size", type=int)
    add(g, "--cache-dir", "cache_dir", "decoded-JPEG cache (None: $PBP_FAST_CACHE or "
        "~/.cache/pbp_fast)")

    g = parser.add_argument_group("optimisation")
    add(g, "--epochs", "epochs", "epochs (with --dendrites: at most)", type=int)
    add(g, ("-b", "--batch-size"), "batch_size", "training batch size", type=int)
    add(g, "--eval-batch-size", "eval_batch_size", "evaluation batch size", type=int)
    add(g, "--opt", "opt", "optimizer", choices=OPTIMIZERS)
    add(g, "--lr", "lr", "peak learning rate", type=float)
    add(g, "--momentum", "momentum", "SGD momentum", type=float)
    add(g, ("--wd", "--weight-decay"), "weight_decay", "weight decay (weights only; not "
        "biases, norms or dendrite scales)", type=float)
    add(g, "--sched", "sched", "learning rate after the warmup: cosine decay to --lr-min, or "
        "constant", choices=SCHEDULES)
    add(g, "--lr-warmup-epochs", "lr_warmup_epochs", "linear warmup epochs (of each phase with "
        "--dendrites), then cosine decay", type=int)
    add(g, "--lr-warmup-decay", "lr_warmup_decay", "the warmup starts at lr x this",
        type=float)
    add(g, "--lr-min", "lr_min", "learning rate at the end of the cosine", type=float)
    add(g, "--label-smoothing", "label_smoothing", "label smoothing", type=float)

    g = parser.add_argument_group("augmentation (batched, on the data's device)")
    add(g, "--random-crop-padding", "random_crop_padding", "pad-and-crop padding in pixels",
        type=int)
    add(g, "--hflip", "hflip", "horizontal flip probability (0 for digits)", type=float)
    add(g, "--auto-augment", "auto_augment", "ra: RandAugment, ta_wide: TrivialAugment",
        choices=aug.AUTO_AUGMENT)
    add(g, "--ra-magnitude", "ra_magnitude", "RandAugment magnitude (of 31 bins)", type=int)
    add(g, "--ra-num-ops", "ra_num_ops", "RandAugment operations per image", type=int)
    add(g, "--mixup-alpha", "mixup_alpha", "MixUp alpha (0: off)", type=float)
    add(g, "--cutmix-alpha", "cutmix_alpha", "CutMix alpha (0: off)", type=float)

    g = parser.add_argument_group("performance")
    add(g, "--device", "device", "auto (cuda when available), cpu, cuda, cuda:N")
    add(g, "--amp", "amp", "bfloat16 autocast", action="store_true")
    add(g, "--channels-last", "channels_last", "channels_last memory format",
        action="store_true")
    add(g, "--compile", "compile", "torch.compile the model", action="store_true")

    g = parser.add_argument_group("Perforated Backpropagation")
    add(g, "--dendrites", "dendrites", "train with PB dendrites", action="store_true")
    add(g, "--pb-switch-mode", "pb_switch_mode", "fixed: phases of --pb-n-epochs / "
        "--pb-p-epochs; patience: switch on a plateau (the epoch counts are then caps)",
        choices=("fixed", "patience"))
    add(g, "--pb-n-epochs", "pb_n_epochs", "epochs of a neuron phase ('none': no cap)",
        type=_int_or_none)
    add(g, "--pb-p-epochs", "pb_p_epochs", "epochs of a dendrite phase ('none': no cap)",
        type=_int_or_none)
    add(g, "--pb-n-patience", "pb_n_patience", "patience mode: neuron epochs without "
        "improvement", type=int)
    add(g, "--pb-p-patience", "pb_p_patience", "patience mode: dendrite epochs without a "
        "candidate improving", type=int)
    add(g, "--pb-max-dendrites", "pb_max_dendrites", "dendrites per unit at most", type=int)
    add(g, "--pb-max-tries", "pb_max_tries", "failed dendrite sets in a row before stopping",
        type=int)
    add(g, "--pb-improvement-threshold", "pb_improvement_threshold", "relative margin that "
        "counts as a better validation score", type=float)
    add(g, "--pb-schedule", "pb_schedule", "neuron phases follow one learning-rate schedule "
        "over --epochs, as without dendrites (global), or restart it over each phase's length "
        "(phase); dendrite phases always have their own", choices=("global", "phase"))
    add(g, "--pb-opt", "pb_opt", "optimizer of dendrite phases, which train only the "
        "candidates. Their gradient has the scale of the loss's gradient at a unit's output, "
        "orders of magnitude below their weights: AdamW's steps do not depend on it, SGD at "
        "the network's rate barely moves them (docs/core.md)", choices=OPTIMIZERS)
    add(g, "--pb-lr", "pb_lr", f"peak learning rate of dendrite phases (None: "
        f"{PB_LR['adamw']:g} with AdamW, --lr with SGD)", type=float)

    g = parser.add_argument_group("run")
    add(g, "--seed", "seed", "seed of the split, the initialisation and every epoch's order "
        "and augmentation", type=int)
    add(g, "--output-dir", "output_dir", "run folder (None: runs/<time>-<model>, or the "
        "folder of --resume)")
    add(g, "--resume", "resume", "continue from a last.pt checkpoint (or its folder)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no per-batch progress bar")
    distill.add_distill_args(parser)

def _int_or_none(text: str):
    return None if text.lower() == "none" else int(text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_cli(args: argparse.Namespace) -> int:
    """``pbp-fast train``: run and print the final table.  Invalid settings and missing files
    end the program with a one-line message."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        sys.exit(f"pbp-fast train: error: {exc}")
    try:
        result = train(cfg)
    except FileNotFoundError as exc:
        sys.exit(f"pbp-fast train: error: {exc}")
    main = distributed.is_main()
    distributed.shutdown()  # the command owns the process group that train() joined
    if not main:
        return 0
    row = result.summary()
    row["name"] = f"{cfg.model} x{cfg.width_mult:g}{' + PB' if cfg.dendrites else ''}"
    print(format_table([row], RESULT_COLUMNS))
    print(f"output: {result.output_dir}")
    return 0
