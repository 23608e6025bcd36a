"""The ``pbp-fast train`` flags: one per :class:`TrainConfig` field, with the torchvision / timm
reference scripts' names."""
from __future__ import annotations

import argparse
import dataclasses

from pbp_fast.core.config import CONTROLS, SCORES, SNAPSHOTS
from pbp_fast.deploy.distill import add_distill_args
from pbp_fast.recipe import augment as aug
from pbp_fast.recipe import models
from pbp_fast.recipe.config import DATA_ENV, OPTIMIZERS, SCHEDULES, TrainConfig
from pbp_fast.recipe.optim import PB_LR

__all__ = ["add_train_arguments", "config_from_args"]


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
    add(g, "--resize", "resize", "CIFAR-10: area-downsample the images to this size",
        type=_int_or_none)
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
    add(g, "--pb-warmup-batches", "pb_warmup_batches", "batches whose candidate statistics "
        "are averaged before any snapshot", type=int)
    add(g, "--pb-snapshot", "pb_snapshot", "keep each candidate channel's best weights "
        "(channel) or the best candidate as a whole (unit)", choices=SNAPSHOTS)
    add(g, "--pb-score", "pb_score", "a candidate's score: its covariance with the error over "
        "the error's spread (covariance) or Pearson's r (pearson)", choices=SCORES)
    add(g, "--pb-candidate-scale", "pb_candidate_scale", "candidates start as N(0, 1) x this "
        "('none': the layer's default initialisation)", type=_float_or_none)
    add(g, "--pb-candidate-bn", "pb_candidate_bn", "a BatchNorm between each candidate's conv "
        "and its sigmoid, trained on batch statistics, folded into the dendrite when adopted",
        action=argparse.BooleanOptionalAction)
    add(g, "--pb-train-old-alphas", "pb_train_old_alphas", "neuron phases train every "
        "dendrite's alpha (--no-pb-train-old-alphas: only the newest)",
        action=argparse.BooleanOptionalAction)
    add(g, "--pb-control", "pb_control", "a control run: restarts (PB's stages, no dendrites) "
        "or untrained (candidates adopted without a dendrite phase)", choices=CONTROLS)
    add(g, "--pb-stage-epochs", "pb_stage_epochs", "the neuron stages' lengths, comma-separated "
        "(a replay of another run's stages, e.g. PB's for its restarts control); training ends "
        "after the last", type=_int_tuple)
    add(g, "--pb-schedule", "pb_schedule", "neuron phases follow one learning-rate schedule "
        "over --epochs, as without dendrites (global), or restart it over each phase's length "
        "(phase); dendrite phases always have their own", choices=("global", "phase"))
    add(g, "--pb-lr-search", "pb_lr_search", "a neuron stage's starting-rate search: after "
        "dendrites are added, train this many epochs, go back to the stage's start at "
        "--pb-lr-search-factor x the rate while that does better on validation, keep the best "
        "(0: no search)", type=int)
    add(g, "--pb-lr-search-factor", "pb_lr_search_factor", "each trial's starting rate "
        "relative to the previous one's", type=float)
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
    add_distill_args(parser)


def _or_none(convert):
    """An argparse type: 'none' gives None, anything else ``convert(text)``."""
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)
    parse.__name__ = convert.__name__  # argparse names it in its error message
    return parse


_int_or_none, _float_or_none = _or_none(int), _or_none(float)


def _int_tuple(text: str) -> tuple[int, ...]:
    """An argparse type: '40,36,20' gives (40, 36, 20); '' gives ()."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
