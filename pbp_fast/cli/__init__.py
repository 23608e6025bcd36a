"""``pbp-fast``: the command line.  Each command is a module of this package with
``add_parser(subparsers)``, which registers its parser and sets ``run`` (``args -> exit code``):

    demo     baseline vs PB on the digits (offline), or CIFAR-10    (pbp_fast.recipe.demo)
    train    one training run, optionally with dendrites             (pbp_fast.recipe.trainer)
    export   fold, ONNX, quantize; size / latency / accuracy report  (pbp_fast.deploy)
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "train", "export")


def build_parser() -> argparse.ArgumentParser:
    from pbp_fast import __version__
    parser = argparse.ArgumentParser(
        prog="pbp-fast", description="Perforated Backpropagation (dendrite-augmented training) "
                                     "for compact CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pbp_fast.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pbp-fast`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
