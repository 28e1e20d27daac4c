"""`kvquant` command line: each sub-command module adds its parsers through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import sys

from . import calibrate, demo, evaluate, hub
from .errors import UserError

# Each defines register(subparsers) and sets `func` on its parsers; this order is the order of `kvquant --help`.
COMMANDS = (calibrate, evaluate, hub, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvquant", description="KVQuant KV-cache quantization for transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        # One line naming the problem and the remedy; tracebacks are for bugs, not for bad input.
        print(f"kvquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
