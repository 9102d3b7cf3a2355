"""Fieller sets for where a fitted line reaches a value, checked two ways: against a second
implementation (a fine grid of x, each tested against the line's pointwise confidence band computed
with matrices), and by what an interval promises: over many noisy data sets drawn from a known line,
the 95% interval holds the true x about 95% of the time."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from inverse_prediction import where_line_reaches

TRUE_INTERCEPT, TRUE_SLOPE = 1.0, -0.5


def band_holds(x: list[float], y: list[float], target: float, standard_errors: list[float] | None,
               grid: np.ndarray) -> np.ndarray:
    """For each grid x: is ``target`` inside the 95% band of the least-squares line's height there?
    Written from the textbook matrix form: Var(X b) = X (X'X)^-1 X' S X (X'X)^-1 X'."""
    design = np.column_stack([np.ones(len(x)), x])
    inverse = np.linalg.inv(design.T @ design)
    coefficients = inverse @ design.T @ np.asarray(y)
    if standard_errors is None:
        residuals = np.asarray(y) - design @ coefficients
        covariance = inverse * (residuals @ residuals) / (len(x) - 2)
        q = stats.t.ppf(0.975, len(x) - 2)
    else:
        middle = design.T @ np.diag(np.square(standard_errors)) @ design
        covariance = inverse @ middle @ inverse
        q = stats.norm.ppf(0.975)
    at = np.column_stack([np.ones(len(grid)), grid])
    height = at @ coefficients
    spread = np.sqrt(np.einsum("ij,jk,ik->i", at, covariance, at))
    return np.abs(target - height) <= q * spread


@pytest.mark.parametrize("case", range(60))
def test_the_set_is_the_grid_points_whose_band_holds_the_target(case: int) -> None:
    """Random lines, noise, point counts, targets inside and beyond the data, both error models:
    bounded intervals, excluded ranges and whole lines all agree with the grid scan."""
    draw = random.Random(case)
    n = draw.choice([3, 4, 5])
    x = sorted(draw.uniform(0, 3) for _ in range(n))
    slope = draw.choice([-1, 1]) * draw.uniform(0.0, 1.0)
    known = case % 2 == 1
    errors = [draw.uniform(0.05, 0.5) for _ in range(n)] if known else None
    y = [1.0 + slope * u + draw.gauss(0.0, errors[i] if known else 0.3) for i, u in enumerate(x)]
    target = draw.uniform(-2.0, 3.0)
    reach = where_line_reaches(x, y, target, errors)
    grid = np.linspace(-50.0, 50.0, 200001)
    holds = band_holds(x, y, target, errors, grid)
    inside = np.zeros_like(holds)
    if reach.interval is not None:
        inside = (grid >= reach.interval[0]) & (grid <= reach.interval[1])
    elif reach.excluded is not None:
        inside = (grid <= reach.excluded[0]) | (grid >= reach.excluded[1])
    else:
        inside = np.ones_like(holds)
    disagree = grid[holds != inside]
    step = grid[1] - grid[0]
    # Only at the ends can a grid point fall on either side.
    ends = [e for e in (reach.interval or reach.excluded or ()) if -50 <= e <= 50]
    assert all(min(abs(g - e) for e in ends) <= step for g in disagree), (reach, disagree[:5])


def coverage(xs: list[float], noise: list[float], known: bool, true_x: float, trials: int = 4000) -> float:
    """How often the interval holds the true x over data sets drawn with this noise. The noise is small
    against the slope, so every interval is bounded (a Fieller set is exact at any noise level, but
    an unbounded one may or may not hold a given x)."""
    draw = random.Random(0)
    target = TRUE_INTERCEPT + TRUE_SLOPE * true_x
    held = 0
    for _ in range(trials):
        ys = [TRUE_INTERCEPT + TRUE_SLOPE * x + draw.gauss(0.0, sd) for x, sd in zip(xs, noise)]
        interval = where_line_reaches(xs, ys, target, noise if known else None).interval
        assert interval is not None
        held += interval[0] <= true_x <= interval[1]
    return held / trials


@pytest.mark.parametrize(("xs", "true_x"), [([0.0, 1.0, 2.0], 4.0), ([0.0, 0.5, 1.0, 3.0], 4.0),
                                            ([0.0, 1.0, 2.0], 1.0)])
def test_intervals_from_the_residual_scatter_hold_the_true_x_95_percent_of_the_time(xs, true_x) -> None:
    """Extrapolating (as the study does) and at the middle of the data, with as few points as the
    study has: one or two degrees of freedom, where Student's t, not the normal quantile, gives 95%."""
    assert coverage(xs, [0.01] * len(xs), known=False, true_x=true_x) == pytest.approx(0.95, abs=0.012)


@pytest.mark.parametrize(("xs", "noise", "true_x"), [([0.0, 1.0, 2.0, 2.5], [0.025, 0.1, 0.05, 0.15], 4.0),
                                                     ([0.0, 1.0, 2.0, 6.0], [0.01, 0.01, 0.01, 0.3], 8.0)])
def test_intervals_from_known_standard_errors_hold_the_true_x_95_percent_of_the_time(xs, noise, true_x) -> None:
    """Unequal known errors, one far noisier point at the end: the ordinary fit's mean height and slope
    are then correlated, and the slope's variance is not the average error's."""
    assert coverage(xs, noise, known=True, true_x=true_x) == pytest.approx(0.95, abs=0.012)


def test_exact_points_give_the_exact_x_and_a_flat_fit_no_bounded_interval() -> None:
    xs = [0.0, 1.0, 2.0]
    reach = where_line_reaches(xs, [TRUE_INTERCEPT + TRUE_SLOPE * x for x in xs], -1.0)
    assert reach.estimate == pytest.approx(4.0) and reach.interval == pytest.approx((4.0, 4.0))
    assert where_line_reaches(xs, [0.0, 0.1, -0.1], -1.0).interval is None  # slope far inside its error
    assert where_line_reaches(xs, [1.0, 1.0, 1.0], -1.0).estimate is None
    assert where_line_reaches([0.0, 1.0], [0.0, 1.0], 2.0).interval is None  # no scatter to go on


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="two or more"):
        where_line_reaches([0.0], [1.0], 0.0)
    with pytest.raises(ValueError, match="3 standard errors for 2 points"):
        where_line_reaches([0.0, 1.0], [1.0, 0.0], 0.0, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="two different x"):
        where_line_reaches([1.0, 1.0, 1.0], [1.0, 0.0, 2.0], 0.0)
