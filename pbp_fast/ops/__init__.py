"""The op layer: PB's math as registered PyTorch ops, with one plain-PyTorch reference.

    reference.py          the math in plain PyTorch: the oracle of every kernel, and the fallback
    dendritic_conv2d.py   the dendritic conv: public function, fakes, autograd formula
    candidate.py          the candidate pass and its bookkeeping: public functions, fakes
    checks.py             argument checks (each error names the argument)
    backend.py            the backends ("reference", "cpp", "triton") and the choice between them
    layout.py             shapes and memory layouts, shared with the Triton launchers (kernels/)

The schemas are in csrc/ops.cpp (``TORCH_LIBRARY(pbp_fast)``), the CPU kernels in csrc/cpu, the
Triton kernels in kernels/ (installed as ``pbp_fast.kernels``).  Importing this package
registers the fake implementations and the autograd formula of the C++ ops; on a CUDA machine
with Triton it also makes the Triton launchers the C++ ops' CUDA kernels.

``pbp_fast.functional`` is this package: its public functions are the ops' user API.
"""
from __future__ import annotations

import torch

from pbp_fast.ops import candidate as _candidate
from pbp_fast.ops import dendritic_conv2d as _dendritic_conv2d
from pbp_fast.ops import reference
from pbp_fast.ops.backend import (HAVE_C, backends, triton_available, triton_interpreted,
                                  triton_ops)
from pbp_fast.ops.candidate import (candidate_objective, candidate_pass, candidate_pass_bn,
                                     candidate_update)
from pbp_fast.ops.dendritic_conv2d import (BWD_INPUTS, dendritic_conv2d,
                                           dendritic_conv2d_with_s)
from pbp_fast.ops.layout import conv_out_hw, conv_out_size, is_channels_last

__all__ = ["dendritic_conv2d", "dendritic_conv2d_with_s", "candidate_pass", "candidate_pass_bn",
           "candidate_objective", "candidate_update", "backends", "reference", "HAVE_C",
           "BWD_INPUTS", "triton_available", "triton_interpreted", "triton_ops",
           "is_channels_last", "conv_out_size", "conv_out_hw", "register"]


def register(prefix: str, fakes: bool = True) -> None:
    """Register the autograd formula of ``pbp_fast::{prefix}dendritic_conv2d_fwd`` and, with
    ``fakes``, the fake implementations of every ``pbp_fast::{prefix}*`` op (the Triton ops,
    made by ``triton_op``, bring their own)."""
    _dendritic_conv2d.register(prefix, fakes)
    if fakes:
        _candidate.register(prefix)


if HAVE_C:
    register("")
    if torch.cuda.is_available() and triton_available():
        triton_ops()  # the C++ ops' CUDA kernels are the Triton launchers (kernels/)
