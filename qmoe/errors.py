"""Errors shown to the user as one line (exit status 2, no traceback).

Kept out of ``qmoe/cli.py`` so that ``python -m qmoe.cli`` (where cli.py runs as ``__main__``) and the
library raise and catch the very same class.
"""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""
