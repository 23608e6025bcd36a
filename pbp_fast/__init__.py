"""pbp_fast: native-accelerated Perforated Backpropagation for PyTorch.

The package in layers, each importing only the ones above it (docs/design.md):

    ops/           the op layer: PB's math as registered ops (C++ in csrc/, Triton in kernels/)
                   with one plain-PyTorch reference                  (``pbp_fast.functional``)
    core/          the PB core: dendritic units, convert(), the controller  (``pbp_fast.nn``)
    distributed/   data-parallel PB: the process group, wrap(), sharded loaders
    recipe/        the training recipe: models, data, augmentation, train()
    deploy/        fold, ONNX, quantization, distillation, the export report
    cli/           the pbp-fast command: demo, train, export
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from pbp_fast import ops
from pbp_fast.ops import backends, reference

__version__ = "0.1.0"

# Import paths of modules that moved into the layers above: ``import pbp_fast.nn`` and
# ``pbp_fast.nn`` give the very module object of ``pbp_fast.core`` (not a copy).
MOVED = {
    "functional": "pbp_fast.ops", "reference": "pbp_fast.ops.reference",
    "nn": "pbp_fast.core", "conversion": "pbp_fast.core.conversion",
    "controller": "pbp_fast.core.controller", "history": "pbp_fast.core.history",
    "models": "pbp_fast.recipe.models", "data": "pbp_fast.recipe.data",
    "augment": "pbp_fast.recipe.augment", "train": "pbp_fast.recipe",
    "checkpoint": "pbp_fast.recipe.checkpoint", "demo": "pbp_fast.recipe.demo",
    "quantize": "pbp_fast.deploy.quantize", "distill": "pbp_fast.deploy.distill",
    "export": "pbp_fast.deploy.report",
}
# Names of the API, loaded on first use (they pull in heavier dependencies).
_LAZY = {
    "convert": ("pbp_fast.core", "convert"),
    "count_parameters": ("pbp_fast.core", "count_parameters"),
    "PerforatedBackprop": ("pbp_fast.core", "PerforatedBackprop"),
    "PBConfig": ("pbp_fast.core", "PBConfig"),
    "core": ("pbp_fast.core", None), "recipe": ("pbp_fast.recipe", None),
    "deploy": ("pbp_fast.deploy", None), "distributed": ("pbp_fast.distributed", None),
    **{name: (target, None) for name, target in MOVED.items()},
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``pbp_fast.<old name>`` for each :data:`MOVED` entry and gives the new module."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name.rpartition(".")[2]])
        spec.loader_state = module.__spec__  # the import system sets __spec__: restored below
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.append(_MovedModules())


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pbp_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


__all__ = ["backends", "ops", "reference", *_LAZY]
