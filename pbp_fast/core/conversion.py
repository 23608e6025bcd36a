"""Model conversion: swap the conv (+ following BatchNorm) and linear layers of any ``nn.Module``
for dendritic units, in place; and parameter counting.

A BatchNorm is folded into a unit only where the data flow proves that it consumes the layer's
output and nothing else does: adjacent entries of an ``nn.Sequential``, or an edge in a
``torch.fx`` trace of the model (or, where the model does not trace, of its submodules).  Other
BatchNorms stay where they are, so conversion never changes what the model computes.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import asdict, dataclass

from torch import fx, nn

from pbp_fast.core.layers import DendriticConv2d, DendriticLinear
from pbp_fast.core.unit import DendriticUnit

_BN = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}


def _kind(m):
    """nn.Conv2d / nn.Linear when ``m`` computes exactly that layer (subclasses that override the
    forward, e.g. dynamic 'same' padding, are left alone), else None."""
    if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward \
            and type(m)._conv_forward is nn.Conv2d._conv_forward \
            and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
        return nn.Conv2d
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward \
            and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
        return nn.Linear
    return None


def _bn_follows(layer, bn):
    kind = _kind(layer)
    n_out = layer.out_channels if kind is nn.Conv2d else getattr(layer, "out_features", None)
    return kind is not None and type(bn) is _BN[kind] and bn.num_features == n_out


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, DendriticUnit) or super().is_leaf_module(m, qualname)


def _traced(module, prefix):
    """What a trace of ``module`` shows (None if it does not trace): ``({layer name: bn name},
    {names of modules whose parameters the forward reads itself})``.  A layer -> BN edge counts
    when each module is called once and the layer's only user is the BN.  A layer whose weight
    the forward reads (e.g. to call a functional op with it) is not computed by calling it, so
    a unit in its place would not run."""
    try:
        graph = _Tracer().trace(module)
    except Exception:  # untraceable forward (data-dependent control flow, ...)
        return None
    read = {prefix + n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    calls = [n for n in graph.nodes if n.op == "call_module"]
    uses = {}
    for n in calls:
        uses[n.target] = uses.get(n.target, 0) + 1
    pairs = {}
    for n in calls:
        users = list(n.users)
        if len(users) != 1 or users[0].op != "call_module" or uses[n.target] != 1:
            continue
        bn_node = users[0]
        if uses[bn_node.target] != 1 or bn_node.args[:1] != (n,) or len(bn_node.args) != 1:
            continue
        layer, bn = module.get_submodule(n.target), module.get_submodule(bn_node.target)
        if _bn_follows(layer, bn):
            pairs[prefix + n.target] = prefix + bn_node.target
    return pairs, read


def _sequential_pairs(module, prefix):
    pairs = {}
    for name, m in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for (a, la), (b, lb) in zip(kids, kids[1:]):
                if _bn_follows(la, lb):
                    pairs[f"{name}.{a}" if name else a] = f"{name}.{b}" if name else b
    return pairs


def _data_flow(module, prefix=""):
    """``({layer name: following BN name}, {modules whose parameters the forward reads})`` over
    the whole model: from a trace of it, else of each submodule that traces (and the
    adjacent entries of an ``nn.Sequential``)."""
    traced = _traced(module, prefix)
    if traced is not None:
        return traced
    pairs = _sequential_pairs(module, prefix) if isinstance(module, nn.Sequential) else {}
    read = set()
    for name, child in module.named_children():
        if not isinstance(child, DendriticUnit):
            child_pairs, child_read = _data_flow(child, prefix + name + ".")
            pairs.update(child_pairs)
            read |= child_read
    return pairs, read


def _matcher(patterns, name):
    if patterns is None:
        return None
    if callable(patterns):
        return patterns
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{name} must be None, a glob string, a list of globs or a callable "
                        f"(name, module) -> bool, got {patterns!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must contain glob strings, got {patterns!r}")
    return lambda qual, _m: any(fnmatch.fnmatchcase(qual, p) for p in patterns)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (as in ``model.named_modules()``) of ``model``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def convert(model: nn.Module, include=None, exclude=None) -> dict[str, DendriticUnit]:
    """Replace, in place, every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` (with the BatchNorm
    that consumes its output, which becomes ``nn.Identity``) by a :class:`DendriticConv2d` /
    :class:`DendriticLinear` unit with no dendrites, so the model computes exactly what it did.

    ``include`` / ``exclude``: None, a glob (``"features.*"``), a list of globs or a callable
    ``(qualified_name, module) -> bool`` selecting layers by their name in
    ``model.named_modules()``.  Layers the fused op cannot express (padding modes other than
    zeros, asymmetric 'same' padding, subclasses with their own forward) and layers whose
    parameters the forward reads instead of calling the layer (torchvision's Swin attention)
    are skipped with a warning.  Returns ``{name: unit}`` for every unit of the model (existing
    ones included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _kind(model) is not None:
        raise TypeError("model is itself a single layer; wrap it (e.g. nn.Sequential(layer)) or "
                        "build the unit directly (pbp_fast.nn.DendriticConv2d / DendriticLinear)")
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude")
    inside_units = set()
    for name, m in model.named_modules():
        if isinstance(m, DendriticUnit):
            inside_units.update(f"{name}.{sub}" for sub, _ in m.named_modules() if sub)
    chosen = {}
    for name, m in model.named_modules():
        if name in inside_units or _kind(m) is None:
            continue
        if (inc is not None and not inc(name, m)) or (exc is not None and exc(name, m)):
            continue
        chosen[name] = m
    pairs, read = _data_flow(model) if chosen else ({}, set())
    for name in sorted(read & set(chosen)):
        warnings.warn(f"pbp_fast.convert: leaving {name} unconverted: the model's forward reads "
                      f"its parameters instead of calling it", stacklevel=2)
        del chosen[name]
    for name, layer in chosen.items():
        bn = model.get_submodule(pairs[name]) if name in pairs else None
        cls = DendriticConv2d if _kind(layer) is nn.Conv2d else DendriticLinear
        try:
            unit = cls(layer, bn)
        except ValueError as err:
            warnings.warn(f"pbp_fast.convert: leaving {name} unconverted: {err}", stacklevel=2)
            continue
        replace_module(model, name, unit)
        if bn is not None:
            replace_module(model, pairs[name], nn.Identity())
    return {n: m for n, m in model.named_modules() if isinstance(m, DendriticUnit)}


@dataclass(frozen=True)
class ParameterCount:
    """Numbers of parameter elements: ``main`` (everything that is not a dendrite or a
    candidate), ``dendrites`` (weights, biases, cascade and alpha of trained dendrites),
    ``candidates``; ``total`` is their sum; ``trainable`` those with requires_grad."""
    total: int
    main: int
    dendrites: int
    candidates: int
    trainable: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.total:,} parameters: {self.main:,} main + {self.dendrites:,} dendrites + "
                f"{self.candidates:,} candidates ({self.trainable:,} trainable)")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count every parameter of ``model`` once (shared ones too), dendrites and candidates apart."""
    dendrite, candidate = set(), set()
    for m in model.modules():
        if isinstance(m, DendriticUnit):
            dendrite.update(id(p) for p in m.dendrite_parameters())
            candidate.update(id(p) for p in m.candidate_parameters())
    sums = dict(main=0, dendrites=0, candidates=0, trainable=0)
    for p in model.parameters():  # deduplicated by nn.Module
        key = "dendrites" if id(p) in dendrite else "candidates" if id(p) in candidate else "main"
        sums[key] += p.numel()
        sums["trainable"] += p.numel() if p.requires_grad else 0
    return ParameterCount(total=sums["main"] + sums["dendrites"] + sums["candidates"], **sums)

