"""The settings of a training run: :class:`TrainConfig`, one validated field per ``pbp-fast train``
flag (:mod:`pbp_fast.recipe.flags`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from pbp_fast.core.config import PBConfig
from pbp_fast.deploy.distill import check_distill_args
from pbp_fast.recipe import augment as aug
from pbp_fast.recipe import models

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "DATA_ENV", "PB_FIELDS"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
DATA_ENV = "PBP_FAST_DATA"
# The controller's fields a run sets, as pb_<field>; their defaults are PBConfig's.
PB_FIELDS = ("switch_mode", "n_patience", "p_patience", "n_epochs", "p_epochs", "max_dendrites",
             "max_tries", "improvement_threshold", "warmup_batches", "snapshot", "score",
             "candidate_scale", "candidate_bn", "train_old_alphas", "control",
             "stage_epochs")
_PB = PBConfig()


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
    resize: int | None = None     # CIFAR-10: area-downsample the images to this size
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
    pb_switch_mode: str = _PB.switch_mode   # "patience" (a plateau), or "fixed" phases
    pb_n_epochs: int | None = _PB.n_epochs  # of pb_n_epochs / pb_p_epochs (caps in "patience")
    pb_p_epochs: int | None = _PB.p_epochs
    pb_n_patience: int = _PB.n_patience
    pb_p_patience: int = _PB.p_patience
    pb_max_dendrites: int = _PB.max_dendrites
    pb_max_tries: int = _PB.max_tries
    pb_improvement_threshold: float = _PB.improvement_threshold
    pb_warmup_batches: int = _PB.warmup_batches
    pb_snapshot: str = _PB.snapshot
    pb_score: str = _PB.score
    pb_candidate_scale: float | None = _PB.candidate_scale
    pb_candidate_bn: bool = _PB.candidate_bn
    pb_train_old_alphas: bool = _PB.train_old_alphas
    pb_control: str = _PB.control
    pb_stage_epochs: tuple[int, ...] = _PB.stage_epochs
    pb_schedule: str = "phase"      # each phase restarts the schedule (warmup included), or
                                    # "global": neuron phases follow one schedule over the run
    pb_lr_search: int = 0           # trial epochs of a neuron stage's starting-rate search
    pb_lr_search_factor: float = 0.1  # (0: none); each trial starts at this x the last's rate
    pb_opt: str = "adamw"           # optimizer of dendrite phases (the candidates)
    pb_lr: float | None = None      # its peak learning rate (None: PB_LR[pb_opt], or lr)
    # knowledge distillation (pbp_fast.deploy.distill)
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
                          ("seed", 0)):
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                bad(name, f"an int >= {low}")
        if self.resize is not None and (not is_int(self.resize) or self.resize < 8):
            bad("resize", "None or an int >= 8")
        if self.ra_magnitude > 30:
            bad("ra_magnitude", "an int in [0, 30]")
        try:  # the controller's own checks, named as the run's fields
            PBConfig(**self.pb_config())
        except ValueError as exc:
            raise ValueError(str(exc).replace("PBConfig.", "pb_")) from None
        for name in ("width_mult", "lr"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a positive number")
        if self.pb_schedule not in ("global", "phase"):
            bad("pb_schedule", "'global' or 'phase'")
        if not is_int(self.pb_lr_search) or self.pb_lr_search < 0:
            bad("pb_lr_search", "an int >= 0")
        if not is_num(self.pb_lr_search_factor) or not 0 < self.pb_lr_search_factor < 1:
            bad("pb_lr_search_factor", "a number in (0, 1)")
        if self.pb_lr_search and self.pb_schedule != "phase":
            bad("pb_lr_search", "0 unless pb_schedule is 'phase' (a search restarts the "
                "stage's schedule at lower rates)")
        if self.pb_opt not in OPTIMIZERS:
            bad("pb_opt", f"one of {OPTIMIZERS}")
        if self.pb_lr is not None and (not is_num(self.pb_lr) or self.pb_lr <= 0):
            bad("pb_lr", "None or a positive number")
        for name in ("momentum", "weight_decay", "lr_min", "mixup_alpha", "cutmix_alpha"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "a number >= 0")
        for name, hi in (("dropout", 1.0), ("label_smoothing", 1.0), ("lr_warmup_decay", 1.0)):
            v = getattr(self, name)
            if not is_num(v) or not 0 <= v < hi or (name == "lr_warmup_decay" and v == 0):
                bad(name, f"a number in {'(0' if name == 'lr_warmup_decay' else '[0'}, {hi})")
        check_distill_args(self.teacher, self.kd_temperature, self.kd_alpha)
        if not is_num(self.hflip) or not 0 <= self.hflip <= 1:
            bad("hflip", "a probability in [0, 1]")
        if self.lr_min >= self.lr:
            bad("lr_min", f"smaller than lr ({self.lr})")

    @property
    def uses_digits(self) -> bool:
        return self.data == "digits"

    def pb_config(self) -> dict:
        """Keyword arguments for :class:`pbp_fast.PerforatedBackprop`."""
        return {name: getattr(self, "pb_" + name) for name in PB_FIELDS}
