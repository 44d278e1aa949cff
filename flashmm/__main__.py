"""``python -m flashmm``: the command line interface (see :mod:`flashmm.cli`)."""

import sys

from .cli import main

sys.exit(main())
