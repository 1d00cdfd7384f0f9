"""``python -m sparsezo.cli``: the ``sparsezo`` command."""

import sys

from . import main

sys.exit(main())
