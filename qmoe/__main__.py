"""``python -m qmoe ...`` is the ``qmoe`` command."""

import sys

from qmoe.cli import main

sys.exit(main())
