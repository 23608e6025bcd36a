"""``pbp-fast train``: one run of the recipe (:func:`pbp_fast.recipe.train`), and its table."""
from __future__ import annotations

import argparse
import sys

from pbp_fast import distributed
from pbp_fast.recipe.flags import add_train_arguments, config_from_args
from pbp_fast.recipe.records import RESULT_COLUMNS, format_table
from pbp_fast.recipe.trainer import train


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a CIFAR MobileNet, optionally with dendrites",
                              description="Train a MobileNet on CIFAR-10 (or the digits), "
                                          "optionally with Perforated Backpropagation.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``pbp-fast train``: run and print the final table.  Invalid settings and missing files
    end the program with a one-line message."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        sys.exit(f"pbp-fast train: error: {exc}")
    try:
        result = train(cfg)
    except FileNotFoundError as exc:
        sys.exit(f"pbp-fast train: error: {exc}")
    main = distributed.is_main()
    distributed.shutdown()  # the command owns the process group that train() joined
    if not main:
        return 0
    row = result.summary()
    row["name"] = f"{cfg.model} x{cfg.width_mult:g}{' + PB' if cfg.dendrites else ''}"
    print(format_table([row], RESULT_COLUMNS))
    print(f"output: {result.output_dir}")
    return 0
