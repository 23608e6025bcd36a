"""``pbp-fast``: the command line.  Each subcommand is one function that adds its parser to the
subparsers and sets ``run`` (``args -> exit code``); :data:`COMMANDS` lists them."""
from __future__ import annotations

import argparse
import sys


def demo_command(subparsers) -> None:
    from pbp_fast import demo
    p = subparsers.add_parser("demo", help="baseline vs PB on a small data set (offline, CPU)",
                              description=demo.DESCRIPTION,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_demo_arguments(p)
    p.set_defaults(run=demo.run_cli)


def train_command(subparsers) -> None:
    from pbp_fast import train
    p = subparsers.add_parser("train", help="train a CIFAR MobileNet, optionally with dendrites",
                              description="Train a MobileNet on CIFAR-10 (or the digits), "
                                          "optionally with Perforated Backpropagation.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_train_arguments(p)
    p.set_defaults(run=train.run_cli)


def export_command(subparsers) -> None:
    from pbp_fast import export
    export.add_parser(subparsers)


COMMANDS = [demo_command, train_command, export_command]


def build_parser() -> argparse.ArgumentParser:
    from pbp_fast import __version__
    parser = argparse.ArgumentParser(
        prog="pbp-fast", description="Perforated Backpropagation (dendrite-augmented training) "
                                     "for compact CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pbp-fast`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
