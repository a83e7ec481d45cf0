"""Summary statistics of accuracies, shared by evaluation, protocol runs and reports."""

from __future__ import annotations

import math


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value) of ``xs``."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN/(B+N) of a base and a novel accuracy; 0 when both are 0."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
