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
    rows = {r["name"]: r for r in summary["rows"]}
    cfg = demo_configs(args.data, quick=args.quick)["PB"]
    size = cfg.image_size
    data = (f"CIFAR-10 ({args.data})" if args.data is not None else
            f"digits (8x8, upsampled to {size}x{size})" if size != 8 else "digits (8x8)")
    print(f"\n{cfg.model} x{cfg.width_mult:g} on {data}, every run to its plateau (at most "
          f"{cfg.epochs} epochs), {torch.get_num_threads()} CPU thread(s)\n")
    print(summary["table"])
    pb = rows["PB"]
    print()
    for control in ("baseline-ES", "restarts"):
        c = rows[control]
        err, err_c = 100 - pb["test_acc"], 100 - c["test_acc"]
        rel = f", {(err - err_c) / err_c:+.0%} test error" if err_c > 0 else ""
        print(f"PB vs {control}: {pb['test_acc'] - c['test_acc']:+.2f} points of test accuracy"
              f"{rel}, {pb['params'] - c['params']:+,} parameters, "
              f"{pb['epochs'] - c['epochs']:+d} epochs")
    print(f"One seed: differences of this size between seeds are common; bench/pb_controls.py "
          f"runs several. Total {summary['seconds']:.0f} s")
    if summary["figure"]:
        record = Path(args.out) / "PB" / "pb_history.png"
        print(f"figure: {summary['figure']} (the controller's record: {record})")
    return 0
