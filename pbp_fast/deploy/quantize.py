"""Post-training quantization of an exported ONNX model (:func:`pbp_fast.deploy.export_onnx`):
static int8 with calibration data, dynamic int8, and float16.

    quantize_static_int8("model.onnx", "model.int8.onnx", calibration_batches)
    quantize_dynamic_int8("model.onnx", "model.int8-dynamic.onnx")
    convert_float16("model.onnx", "model.fp16.onnx")

- **Static int8** (ONNX Runtime ``quantize_static``, QDQ format): 8-bit weights with one scale
  per output channel, 8-bit activations with ranges from running the model on a few hundred
  training images.  Convolutions, the classifier and the elementwise ops all run in int8.  The
  choice for CNNs: about 4x smaller than float32, and the fastest on CPUs with int8 dot-product
  instructions (VNNI, ARM dotprod).  See :data:`INT8_DTYPES` for the signed / unsigned choice.
- **Dynamic int8** (``quantize_dynamic``): weights int8; activation scales are computed at run
  time, per batch, so no calibration data are needed.  Only matrix multiplications are
  quantized (ONNX Runtime runs convolutions quantized this way as ConvInteger, which is slower
  than float on CPUs), so for a CNN it shrinks only the classifier: right for models dominated by
  Linear layers (MLPs, transformers), or when no representative data exist.
- **float16**: every float tensor (weights, activations) in half precision, inputs and outputs
  kept float32 with a Cast at each end.  Half the size, accuracy of float32 to ~3 digits; fast
  on GPUs and on CPUs with half-precision arithmetic (ARM v8.2+), while on x86 CPUs ONNX Runtime
  computes in float32 behind casts (no speed-up).
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from pbp_fast.deploy.onnx import INPUT_NAME, require

__all__ = ["quantize_static_int8", "quantize_dynamic_int8", "convert_float16",
           "CALIBRATION_METHODS", "INT8_DTYPES"]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Activation / weight types of static int8.  ONNX Runtime's x86 kernels for u8s8 multiply with
# VPMADDUBSW, whose int16 sums saturate on CPUs without VNNI; on such a CPU (AVX2, Zen 3)
# calibrated dendritic MobileNets lost 2 to 4.5 points of accuracy with u8s8 and at most one
# test image in 359 with u8u8, and s8s8 ran 4x slower.  u8u8 is accurate everywhere; u8s8 is
# the fastest choice on VNNI / ARM CPUs.
INT8_DTYPES = {"u8u8": "uint8 activations, uint8 weights (default: accurate on every CPU)",
               "u8s8": "uint8 activations, int8 weights (fastest with VNNI or on ARM; "
                       "saturates on x86 without VNNI)",
               "s8s8": "int8 activations and weights (slow on x86 without VNNI)"}


def _check_paths(model_path, out_path) -> tuple[Path, Path]:
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model_path: no ONNX file at {model_path}")
    if model_path.resolve() == out_path.resolve():
        raise ValueError(f"out_path must differ from model_path ({model_path})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return model_path, out_path


def _calibration_batches(calibration: Iterable, batch_size: int) -> list[np.ndarray]:
    """The calibration images as float32 batches of exactly ``batch_size`` (ONNX Runtime's
    histogram calibrators need equal shapes); a remainder smaller than a batch is left out
    unless it is all there is."""
    if calibration is None or isinstance(calibration, (str, bytes)):
        raise TypeError(f"calibration must be an iterable of input batches, got "
                        f"{type(calibration).__name__}")
    arrays = []
    for batch in calibration:
        if isinstance(batch, (tuple, list)):   # (images, labels) from a data loader
            batch = batch[0]
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().to("cpu", torch.float32).numpy()
        arrays.append(np.asarray(batch, dtype=np.float32))
    if not arrays:
        raise ValueError("calibration yielded no batches")
    images = np.concatenate(arrays)
    n = len(images) if len(images) <= batch_size else len(images) - len(images) % batch_size
    return [np.ascontiguousarray(images[i:i + batch_size]) for i in range(0, n, batch_size)]


class _Reader:
    """An ONNX Runtime ``CalibrationDataReader`` over a list of batches."""

    def __init__(self, batches: list[np.ndarray], input_name: str):
        self._batches, self._name, self._i = batches, input_name, 0

    def get_next(self):
        if self._i == len(self._batches):
            return None
        self._i += 1
        return {self._name: self._batches[self._i - 1]}

    def rewind(self):
        self._i = 0


@contextlib.contextmanager
def _quiet():
    """Silence ONNX Runtime's quantization tool, which logs and prints progress."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _preprocess(model_path: Path, tmp: Path) -> Path:
    """ONNX Runtime's recommended pre-quantization pass: graph optimisation (e.g. Conv + Add
    fusion candidates) and shape inference.  Falls back to the model as it is if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    out = tmp / "preprocessed.onnx"
    try:
        with _quiet():
            quant_pre_process(str(model_path), str(out), skip_symbolic_shape=False)
        return out
    except Exception as exc:  # noqa: BLE001 - an optional step; say why it was skipped
        warnings.warn(f"ONNX Runtime's pre-quantization pass failed ({exc}); quantizing the "
                      f"model as exported", stacklevel=3)
        return model_path


def quantize_static_int8(model_path, out_path, calibration: Iterable, *,
                         per_channel: bool = True, method: str = "minmax",
                         dtypes: str = "u8u8", reduce_range: bool = False,
                         batch_size: int = 32, input_name: str = INPUT_NAME) -> Path:
    """Static int8 quantization in QDQ format, calibrated on ``calibration``: an iterable of
    input batches (tensors or arrays, or ``(images, labels)`` pairs as a data loader yields; a
    few hundred images in all is enough; they are re-batched by ``batch_size``).

    ``per_channel``: one weight scale per output channel (else per tensor).  ``method``: how the
    activation ranges are set: ``"minmax"`` (the observed range), ``"percentile"`` (99.999th
    percentile) or ``"entropy"`` (KL divergence).  ``dtypes``: activations / weights,
    ``"u8u8"`` (default), ``"u8s8"`` or ``"s8s8"`` (see :data:`INT8_DTYPES`); ``reduce_range``
    quantizes weights to 7 bits, the other cure for u8s8 saturation.  Writes ``out_path``;
    returns it."""
    require("onnx", "onnxruntime", purpose="quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    model_path, out_path = _check_paths(model_path, out_path)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if dtypes not in INT8_DTYPES:
        raise ValueError(f"dtypes must be one of {tuple(INT8_DTYPES)}, got {dtypes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    reader = _Reader(_calibration_batches(calibration, batch_size), input_name)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    with tempfile.TemporaryDirectory() as tmp:
        src = _preprocess(model_path, Path(tmp))
        with _quiet():
            quantize_static(str(src), str(out_path), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=types[dtypes[:2]], weight_type=types[dtypes[2:]],
                            calibrate_method=methods[method])
    return out_path


def quantize_dynamic_int8(model_path, out_path, *, per_channel: bool = True) -> Path:
    """Dynamic int8 quantization: int8 weights for the matrix multiplications (MatMul / Gemm),
    activation scales computed at run time.  Convolutions stay float32 (see the module doc).
    Writes ``out_path``; returns it."""
    require("onnx", "onnxruntime", purpose="quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model_path, out_path = _check_paths(model_path, out_path)
    with _quiet():
        quantize_dynamic(str(model_path), str(out_path),
                         op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                         weight_type=QuantType.QInt8)
    return out_path


_HALF_MAX = float(np.finfo(np.float16).max)


def _to_half(tensor, where: str):
    from onnx import numpy_helper
    arr = numpy_helper.to_array(tensor)
    if arr.size and np.abs(arr).max() > _HALF_MAX:
        warnings.warn(f"{where}: values beyond the float16 range (|x| > {_HALF_MAX:g}) are "
                      f"clipped", stacklevel=4)
        arr = np.clip(arr, -_HALF_MAX, _HALF_MAX)
    tensor.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), tensor.name))


def convert_float16(model_path, out_path, *, keep_io_types: bool = True) -> Path:
    """Convert every float32 tensor of the model (initializers, constants, Cast targets) to
    float16.  With ``keep_io_types`` the graph's float inputs and outputs stay float32, with a
    Cast node at each end, so callers feed and read the same arrays as before.  Values beyond
    the float16 range are clipped (with a warning).  Writes ``out_path``; returns it."""
    onnx = require("onnx", "onnxruntime", purpose="quantization")
    from onnx import TensorProto, helper
    model_path, out_path = _check_paths(model_path, out_path)
    model = onnx.load(str(model_path))
    graph = model.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    for init in graph.initializer:
        if init.data_type == f32:
            _to_half(init, f"initializer {init.name}")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH or attr.type == onnx.AttributeProto.GRAPHS:
                raise ValueError(f"convert_float16 handles flat graphs only; node {node.name} "
                                 f"({node.op_type}) has a subgraph")
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f32:
                _to_half(attr.t, f"node {node.name}")
            if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                attr.i = f16
    casts = {False: [], True: []}  # Casts before the graph (inputs) and after it (outputs)
    for is_out, values in ((False, graph.input), (True, graph.output)):
        for value in values:
            if value.type.tensor_type.elem_type != f32:
                continue
            if not keep_io_types:
                value.type.tensor_type.elem_type = f16
                continue
            name, half = value.name, value.name + "_fp16"
            for node in graph.node:  # the graph now reads (and writes) the float16 twin
                node.input[:] = [half if n == name else n for n in node.input]
                if is_out:
                    node.output[:] = [half if n == name else n for n in node.output]
            src, dst, to, tag = (half, name, f32, "fp32") if is_out else (name, half, f16, "fp16")
            casts[is_out].append(helper.make_node("Cast", [src], [dst], to=to,
                                                  name=f"cast_{name}_to_{tag}"))
    nodes = casts[False] + list(graph.node) + casts[True]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]                      # stale float32 annotations; inferred anew
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path
