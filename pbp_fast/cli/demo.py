"""``pbp-fast demo``: the baseline-vs-PB comparison of :mod:`pbp_fast.recipe.demo`, printed."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pbp_fast.recipe.demo import DESCRIPTION, demo_configs, run_demo


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="baseline vs PB on a small data set (offline, CPU)",
                              description=DESCRIPTION,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 (.npz or folder) instead of the built-in digits")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run of a few seconds (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (None: 1 for the digits, whose tiny "
                             "network gains nothing from more; PyTorch's choice for CIFAR-10)")


def run(args: argparse.Namespace) -> int:
    threads = args.threads if args.threads is not None else (1 if args.data is None else None)
    if threads is not None:
        if threads < 1:
            sys.exit("pbp-fast demo: error: --threads must be >= 1")
        torch.set_num_threads(threads)
    try:
        summary = run_demo(args.data, args.out, args.quick, args.seed, args.device)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"pbp-fast demo: error: {exc}")
    base, pb = summary["rows"]
    cfg = demo_configs(args.data, quick=args.quick)[0]
    size = cfg.image_size
    data = (f"CIFAR-10 ({args.data})" if args.data is not None else
            f"digits (8x8, upsampled to {size}x{size})" if size != 8 else "digits (8x8)")
    print(f"\n{cfg.model} x{cfg.width_mult:g} on {data}, {base['epochs']} epochs each, "
          f"{torch.get_num_threads()} CPU thread(s)\n")
    print(summary["table"])
    gain = pb["test_acc"] - base["test_acc"]
    extra = pb["params"] - base["params"]
    print(f"\nPB: {gain:+.2f} points of test accuracy with {extra:+,} parameters "
          f"({pb['num_dendrites']} dendrites per unit); total {summary['seconds']:.0f} s")
    if summary["figure"]:
        record = Path(args.out) / "pb" / "pb_history.png"
        print(f"figure: {summary['figure']} (the controller's record: {record})")
    return 0
