"""Export a model to ONNX (folded first: :func:`pbp_fast.deploy.fold`) and check the export
with ONNX Runtime.

    path = pbp.deploy.export_onnx(model, "model.onnx", torch.randn(1, 3, 32, 32))
    pbp.deploy.verify_onnx(path, model, images)     # ONNX Runtime vs PyTorch, raises if apart
"""
from __future__ import annotations

import copy
import importlib
import warnings
from pathlib import Path

import torch
from torch import nn

from pbp_fast.deploy.fold import fold

__all__ = ["export_onnx", "onnx_session", "verify_onnx", "DEFAULT_OPSET", "INPUT_NAME",
           "OUTPUT_NAME", "require"]

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def require(*modules: str, purpose: str = "ONNX export"):
    """The first of ``modules`` imported (all of them must import), or an ``ImportError`` that
    says how to install them."""
    try:
        return [importlib.import_module(m) for m in modules][0]
    except ImportError as exc:
        raise ImportError(f"{purpose} needs {' and '.join(modules)}: pip install "
                          f"'pbp_fast[deploy]' (onnx, onnxruntime)") from exc


def export_onnx(model: nn.Module, path, example_input: torch.Tensor, *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                metadata: dict[str, str] | None = None) -> Path:
    """Fold ``model`` (:func:`fold`) and write it as one self-contained ONNX file at ``path``.

    ``example_input``: a float tensor of the model's input shape (its batch size does not matter
    with ``dynamic_batch``).  The graph has one input ``"input"`` and one output ``"logits"``;
    with ``dynamic_batch`` their first dimension is ``"batch"``.  ``metadata`` goes into the
    model's metadata_props (e.g. the input normalisation).  The exporter is PyTorch's
    TorchScript-based one (``torch.onnx.export(..., dynamo=False)``), default opset 17.
    Returns the path."""
    onnx = require("onnx")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise TypeError(f"example_input must be a floating-point tensor, got "
                        f"{getattr(example_input, 'dtype', type(example_input).__name__)}")
    if not isinstance(opset, int) or not 13 <= opset <= 20:
        raise ValueError(f"opset must be an int in [13, 20] (per-channel quantization needs "
                         f">= 13), got {opset!r}")
    folded = fold(model).to("cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(folded, (example_input.detach().to("cpu", torch.float32),), str(path),
                          dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    proto.producer_name = "pbp_fast"
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def onnx_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` with all graph optimisations; ``threads`` sets
    the intra-op thread count (None: ONNX Runtime's default, all cores)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_onnx(path, model: nn.Module, inputs: torch.Tensor, *, rtol: float = 1e-4,
                atol: float = 1e-4) -> float:
    """Run the ONNX file at ``path`` with ONNX Runtime on ``inputs`` and compare with
    ``model.eval()`` in PyTorch (on a copy: ``model``'s mode is left as it was).  Returns the
    largest absolute difference; raises ``AssertionError`` naming it when any output differs
    by more than ``atol + rtol * |expected|``."""
    model = copy.deepcopy(model).eval().to("cpu")
    x = inputs.detach().to("cpu", torch.float32)
    expected = model(x).float()
    got = torch.from_numpy(onnx_session(path).run(None, {INPUT_NAME: x.numpy()})[0]).float()
    if got.shape != expected.shape:
        raise AssertionError(f"ONNX output has shape {tuple(got.shape)}, PyTorch "
                             f"{tuple(expected.shape)}")
    err = (got - expected).abs()
    worst = float(err.max()) if err.numel() else 0.0
    if bool((err > atol + rtol * expected.abs()).any()):
        raise AssertionError(f"ONNX Runtime and PyTorch differ by up to {worst:.3g} (atol "
                             f"{atol}, rtol {rtol}) on {path}")
    return worst
