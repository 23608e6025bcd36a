"""The training run behind ``pbp-fast train`` and the demo: a compact image-classification recipe in
the style of the timm / torchvision reference scripts, with optional Perforated Backpropagation.

    from pbp_fast.recipe import TrainConfig, train
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
(:mod:`pbp_fast.recipe.augment`).  Every epoch draws its order and augmentation from generators
seeded with ``(seed, epoch)``, and the checkpoint holds the global RNG states, so ``resume``
continues a run bit for bit (on the CPU; CUDA kernels may add their own nondeterminism).

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

import copy
import functools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pbp_fast import distributed
from pbp_fast.core import (DendriticUnit, PerforatedBackprop, convert, count_parameters,
                           snapshot_state_dict)
from pbp_fast.deploy.distill import distiller_from_config
from pbp_fast.recipe import augment as aug
from pbp_fast.recipe import checkpoint as ckpt_io
from pbp_fast.recipe import data as data_mod
from pbp_fast.recipe import models
from pbp_fast.recipe.config import TrainConfig
from pbp_fast.recipe.lr_search import TRIAL_EVENT, StartRateSearch
from pbp_fast.recipe.engine import ProgressBar, evaluate, soft_cross_entropy, train_one_epoch
from pbp_fast.recipe.optim import PB_LR, build_optimizer, build_scheduler, optimizer_field
from pbp_fast.recipe.records import EpochRecord, TrainResult, read_csv, write_csv

__all__ = ["train", "load_data", "build_model", "build_train_loader", "build_criterion"]


# -- building blocks -----------------------------------------------------------------------------
def load_data(cfg: TrainConfig) -> data_mod.DataSplits:
    """Train / validation / test splits for ``cfg.data``: the digits, or CIFAR-10 with the
    validation set carved (stratified, seeded) out of the training set."""
    if cfg.uses_digits:
        return data_mod.digits(size=cfg.image_size, seed=cfg.seed)
    full = data_mod.cifar10(cfg.data, train=True, cache_dir=cfg.cache_dir)
    test = data_mod.cifar10(cfg.data, train=False, cache_dir=cfg.cache_dir)
    if cfg.resize is not None:
        full, test = full.resized(cfg.resize), test.resized(cfg.resize)
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


def build_criterion(cfg: TrainConfig, distiller=None) -> Callable:
    """``criterion(x, logits, target)``: the distillation loss with a teacher, else
    cross-entropy with label smoothing (against soft targets when the batch was mixed)."""
    def criterion(x, logits, target):
        if distiller is not None:
            return distiller.loss(x, logits, target)
        if target.dim() == 2:  # MixUp / CutMix targets, already smoothed
            return soft_cross_entropy(logits, target)
        return F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    return criterion


def _count(model) -> tuple[int, int, int]:
    """(parameters, dendrite parameters, dendrites per unit); candidates are not counted."""
    c = count_parameters(model)
    units = [m for m in model.modules() if isinstance(m, DendriticUnit)]
    return c.main + c.dendrites, c.dendrites, max((u.num_dendrites for u in units), default=0)


# -- the run -------------------------------------------------------------------------------------
class _Run:
    """State of one training run; :func:`train` drives it."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.device = distributed.init(cfg.device)  # torchrun: cuda:LOCAL_RANK
        torch.manual_seed(cfg.seed)
        splits = load_data(cfg)
        self.splits = data_mod.DataSplits(*(s.to(self.device) for s in
                                            (splits.train, splits.val, splits.test)))
        train_set = self.splits.train
        self.num_classes = train_set.num_classes
        kw = dict(channels_last=cfg.channels_last)
        self.train_loader = distributed.shard(build_train_loader(cfg, train_set))
        self.val_loader = distributed.shard(
            data_mod.BatchLoader(self.splits.val, cfg.eval_batch_size, **kw))
        self.test_loader = distributed.shard(
            data_mod.BatchLoader(self.splits.test, cfg.eval_batch_size, **kw))

        self.model = build_model(cfg, self.num_classes, train_set.image_shape[0]).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pb = None
        if cfg.dendrites:
            convert(self.model)
            self.pb = PerforatedBackprop(self.model, **cfg.pb_config())
        self.criterion = build_criterion(cfg, distiller_from_config(cfg, self.device))
        self._wrap()
        self.epoch = 0              # epochs completed
        self.phase_start = 0        # epoch at which the current phase (and schedule) began
        self.best_acc, self.best_epoch = -1.0, 0
        self.best_state = None      # baseline: the best model's weights (PB: the controller's)
        self.done = False
        self.lr_scale = 1.0         # the neuron stage's starting rate, relative to cfg.lr
        self.search = (StartRateSearch(cfg.pb_lr_search, cfg.pb_lr_search_factor)
                       if self.pb is not None and cfg.pb_lr_search else None)
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
        lr = cfg.lr * self.lr_scale
        if self.phase == "dendrite":
            lr = cfg.pb_lr if cfg.pb_lr is not None else PB_LR.get(opt, cfg.lr)
        self.optimizer = build_optimizer(params, cfg, lr, opt)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(self.train_loader),
                                         *self._schedule())

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``last.pt``: everything needed to resume exactly."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "pb": self.pb.state_dict() if self.pb is not None else None,
                "epoch": self.epoch,
                "loop": {"phase_start": self.phase_start, "best_acc": self.best_acc,
                         "best_epoch": self.best_epoch},
                "best_state": self.best_state if self.pb is None else None,
                "lr_search": {"lr_scale": self.lr_scale,
                              "search": self.search.state_dict() if self.search else None},
                "rng": ckpt_io.rng_state(self.device), "config": asdict(self.cfg)}

    def resume(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # RNG states stay CPU
        ckpt_io.check_resume(ckpt, self.cfg, path)
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
        search = ckpt.get("lr_search") or {"lr_scale": 1.0, "search": None}
        self.lr_scale = search["lr_scale"]
        if self.search is not None and search["search"] is not None:
            self.search.load_state_dict(search["search"])
        self._build_optimizer()
        if not self.done:  # a finished run may have restored a best model of another structure
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        ckpt_io.set_rng_state(ckpt["rng"], self.device)

    # -- the starting-rate search (pbp_fast.recipe.lr_search) -----------------------------------
    def _snapshot(self) -> dict:
        """What a search goes back to, in memory (the epoch count and the RNG go on)."""
        return {"model": snapshot_state_dict(self.model.state_dict()),
                "pb": copy.deepcopy(self.pb.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(), "phase_start": self.phase_start,
                "lr_scale": self.lr_scale, "best": (self.best_acc, self.best_epoch)}

    def _restore(self, snap: dict, scale: float) -> None:
        """Back to ``snap``: a fresh schedule from ``scale`` x lr (a trial from the stage's
        start), or, at the snapshot's own scale, its optimizer and schedule (a kept trial)."""
        self.model.load_state_dict(snap["model"])
        self.pb.load_state_dict(snap["pb"])
        self._wrap()
        kept = scale == snap["lr_scale"]
        self.lr_scale, self.phase_start = scale, snap["phase_start"] if kept else self.epoch
        self._build_optimizer()
        if kept:
            self.optimizer.load_state_dict(snap["optimizer"])
            self.scheduler.load_state_dict(snap["scheduler"])
        self.best_acc, self.best_epoch = snap["best"]
        if self.pb.best_model is not None:
            self.save_best(snapshot_state_dict(self.pb.best_model))

    def save_best(self, state) -> None:
        ckpt_io.save({"model": state, "epoch": self.epoch, "val_acc": self.best_acc,
                      "config": asdict(self.cfg)}, self.out / "best.pt")

    def best_model_state(self):
        return self.pb.best_model if self.pb is not None else self.best_state

    # -- one epoch -----------------------------------------------------------------------------
    def _mix(self):
        """The epoch's MixUp / CutMix (None when both are off), seeded by (seed + 1, epoch)."""
        cfg = self.cfg
        if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
            return None
        gen = torch.Generator().manual_seed(data_mod.epoch_seed(cfg.seed + 1, self.epoch))
        return functools.partial(aug.mixup_cutmix, num_classes=self.num_classes,
                                 mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                                 label_smoothing=cfg.label_smoothing, generator=gen)

    def step(self) -> EpochRecord:
        """Train one epoch, validate, let the controller decide."""
        t0 = time.perf_counter()
        cfg, phase = self.cfg, self.phase
        self.train_loader.set_epoch(self.epoch)
        bar = ProgressBar(len(self.train_loader), f"epoch {self.epoch + 1}/{cfg.epochs}",
                          cfg.progress and distributed.is_main())
        train_loss, train_acc, lr = train_one_epoch(
            self.net, self.train_loader, self.optimizer, self.scheduler, self.criterion,
            mix=self._mix(), amp=cfg.amp, progress=bar)
        distributed.broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics
        val_loss, val_acc = evaluate(self.net, self.val_loader, cfg.amp)
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
        if improved:
            self.best_acc, self.best_epoch = val_acc, self.epoch
            state = snapshot_state_dict(best_model)
            if self.pb is None:
                self.best_state = state
            self.save_best(state)
        if self.pb is not None and decision.restructured:  # done: the best model may differ
            self.phase_start, self.lr_scale = self.epoch, 1.0
            self._wrap()
            self._build_optimizer()
            if self.search is not None:
                self.search.end()
                if event in ("add_dendrites", "restart"):  # a stage that may start lower
                    self.search.begin(self._snapshot())
        elif self.search is not None and self.search.active:
            back = self.search.after_epoch(val_acc, self._snapshot)
            if back is not None:
                self._restore(*back)
                event = f"{TRIAL_EVENT}: x{back[1]:g}{'' if self.search.active else ' kept'}"
        return EpochRecord(self.epoch, phase, lr, train_loss, train_acc, val_loss, val_acc,
                           params, num_d, event, time.perf_counter() - t0)


def _default_output_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = f"{cfg.model}-w{cfg.width_mult:g}{'-pb' if cfg.dendrites else ''}"
    return Path("runs") / f"{stamp}-{tag}"


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None,
          on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Run the recipe of ``cfg``; returns the final numbers.  ``log`` receives progress lines
    (default: stderr); ``on_epoch_end`` is called with each epoch's record after the epoch's
    checkpoint is written (an exception raised there stops the run, as an interruption would)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    resume = ckpt_io.resume_path(cfg.resume) if cfg.resume else None
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
    records = read_csv(out / "metrics.csv", run.epoch) if resume else []
    params, _, _ = _count(run.model)
    log(f"{cfg.model} (width {cfg.width_mult:g}): {params:,} parameters; data {cfg.data}: "
        f"{len(run.splits.train)} train / {len(run.splits.val)} val / {len(run.splits.test)} "
        f"test on {run.device}; output {out}")

    t0 = time.perf_counter()
    while run.epoch < cfg.epochs and not run.done:
        rec = run.step()
        records.append(rec)
        ckpt_io.save(run.state_dict(), out / "last.pt")
        if main:
            write_csv(out / "metrics.csv", records)
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
