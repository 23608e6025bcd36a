"""The backends of the ops and the choice between them.

- ``"reference"``: :mod:`pbp_fast.ops.reference`, plain PyTorch, always there.
- ``"cpp"``: the compiled extension ``pbp_fast._C`` (schemas in csrc/ops.cpp, CPU kernels in
  csrc/cpu); on CUDA tensors its ops run the Triton launchers of kernels/.
- ``"triton"``: the Triton ops ``torch.ops.pbp_fast.triton_*`` (kernels/), on a CUDA device or
  Triton's CPU interpreter (``TRITON_INTERPRET=1``, which the tests use).
"""
from __future__ import annotations

import os

import torch

try:
    from pbp_fast import _C  # noqa: F401  (registers the pbp_fast:: ops and their CPU kernels)
    HAVE_C = True
except ImportError:  # pragma: no cover - exercised only without a build
    HAVE_C = False

__all__ = ["HAVE_C", "backends", "triton_available", "triton_interpreted", "triton_ops",
           "pick_backend", "state_backend", "fused"]

NAMES = ("reference", "cpp", "triton")


def backends() -> list[str]:
    """The backends usable in this process, best last: "reference" always, "cpp" when the compiled
    extension loaded, "triton" when Triton imports and a CUDA device (or the interpreter) is
    present."""
    out = ["reference"]
    if HAVE_C:
        out.append("cpp")
    if triton_available():
        out.append("triton")
    return out


_TRITON: list = []  # the probe's result, once per process (asked on every op call)


def triton_available() -> bool:
    """Triton imports and has somewhere to run: a CUDA device, or its CPU interpreter."""
    if not _TRITON:
        ok = (torch.cuda.is_available() or triton_interpreted()) and hasattr(torch.library,
                                                                            "triton_op")
        if ok:
            try:
                import triton  # noqa: F401
            except ImportError:
                ok = False
        _TRITON.append(ok)
    return _TRITON[0]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_ops():
    """``torch.ops.pbp_fast`` with the Triton ops (``triton_*``) registered (on first call)."""
    import pbp_fast.kernels.candidate  # noqa: F401  (registers the ops on first import)
    import pbp_fast.kernels.dendritic_conv2d  # noqa: F401
    return torch.ops.pbp_fast


def pick_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs an op on ``x``: "auto" takes Triton on CUDA (but for float64), the
    C++ kernels for float32/float64 on the CPU, else the reference; a named backend is checked
    against what is available and what it can run."""
    avail = backends()
    if backend == "auto":
        if x.device.type == "cuda" and "triton" in avail and x.dtype != torch.float64:
            return "triton"
        if x.device.type == "cpu" and "cpp" in avail and x.dtype in (torch.float32,
                                                                     torch.float64):
            return "cpp"
        return "reference"
    if backend not in NAMES:
        raise ValueError(f"backend must be 'auto', 'reference', 'cpp' or 'triton', got {backend!r}")
    if backend not in avail:
        raise ValueError(f"backend {backend!r} is not available here (available: {avail})")
    if backend == "cpp" and (x.device.type != "cpu" or x.dtype not in (torch.float32,
                                                                       torch.float64)):
        raise ValueError(f"backend 'cpp' runs float32/float64 CPU tensors, got {x.dtype} on "
                         f"{x.device}")
    if backend == "triton" and x.device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"{x.device}")
    return backend


def state_backend(backend: str, mean: torch.Tensor) -> str:
    """The backend of a candidate's bookkeeping, whose state is float64 whatever the unit's
    dtype: "auto" takes the fused op of the state's device (C++ on the CPU, Triton on CUDA)."""
    if backend == "auto":
        avail = backends()
        if mean.device.type == "cpu" and "cpp" in avail:
            return "cpp"
        return "triton" if mean.device.type == "cuda" and "triton" in avail else "reference"
    return pick_backend(backend, mean)


def fused(name: str, backend: str):
    """The registered op ``name`` of a fused backend ("cpp": the C++ op, whose CUDA kernel is
    the Triton launcher; "triton": the Triton op itself)."""
    if backend == "triton":
        return getattr(triton_ops(), "triton_" + name)
    return getattr(torch.ops.pbp_fast, name)
