"""The training recipe: models, data and augmentation, and the training run built from them.

    models.py       MobileNetV2 / V3 (CIFAR stems), mobilenet_tiny, create_model
    data.py         CIFAR-10 (packed JPEG) and the digits as on-device data sets; BatchLoader
    augment.py      batched on-device augmentation: crop / flip, RandAugment, MixUp / CutMix
    config.py       TrainConfig: every setting of a run, validated
    flags.py        the pbp-fast train flags <-> TrainConfig
    optim.py        optimizer and learning-rate schedule factories
    engine.py       train_one_epoch and evaluate: free functions
    records.py      EpochRecord, TrainResult, metrics.csv, tables
    checkpoint.py   last.pt / best.pt: resume exactly; load_checkpoint
    trainer.py      train(cfg): the run, wiring all of the above (and PB's controller)
    demo.py         baseline vs PB, side by side

``pbp_fast.train`` is this package.
"""
from __future__ import annotations

import importlib

# name -> the module of this package that defines it (imported on first use: the recipe pulls
# in the data and model code, which a user of the core alone does not need)
_EXPORTS = {
    "TrainConfig": "config", "train": "trainer", "load_data": "trainer",
    "build_model": "trainer", "build_train_loader": "trainer", "build_criterion": "trainer",
    "TrainResult": "records", "EpochRecord": "records", "format_table": "records",
    "RESULT_COLUMNS": "records", "train_one_epoch": "engine", "evaluate": "engine",
    "build_optimizer": "optim", "build_scheduler": "optim", "PB_LR": "optim",
    "optimizer_field": "optim", "add_train_arguments": "flags", "config_from_args": "flags",
    "load_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pbp_fast.recipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pbp_fast.recipe.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
