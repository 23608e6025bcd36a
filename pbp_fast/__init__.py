"""pbp_fast: native-accelerated Perforated Backpropagation for PyTorch."""
from __future__ import annotations

import importlib

from pbp_fast import functional, ops, reference
from pbp_fast.ops import backends

__version__ = "0.1.0"

# Submodules and names loaded on first use (they pull in heavier dependencies).
_LAZY = {
    "nn": ("pbp_fast.nn", None),
    "convert": ("pbp_fast.conversion", "convert"),
    "PerforatedBackprop": ("pbp_fast.controller", "PerforatedBackprop"),
    "PBConfig": ("pbp_fast.controller", "PBConfig"),
    "count_parameters": ("pbp_fast.conversion", "count_parameters"),
    "models": ("pbp_fast.models", None),
    "data": ("pbp_fast.data", None),
    "deploy": ("pbp_fast.deploy", None),
    "quantize": ("pbp_fast.quantize", None),
    "distill": ("pbp_fast.distill", None),
    "distributed": ("pbp_fast.distributed", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pbp_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


__all__ = ["backends", "functional", "ops", "reference", *_LAZY]
