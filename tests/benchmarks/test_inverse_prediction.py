"""Fieller intervals for where a fitted line reaches a value, checked by what an interval promises:
over many noisy data sets drawn from a known line, the 95% interval holds the true x about 95% of
the time (with the residual scatter and Student's t, and with known standard errors)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from inverse_prediction import where_line_reaches

TRUE_INTERCEPT, TRUE_SLOPE, TARGET = 1.0, -0.5, -1.0  # reaches TARGET at x = 4
TRUE_X = (TARGET - TRUE_INTERCEPT) / TRUE_SLOPE


def coverage(xs: list[float], noise: list[float], known: bool, trials: int = 4000) -> float:
    """How often the interval holds the true x over data sets drawn with this noise. The noise is small
    against the slope, so every interval is bounded (a Fieller set is exact at any noise level, but
    an unbounded one, reported as None, may or may not hold a given x)."""
    draw = random.Random(0)
    held = 0
    for _ in range(trials):
        ys = [TRUE_INTERCEPT + TRUE_SLOPE * x + draw.gauss(0.0, sd) for x, sd in zip(xs, noise)]
        _, interval = where_line_reaches(xs, ys, TARGET, noise if known else None)
        assert interval is not None
        held += interval[0] <= TRUE_X <= interval[1]
    return held / trials


@pytest.mark.parametrize("xs", [[0.0, 1.0, 2.0], [0.0, 0.5, 1.0, 3.0]])
def test_intervals_from_the_residual_scatter_hold_the_true_x_95_percent_of_the_time(xs: list[float]) -> None:
    """Extrapolating (the target lies beyond the points), with as few points as the study has: one or
    two degrees of freedom, where Student's t, not the normal quantile, gives 95%."""
    assert coverage(xs, [0.01] * len(xs), known=False) == pytest.approx(0.95, abs=0.012)


def test_intervals_from_known_standard_errors_hold_the_true_x_95_percent_of_the_time() -> None:
    """Unequal known errors: the ordinary fit's mean height and slope are then correlated, which the
    interval must account for."""
    assert coverage([0.0, 1.0, 2.0, 2.5], [0.025, 0.1, 0.05, 0.15], known=True) == pytest.approx(0.95, abs=0.012)


def test_exact_points_give_the_exact_x_and_a_flat_fit_no_bounded_interval() -> None:
    xs = [0.0, 1.0, 2.0]
    estimate, interval = where_line_reaches(xs, [TRUE_INTERCEPT + TRUE_SLOPE * x for x in xs], TARGET)
    assert estimate == pytest.approx(TRUE_X) and interval == pytest.approx((TRUE_X, TRUE_X))
    estimate, interval = where_line_reaches(xs, [0.0, 0.1, -0.1], TARGET)  # slope 0.1 ± far more
    assert interval is None
    assert where_line_reaches(xs, [1.0, 1.0, 1.0], TARGET) == (None, None)
    assert where_line_reaches([0.0, 1.0], [0.0, 1.0], 2.0) == (pytest.approx(2.0), None)  # no scatter to go on


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="two or more"):
        where_line_reaches([0.0], [1.0], 0.0)
    with pytest.raises(ValueError, match="3 standard errors for 2 points"):
        where_line_reaches([0.0, 1.0], [1.0, 0.0], 0.0, [0.1, 0.1, 0.1])
