"""``pbp-fast export``: a trained checkpoint to deployable files, with a size / latency /
accuracy report.

    pbp-fast export runs/my-run/best.pt --fp16 --int8 --int8-dynamic

writes into ``--output-dir`` (default: ``export/`` beside the checkpoint):

- ``model.onnx``               the folded model (:func:`pbp_fast.deploy.fold`), float32, checked
                               against PyTorch with ONNX Runtime on test images
- ``model.fp16.onnx``          ``--fp16``: float16 weights and activations, float32 input/output
- ``model.int8-dynamic.onnx``  ``--int8-dynamic``: int8 weights of the matrix multiplications
- ``model.int8.onnx``          ``--int8``: static int8 (QDQ, per-channel weights), calibrated on
                               ``--calibration-images`` training images
- ``report.json``              the printed table, with the settings and the machine

and prints, for PyTorch eager (the trained model as it is) and each file: the file size, the
median latency of one image (batch 1) with one thread and with all cores, and the test accuracy.
Inputs are normalised images (the ``mean`` / ``std`` stored in each file's metadata).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pbp_fast import deploy, quantize

__all__ = ["VariantReport", "machine", "measure_latency", "export_variants", "evaluate_onnx",
           "report_model", "format_report", "add_export_arguments", "add_parser", "run_cli",
           "FILES"]

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
    sess = deploy.onnx_session(path, threads)
    correct = total = 0
    for x, y in loader:
        logits = sess.run(None, {deploy.INPUT_NAME: x.detach().cpu().float().numpy()})[0]
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
                    reduce_range: bool = False, opset: int = deploy.DEFAULT_OPSET,
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
    paths = {"fp32": deploy.export_onnx(model, out_dir / FILES["fp32"], example_input,
                                        opset=opset, metadata=metadata)}
    if check_inputs is not None:
        deploy.verify_onnx(paths["fp32"], model, check_inputs, rtol=1e-3, atol=1e-4)
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
    weights = sum(t.numel() * t.element_size() for t in deploy.fold(model).state_dict().values())
    rows = [VariantReport("eager", None, weights / 1e6)]
    rows += [VariantReport(name, path.name, path.stat().st_size / 1e6)
             for name, path in paths.items()]
    for n in dict.fromkeys(counts):
        sessions = {name: deploy.onnx_session(path, n) for name, path in paths.items()}
        runners: dict[str, Callable[[], object]] = {"eager": lambda: model(x)}
        for name, sess in sessions.items():
            runners[name] = (lambda s: lambda: s.run(None, {deploy.INPUT_NAME: xn}))(sess)
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
    head = ["variant", "file", "size MB"] + [f"ms {n} thread{'s' * (n > 1)}" for n in counts]
    acc = any(r.accuracy is not None for r in rows)
    head += ["test acc %", "change"] if acc else []
    ref = rows[0].accuracy if rows else None
    cells = [head]
    for r in rows:
        line = [r.label, r.file or "-", "-" if r.size_mb is None else f"{r.size_mb:.2f}"]
        line += [f"{r.latency_ms[n]:.2f}" if n in r.latency_ms else "-" for n in counts]
        if acc:
            line.append("-" if r.accuracy is None else f"{r.accuracy:.2f}")
            line.append("-" if r.accuracy is None or ref is None or r is rows[0]
                        else f"{r.accuracy - ref:+.2f}")
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pbp-fast export`` flags."""
    parser.add_argument("checkpoint", help="a pbp-fast train checkpoint (best.pt / last.pt) or "
                                           "its run folder (best.pt)")
    parser.add_argument("--output-dir", default=None,
                        help="where the files go (default: export/ beside the checkpoint)")
    g = parser.add_argument_group("variants (the float32 model.onnx is always written)")
    g.add_argument("--fp16", action="store_true", help="float16 weights and activations")
    g.add_argument("--int8", action="store_true",
                   help="static int8 (QDQ, per-channel weights) calibrated on training images")
    g.add_argument("--int8-dynamic", action="store_true",
                   help="dynamic int8 (weights of the matrix multiplications only)")
    g.add_argument("--opset", type=int, default=deploy.DEFAULT_OPSET,
                   help="ONNX opset, 13 to 20 (default %(default)s)")
    g = parser.add_argument_group("calibration")
    g.add_argument("--calibration-images", type=int, default=512,
                   help="training images for the int8 activation ranges (default %(default)s)")
    g.add_argument("--calibration-method", default="minmax", choices=quantize.CALIBRATION_METHODS,
                   help="how activation ranges are set (default %(default)s)")
    g.add_argument("--per-tensor", action="store_true",
                   help="one weight scale per tensor instead of per output channel")
    g.add_argument("--int8-dtypes", default="u8u8", choices=tuple(quantize.INT8_DTYPES),
                   help="static int8 activation / weight types: " + "; ".join(
                       f"{k}: {v}" for k, v in quantize.INT8_DTYPES.items()).replace("%", "%%"))
    g.add_argument("--reduce-range", action="store_true", help="7-bit weights (static int8)")
    g = parser.add_argument_group("report")
    g.add_argument("--data", default=None,
                   help="the data set, when it is not where the checkpoint's run found it")
    g.add_argument("--eval-images", type=int, default=None,
                   help="test images for the accuracy column (default: the whole test split)")
    g.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="no accuracy column")
    g.add_argument("--runs", type=int, default=200,
                   help="timed runs per variant and thread count (default %(default)s)")
    g.add_argument("--warmup", type=int, default=20,
                   help="untimed runs first (default %(default)s)")
    g.add_argument("--threads", default="1,all",
                   help="comma-separated thread counts for the latency columns, 'all': every "
                        "core (default %(default)s)")
    g.add_argument("-b", "--batch-size", type=int, default=256,
                   help="batch size of evaluation and calibration (default %(default)s)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the ``pbp-fast`` subparsers."""
    p = subparsers.add_parser("export", help="fold, export to ONNX, quantize; size / latency / "
                                             "accuracy report",
                              description="Fold a trained checkpoint into a plain model, export "
                                          "it to ONNX (float32, float16, int8) and report file "
                                          "size, batch-1 latency and test accuracy.")
    add_export_arguments(p)
    p.set_defaults(run=run_cli)
    return p


def _threads(text: str) -> tuple[int | None, ...]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise ValueError(f"--threads must be a comma-separated list of positive ints or "
                             f"'all', got {text!r}")
    return tuple(out)


def _check_args(args) -> None:
    for name, low in (("calibration_images", 1), ("runs", 1), ("warmup", 0),
                      ("batch_size", 1), ("opset", 13)):
        v = getattr(args, name)
        if not isinstance(v, int) or v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {v!r}")
    if args.eval_images is not None and args.eval_images < 1:
        raise ValueError(f"--eval-images must be an int >= 1, got {args.eval_images!r}")


def _load_splits(config: dict, data: str | None):
    from pbp_fast.train import TrainConfig, load_data
    names = set(TrainConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in names and k not in ("resume",)}
    if data is not None:
        kwargs["data"] = data
    return load_data(TrainConfig(**kwargs))


def run_cli(args: argparse.Namespace) -> int:
    """``pbp-fast export``: write the files, print the table, write report.json."""
    from pbp_fast import data as data_mod
    from pbp_fast.checkpoint import load_checkpoint
    try:
        _check_args(args)
        threads = _threads(args.threads)
        model, config = load_checkpoint(args.checkpoint)
        splits = _load_splits(config, args.data)
        for module in ("onnx", "onnxruntime"):
            deploy._needs(module)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        sys.exit(f"pbp-fast export: error: {exc}")
    ckpt = Path(args.checkpoint)
    out = Path(args.output_dir) if args.output_dir else (
        ckpt if ckpt.is_dir() else ckpt.parent) / "export"
    train_set, test_set = splits.train, splits.test
    calib = train_set.subset(data_mod.stratified_order(
        train_set.labels.numpy(), seed=0)[:args.calibration_images])
    if args.eval_images is not None and args.eval_images < len(test_set):
        test_set = test_set.subset(np.sort(data_mod.stratified_order(
            test_set.labels.numpy(), seed=0)[:args.eval_images]))
    test_loader = data_mod.BatchLoader(test_set, args.batch_size)
    calib_loader = data_mod.BatchLoader(calib, args.batch_size)
    example = next(iter(test_loader))[0][:1]
    variants = ["fp32"] + [v for v, on in (("fp16", args.fp16), ("int8-dynamic", args.int8_dynamic),
                                           ("int8", args.int8)) if on]
    metadata = {"model": config.get("model"), "width_mult": config.get("width_mult"),
                "input": f"float32 (N, {', '.join(map(str, test_set.image_shape))}), "
                         f"normalised: (x / 255 - mean) / std",
                "mean": json.dumps(list(test_set.mean)), "std": json.dumps(list(test_set.std)),
                "classes": json.dumps(list(test_set.classes))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        paths = export_variants(model, out, example, variants=variants,
                                calibration=calib_loader, per_channel=not args.per_tensor,
                                calibration_method=args.calibration_method,
                                int8_dtypes=args.int8_dtypes, reduce_range=args.reduce_range,
                                opset=args.opset,
                                metadata=metadata, check_inputs=next(iter(test_loader))[0][:64])
    rows = report_model(model, paths, example,
                        test_loader=test_loader if args.evaluate else None, threads=threads,
                        runs=args.runs, warmup=args.warmup)
    table = format_report(rows)
    print(f"{config.get('model')} x{config.get('width_mult', 1.0):g} from {args.checkpoint}: "
          f"batch 1, median of {args.runs} runs"
          + (f"; accuracy on {len(test_set)} test images" if args.evaluate else "")
          + f"\n{machine()}")
    print(table)
    print(f"output: {out}")
    report = {"checkpoint": str(args.checkpoint), "model": config.get("model"),
              "width_mult": config.get("width_mult"), "opset": args.opset,
              "calibration_images": len(calib), "calibration_method": args.calibration_method,
              "per_channel": not args.per_tensor, "int8_dtypes": args.int8_dtypes,
              "reduce_range": args.reduce_range, "test_images": len(test_set),
              "runs": args.runs, "machine": machine(),
              "rows": [asdict(r) | {"label": r.label} for r in rows]}
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    return 0
