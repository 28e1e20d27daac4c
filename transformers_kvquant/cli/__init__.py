"""The ``kvquant`` command line: every sub-command's argparse wrapper lives in this package.

- ``kvquant calibrate`` (:mod:`.calibrate`), ``kvquant eval-ppl`` / ``eval-fidelity`` (:mod:`.evaluate`),
  ``kvquant push`` / ``pull`` / ``info`` (:mod:`.hub`) and ``kvquant demo`` (:mod:`.demo`);
- :func:`main` (the console script) and :class:`UserError` (bad input: one line, exit status 2).
"""

from .errors import UserError
from .main import build_parser, main

__all__ = ["UserError", "build_parser", "main"]
