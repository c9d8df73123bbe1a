"""The results lab behind ``qmoe compare``: train several recipes, evaluate every adapter and the base model on
the same test sets, and write RESULTS.md with the exact command that produced it.

``runner`` trains and evaluates the runs (resumable subprocesses), ``report`` writes the tables, ``plots`` draws
every figure, ``statistics`` holds the paired tests and intervals, ``heldout`` the held-out answer loss and
``specialisation`` the routing measurements.
"""

from .report import RunResult, task_slug
from .runner import run_compare

__all__ = ["RunResult", "run_compare", "task_slug"]
