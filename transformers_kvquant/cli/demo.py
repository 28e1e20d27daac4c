"""``kvquant demo``: 3-bit KVQuant on the embedded default model, end to end (see :mod:`transformers_kvquant.demo`)."""

from __future__ import annotations

from ..demo import add_arguments, run


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="3-bit KVQuant on the embedded default model, end to end")
    add_arguments(p)
    p.set_defaults(func=lambda args: run(args.model, args.bits) and 0)
