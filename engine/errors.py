"""Exceptions the command line catches, in a module that imports nothing heavy (so `mae --help` starts at once)."""

from __future__ import annotations


class DivergenceError(RuntimeError):
    """Too many consecutive bad steps (non-finite, or a loss / gradient-norm spike), or a run that ended inside a bad
    streak: the run diverged."""
