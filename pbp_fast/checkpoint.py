"""Rebuild a trained model from a ``pbp-fast train`` checkpoint (``best.pt`` or ``last.pt``):
the model name, width and dropout come from the saved configuration, the number of classes and
input channels from the weights, and a state_dict with dendrites is loaded into a converted
model, which rebuilds them (:meth:`pbp_fast.nn.DendriticUnit._load_from_state_dict`).

    model, config = load_checkpoint("runs/.../best.pt")     # eval mode, on the CPU
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pbp_fast import models
from pbp_fast.conversion import convert

__all__ = ["load_checkpoint"]

_DENDRITE_KEY = "dendrite_weight"


def _weights(state: dict, ndim: int) -> list[torch.Tensor]:
    """Main-layer weights (not dendrites or candidates) of ``ndim`` dimensions, in order."""
    return [v for k, v in state.items()
            if k.endswith(".weight") and isinstance(v, torch.Tensor) and v.dim() == ndim]


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
    """``(model, config)`` from a checkpoint written by :func:`pbp_fast.train.train`: a dict with
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
