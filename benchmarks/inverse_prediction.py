"""Where a straight line fitted to a few points reaches a given value, with a confidence interval.

The scaling study asks this twice: how much compute the diffusion model's loss fit needs to reach
the autoregressive model's loss, and where the two accuracy lines meet (the gap's line reaches 0).
The point answer inverts the fitted line; its interval is Fieller's: every x whose confidence band
for the line's height contains the target. When the slope is not clearly non-zero that set is not
a bounded interval (the line could be flat, and then it reaches the target nowhere or everywhere):
then no interval is given, only the range the set leaves out, if any.

Two sources of uncertainty, chosen by the caller:
- ``standard_errors=None``: the scatter of the points about the line, estimated from the residuals,
  with Student's t on n - 2 degrees of freedom. This counts the line's misfit as well as noise, but
  with three or four points it is itself poorly known, which the t quantile pays for.
- ``standard_errors`` given: each point's own known standard error (e.g. a binomial accuracy), with
  the normal quantile. This ignores misfit: it says what the sampling noise allows if the straight
  line is the truth.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _quantile(level: float, degrees_of_freedom: int | None) -> float:
    """The two-sided ``level`` quantile: normal where the variance is known, Student's t otherwise."""
    upper = (1 + level) / 2
    if degrees_of_freedom is None:
        return statistics.NormalDist().inv_cdf(upper)
    try:
        from scipy.stats import t  # only here: the study's runs on GPU machines never need it
    except ImportError as error:
        raise ImportError("Student's t quantiles need scipy: pip install -e '.[stats]'") from error
    return float(t.ppf(upper, degrees_of_freedom))


@dataclass(frozen=True)
class Reach:
    """Where a fitted line reaches a value. ``estimate``: None for a flat line. ``interval``: the
    bounded confidence set, or None when it is not bounded; then ``excluded`` is the range it leaves
    out (the set is the two half-lines outside it), or None when it holds every x."""

    estimate: float | None
    interval: tuple[float, float] | None
    excluded: tuple[float, float] | None = None


def where_line_reaches(x: list[float], y: list[float], target: float, standard_errors: list[float] | None = None,
                       level: float = 0.95) -> Reach:
    """The x where the least-squares line through (x, y) equals ``target``, and its ``level`` set.

    Without standard errors and with fewer than three points there is no residual scatter to go on:
    the estimate alone.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a line needs two or more (x, y) points, got {len(x)} x and {len(y)} y")
    if standard_errors is not None and len(standard_errors) != len(x):
        raise ValueError(f"{len(standard_errors)} standard errors for {len(x)} points")
    n = len(x)
    x_mean, y_mean = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((v - x_mean) ** 2 for v in x)
    if sxx == 0:
        raise ValueError("a line needs at least two different x")
    slope = sum((u - x_mean) * (v - y_mean) for u, v in zip(x, y)) / sxx
    estimate = x_mean + (target - y_mean) / slope if slope != 0 else None
    # Variances of the fitted mean height (at x_mean), of the slope, and their covariance.
    if standard_errors is None:
        if n < 3:
            return Reach(estimate, None)
        residual = sum((v - y_mean - slope * (u - x_mean)) ** 2 for u, v in zip(x, y)) / (n - 2)
        var_mean, var_slope, covariance = residual / n, residual / sxx, 0.0
        q = _quantile(level, n - 2)
    else:  # least squares with unequal known variances: the estimates are correlated
        variances = [se * se for se in standard_errors]
        var_mean = sum(variances) / n ** 2
        var_slope = sum((u - x_mean) ** 2 * v for u, v in zip(x, variances)) / sxx ** 2
        covariance = sum((u - x_mean) * v for u, v in zip(x, variances)) / (n * sxx)
        q = _quantile(level, None)
    # x = x_mean + u lies in the set where (d - slope u)^2 <= q^2 (var_mean + 2 u cov + u^2 var_slope),
    # d = target - y_mean: a quadratic a u^2 - 2 b u + c <= 0. With a > 0 (the slope clearly non-zero)
    # it holds between the roots; with a < 0 outside them (or everywhere, without real roots).
    d = target - y_mean
    a = slope * slope - q * q * var_slope
    b = slope * d + q * q * covariance
    c = d * d - q * q * var_mean
    discriminant = b * b - a * c
    if a > 0:  # the estimate lies in the set, so the discriminant is >= 0 up to rounding
        root = math.sqrt(max(0.0, discriminant))
        return Reach(estimate, (x_mean + (b - root) / a, x_mean + (b + root) / a))
    if a < 0 and discriminant > 0:
        ends = sorted(x_mean + (b + sign * math.sqrt(discriminant)) / a for sign in (-1, 1))
        return Reach(estimate, None, (ends[0], ends[1]))
    return Reach(estimate, None)
