"""``python -m transformers_kvquant.cli``: the ``kvquant`` command."""

import sys

from .main import main

sys.exit(main())
