"""A run's checkpoints: ``last.pt`` (everything needed to resume exactly, written atomically on
rank 0 after every epoch) and ``best.pt`` (the best model by validation accuracy).

The run's own state is ``state_dict``s (model, optimizer, scheduler, PB controller) plus the loop
counters and the RNG states; :func:`check_resume` says whether a checkpoint can continue under a
configuration.  :func:`load_checkpoint` rebuilds a trained model from either file: the model
name, width and dropout come from the saved configuration, the number of classes and input
channels from the weights, and a state_dict with dendrites is loaded into a converted model,
which rebuilds them (:meth:`pbp_fast.core.DendriticUnit._load_from_state_dict`).

    model, config = load_checkpoint("runs/.../best.pt")     # eval mode, on the CPU
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pbp_fast.core.conversion import convert
from pbp_fast.distributed import save
from pbp_fast.recipe import models
from pbp_fast.recipe.config import TrainConfig
from pbp_fast.recipe.optim import optimizer_field

__all__ = ["load_checkpoint", "save", "rng_state", "set_rng_state", "resume_path",
           "check_resume"]

# settings that may differ on resume without changing what the run computes
RESUME_FREE = {"resume", "output_dir", "progress", "device", "compile", "cache_dir"}


def rng_state(device: torch.device) -> dict:
    """The global RNG states a run draws from (the CPU's, and the device's on CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_path(resume: str) -> Path:
    """The ``last.pt`` of ``resume`` (a file or a run folder)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path


def check_resume(ckpt: dict, cfg: TrainConfig, path) -> None:
    """Raise ``ValueError`` (naming the flag) when ``cfg`` cannot continue the run of ``ckpt``
    (with or without dendrites, or another optimizer for the checkpoint's phase); warn when
    other settings differ, since the run will then not continue exactly."""
    if (ckpt["pb"] is None) == cfg.dendrites:
        raise ValueError(f"{path} was {'not ' if ckpt['pb'] is None else ''}trained with "
                         f"dendrites; pass the same --dendrites setting to resume it")
    saved = ckpt.get("config", {})
    key = optimizer_field(ckpt["pb"]["state"] if ckpt["pb"] is not None else "neuron")
    had = saved.get(key, saved.get("opt"))  # before --pb-opt, dendrite phases used --opt
    if had is not None and had != getattr(cfg, key):
        raise ValueError(f"{path} holds the {had} optimizer of its current phase; pass "
                         f"--{key.replace('_', '-')} {had} to resume it")
    diff = sorted(k for k, v in asdict(cfg).items()
                  if k not in RESUME_FREE and k in saved and saved[k] != v)
    if diff:
        warnings.warn(f"resuming {path} with settings that differ from the saved run: "
                      f"{diff}; the run will not continue exactly", stacklevel=4)

_DENDRITE_KEY = "dendrite_weight"


def _weights(state: dict, ndim: int) -> list[torch.Tensor]:
    """Main-layer weights (not dendrites or candidates) of ``ndim`` dimensions, in order."""
    return [v for k, v in state.items() if k.endswith(".weight") and ".candidate." not in k
            and isinstance(v, torch.Tensor) and v.dim() == ndim]


def _io_sizes(state: dict, config: dict) -> tuple[int, int]:
    """(num_classes, in_channels): saved in the configuration, else read off the first conv and
    the last linear layer of the state_dict."""
    num_classes, in_channels = config.get("num_classes"), config.get("in_channels")
    convs, linears = _weights(state, 4), _weights(state, 2)
    if in_channels is None:
        if not convs:
            raise ValueError("the checkpoint's model has no conv weight to read the input "
                             "channels from")
        in_channels = convs[0].shape[1]
    if num_classes is None:
        if not linears:
            raise ValueError("the checkpoint's model has no linear weight to read the number of "
                             "classes from")
        num_classes = linears[-1].shape[0]
    return int(num_classes), int(in_channels)


def load_checkpoint(path, map_location="cpu") -> tuple[nn.Module, dict]:
    """``(model, config)`` from a checkpoint written by :func:`pbp_fast.recipe.train`: a dict with
    ``"model"`` (a state_dict, dendrites included) and ``"config"`` (the run's TrainConfig as a
    dict).  The model is converted when the state_dict holds dendritic units, loaded, and
    returned in eval mode on ``map_location``."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"checkpoint: {path} is not a pbp-fast train checkpoint (a dict with "
                         f"'model' and 'config')")
    state, config = ckpt["model"], ckpt["config"]
    name = config.get("model")
    if name not in models.MODELS:
        raise ValueError(f"checkpoint: {path} names model {name!r}, which is not one of "
                         f"{sorted(models.MODELS)}")
    num_classes, in_channels = _io_sizes(state, config)
    model = models.create_model(name, width_mult=config.get("width_mult", 1.0),
                                num_classes=num_classes, in_channels=in_channels,
                                dropout=config.get("dropout", 0.0))
    if any(k.endswith(_DENDRITE_KEY) for k in state):
        convert(model)
    model.load_state_dict(state)
    return model.to(map_location).eval(), dict(config)
