"""Error type raised for every bad data input (missing files, bad labels, unreadable images)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad dataset input. The message names the offending file, key or value and what is wrong."""
