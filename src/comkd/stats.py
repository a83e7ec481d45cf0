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


def paired_difference(a: list[float], b: list[float], power: float = 0.8, level: float = 0.95) -> dict:
    """What paired seeds say about ``a − b``: the mean difference, its ``level`` t-interval
    (n − 1 degrees of freedom), the sample sd of the differences, and ``detectable``: the smallest
    true difference a two-sided test at 1 − ``level`` would find with probability ``power``
    ((t_{1−α/2} + t_{power}) · sd / √n, the usual paired-t approximation). With fewer than two
    pairs only the mean is defined (the rest None)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    m, sd = mean_std(d)
    out = {"n": n, "mean": m, "sd": sd if n > 1 else None, "low": None, "high": None, "detectable": None}
    if n < 2:
        return out
    from scipy.stats import t

    t_level, t_power = float(t.ppf(1 - (1 - level) / 2, n - 1)), float(t.ppf(power, n - 1))
    se = sd / math.sqrt(n)
    out.update(low=m - t_level * se, high=m + t_level * se, detectable=(t_level + t_power) * se)
    return out
