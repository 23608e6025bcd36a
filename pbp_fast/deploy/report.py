"""Deployable files from a trained model and their size / latency / accuracy report: the library
behind ``pbp-fast export`` (:mod:`pbp_fast.cli.export`).

    paths = export_variants(model, "export/", example, variants=["fp32", "fp16", "int8"],
                            calibration=loader)
    print(format_report(report_model(model, paths, example, test_loader=loader)))
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pbp_fast.deploy import onnx as onnx_io
from pbp_fast.deploy import quantize
from pbp_fast.deploy.fold import fold
from pbp_fast.recipe.records import format_table

__all__ = ["VariantReport", "machine", "measure_latency", "export_variants", "evaluate_onnx",
           "report_model", "format_report", "FILES"]

FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx",
         "int8-dynamic": "model.int8-dynamic.onnx", "int8": "model.int8.onnx"}
_LABELS = {"eager": "pytorch eager fp32", "fp32": "onnx fp32", "fp16": "onnx fp16",
           "int8-dynamic": "onnx int8 dynamic", "int8": "onnx int8 static"}


@dataclass
class VariantReport:
    """One row of the report: ``latency_ms`` maps a thread count to the median milliseconds of
    one batch-1 inference; ``accuracy`` in % (None when not evaluated)."""
    variant: str
    file: str | None
    size_mb: float | None
    latency_ms: dict[int, float] = field(default_factory=dict)
    accuracy: float | None = None

    @property
    def label(self) -> str:
        return _LABELS.get(self.variant, self.variant)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

def measure_latency(runners: dict[str, Callable[[], object]], *, runs: int = 200,
                    warmup: int = 20, rounds: int = 5) -> dict[str, float]:
    """Median wall-clock milliseconds of one call of each runner, after ``warmup`` calls.  The
    ``runs`` timed calls are split into ``rounds`` that alternate between the runners, so that a
    change of load on a shared machine affects all of them alike."""
    if not isinstance(runs, int) or runs < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"runs must be an int >= 1 and warmup an int >= 0, got runs={runs!r}, "
                         f"warmup={warmup!r}")
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    rounds = max(1, min(rounds, runs))
    for r in range(rounds):
        n = runs // rounds + (r < runs % rounds)
        for name, fn in runners.items():
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def evaluate_onnx(path, loader, threads: int | None = None) -> float:
    """Top-1 accuracy (%) of the ONNX model at ``path`` over ``loader`` (batches of normalised
    images and labels)."""
    sess = onnx_io.onnx_session(path, threads)
    correct = total = 0
    for x, y in loader:
        logits = sess.run(None, {onnx_io.INPUT_NAME: x.detach().cpu().float().numpy()})[0]
        correct += int((np.argmax(logits, 1) == y.cpu().numpy()).sum())
        total += len(y)
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def _evaluate_torch(model: nn.Module, loader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.cpu()).argmax(1) == y.cpu()).sum())
        total += len(y)
    return 100.0 * correct / max(1, total)


def machine() -> str:
    """The CPU model and core count, for reports."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    return (f"{name}, {os.cpu_count()} cores; torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}")


class _Threads:
    """Set torch's intra-op thread count for a block."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


# ----------------------------------------------------------------------------------------------
# Export and report
# ----------------------------------------------------------------------------------------------

def export_variants(model: nn.Module, out_dir, example_input: torch.Tensor, *,
                    variants=("fp32",), calibration=None, calibration_method: str = "minmax",
                    per_channel: bool = True, int8_dtypes: str = "u8u8",
                    reduce_range: bool = False, opset: int = onnx_io.DEFAULT_OPSET,
                    metadata: dict | None = None, check_inputs: torch.Tensor | None = None
                    ) -> dict[str, Path]:
    """Write the ONNX files of ``variants`` (keys of :data:`FILES`; the float32 file is always
    written, the others derive from it) into ``out_dir``; returns ``{variant: path}``.
    ``calibration``: input batches for ``"int8"``.  ``check_inputs``: images on which the float32
    file must match PyTorch (:func:`pbp_fast.deploy.verify_onnx`)."""
    unknown = set(variants) - set(FILES)
    if unknown:
        raise ValueError(f"variants must be among {sorted(FILES)}, got {sorted(unknown)}")
    if "int8" in variants and calibration is None:
        raise ValueError("calibration batches are needed for the 'int8' variant")
    out_dir = Path(out_dir)
    paths = {"fp32": onnx_io.export_onnx(model, out_dir / FILES["fp32"], example_input,
                                        opset=opset, metadata=metadata)}
    if check_inputs is not None:
        onnx_io.verify_onnx(paths["fp32"], model, check_inputs, rtol=1e-3, atol=1e-4)
    if "fp16" in variants:
        paths["fp16"] = quantize.convert_float16(paths["fp32"], out_dir / FILES["fp16"])
    if "int8-dynamic" in variants:
        paths["int8-dynamic"] = quantize.quantize_dynamic_int8(
            paths["fp32"], out_dir / FILES["int8-dynamic"], per_channel=per_channel)
    if "int8" in variants:
        paths["int8"] = quantize.quantize_static_int8(
            paths["fp32"], out_dir / FILES["int8"], calibration, per_channel=per_channel,
            method=calibration_method, dtypes=int8_dtypes, reduce_range=reduce_range)
    if metadata:  # the quantizers drop metadata_props: put it back
        for name, path in paths.items():
            if name != "fp32":
                _set_metadata(path, metadata)
    return paths


def _set_metadata(path: Path, metadata: dict) -> None:
    import onnx
    proto = onnx.load(str(path))
    have = {p.key for p in proto.metadata_props}
    for key, value in metadata.items():
        if key not in have:
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
    onnx.save(proto, str(path))


def report_model(model: nn.Module, paths: dict[str, Path], example_input: torch.Tensor, *,
                 test_loader=None, threads=(1, None), runs: int = 200, warmup: int = 20
                 ) -> list[VariantReport]:
    """Size, batch-1 latency (per thread count in ``threads``; None = all cores) and, with
    ``test_loader``, accuracy of PyTorch eager ``model`` (a copy, in eval mode on the CPU) and of
    each ONNX file in ``paths``."""
    model = copy.deepcopy(model).eval().cpu()
    x = example_input[:1].detach().cpu().float()
    xn = x.numpy()
    counts = [(os.cpu_count() or 1) if t is None else int(t) for t in threads]
    weights = sum(t.numel() * t.element_size() for t in fold(model).state_dict().values())
    rows = [VariantReport("eager", None, weights / 1e6)]
    rows += [VariantReport(name, path.name, path.stat().st_size / 1e6)
             for name, path in paths.items()]
    for n in dict.fromkeys(counts):
        sessions = {name: onnx_io.onnx_session(path, n) for name, path in paths.items()}
        runners: dict[str, Callable[[], object]] = {"eager": lambda: model(x)}
        for name, sess in sessions.items():
            runners[name] = (lambda s: lambda: s.run(None, {onnx_io.INPUT_NAME: xn}))(sess)
        with _Threads(n), torch.no_grad():
            medians = measure_latency(runners, runs=runs, warmup=warmup)
        for row in rows:
            row.latency_ms[n] = medians[row.variant]
    if test_loader is not None:
        rows[0].accuracy = _evaluate_torch(model, test_loader)
        for row in rows[1:]:
            row.accuracy = evaluate_onnx(paths[row.variant], test_loader)
    return rows


def format_report(rows: list[VariantReport]) -> str:
    """The report as a plain-text table (accuracy change relative to the first row)."""
    counts = sorted({n for r in rows for n in r.latency_ms})
    ref = rows[0].accuracy if rows else None
    cells = []
    for r in rows:
        change = None if r.accuracy is None or ref is None or r is rows[0] else r.accuracy - ref
        cells.append({"label": r.label, "file": r.file or "-", "size": r.size_mb,
                      "accuracy": r.accuracy, "change": change,
                      **{f"ms{n}": r.latency_ms.get(n) for n in counts}})
    columns = [("variant", "label", ""), ("file", "file", ""), ("size MB", "size", ".2f")]
    columns += [(f"ms {n} thread{'s' * (n > 1)}", f"ms{n}", ".2f") for n in counts]
    if any(r.accuracy is not None for r in rows):
        columns += [("test acc %", "accuracy", ".2f"), ("change", "change", "+.2f")]
    return format_table(cells, columns, left=2)
