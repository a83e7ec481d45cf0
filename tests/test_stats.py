"""comkd.stats against independent computations: NumPy for the moments, printed t tables for
the quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from comkd.stats import harmonic_mean, mean_std, paired_difference

# Student's t quantiles from a printed table, to its three decimals (0.975 and 0.80 columns)
T_975 = {2: 4.303, 7: 2.365}
T_80 = {2: 1.061, 7: 0.896}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([57.10, 56.90, 57.30], [57.00, 57.00, 57.05]),
        ([1.0, 2.5, 0.5, 3.0, 2.0, 1.5, 0.0, 2.2], [0.5, 2.0, 1.0, 2.0, 2.5, 1.0, 0.5, 1.0]),
    ],
)
def test_paired_difference_matches_numpy_and_the_t_table(a, b) -> None:
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    sd = d.std(ddof=1)
    got = paired_difference(a, b)
    assert got["n"] == n and got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["sd"] == pytest.approx(sd, rel=1e-9)
    half = T_975[n - 1] * sd / math.sqrt(n)
    assert (got["low"], got["high"]) == (
        pytest.approx(d.mean() - half, abs=1e-3),
        pytest.approx(d.mean() + half, abs=1e-3),
    )
    assert got["detectable"] == pytest.approx((T_975[n - 1] + T_80[n - 1]) * sd / math.sqrt(n), abs=1e-3)


def test_paired_difference_edge_cases() -> None:
    one = paired_difference([3.0], [1.0])
    assert one["mean"] == 2.0 and one["low"] is None and one["detectable"] is None
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0, 2.0], [1.0])


def test_mean_std_and_harmonic_mean() -> None:
    xs = [1.0, 4.0, 7.0]
    assert mean_std(xs) == (pytest.approx(np.mean(xs)), pytest.approx(np.std(xs, ddof=1)))
    assert (
        harmonic_mean(60.0, 40.0) == pytest.approx(2 / (1 / 60 + 1 / 40)) and harmonic_mean(0.0, 0.0) == 0.0
    )
