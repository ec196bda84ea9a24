"""`moebench inspect`: what each router of a trained run does with an image (pictures + numbers).

Not named ``inspect``: that would shadow the standard library's module for
code run from inside this package's directory.
"""

from .report import inspect_run, main, run

__all__ = ["inspect_run", "main", "run"]
