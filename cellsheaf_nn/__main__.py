"""``python -m cellsheaf_nn``: the same as the ``cellsheaf-nn`` command."""

import sys

from .cli import main

sys.exit(main())
