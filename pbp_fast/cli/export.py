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
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pbp_fast.deploy import quantize
from pbp_fast.deploy.onnx import DEFAULT_OPSET, require
from pbp_fast.deploy.report import export_variants, format_report, machine, report_model
from pbp_fast.recipe import data as data_mod
from pbp_fast.recipe.checkpoint import load_checkpoint
from pbp_fast.recipe.config import TrainConfig
from pbp_fast.recipe.trainer import load_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET,
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
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def parse_threads(text: str) -> tuple[int | None, ...]:
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
    names = set(TrainConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in names and k not in ("resume",)}
    if data is not None:
        kwargs["data"] = data
    return load_data(TrainConfig(**kwargs))


def run(args: argparse.Namespace) -> int:
    """``pbp-fast export``: write the files, print the table, write report.json."""
    try:
        _check_args(args)
        threads = parse_threads(args.threads)
        model, config = load_checkpoint(args.checkpoint)
        splits = _load_splits(config, args.data)
        require("onnx", "onnxruntime", purpose="pbp-fast export")
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
