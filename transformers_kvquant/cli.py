"""`kvquant` command line. Each feature module contributes its sub-commands through ``register_cli(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add sub-commands; each defines register_cli(subparsers) and sets `func` on its parsers.
COMMAND_MODULES = (
    "transformers_kvquant.calibration",
    "transformers_kvquant.evaluation.perplexity",
    "transformers_kvquant.evaluation.fidelity",
    "transformers_kvquant.hub_cli",
    "transformers_kvquant.demo",
)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvquant", description="KVQuant KV-cache quantization for transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Skip a command whose module (or its parent package) is absent; re-raise a missing dependency.
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        module.register_cli(sub)
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
