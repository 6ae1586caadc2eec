"""Command line: ``python -m hypernetwork_ext <command>`` (also installed as ``hypernetwork``)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import HypernetworkError


def _demo(args: argparse.Namespace) -> int:
    from .network import create
    from .tiny import TINY_WIDTHS

    network = create(TINY_WIDTHS, (1, 2, 1), "relu", seed=args.seed, name="demo")
    print(network.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypernetwork", description="Hypernetworks for Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except HypernetworkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
