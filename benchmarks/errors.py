"""The bench's error class."""

from __future__ import annotations


class BenchError(ValueError):
    """A bench request that names no section or stage the bench has (a ``ValueError``, so the
    ``comkd`` command reports it as one red line)."""
