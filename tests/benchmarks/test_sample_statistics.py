"""The statistics the benchmarks share: the Wilson interval against its closed form, outcomes
round-trip through their compact form, and a paired difference refuses lists that cannot be paired."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sample_statistics import outcome_string, outcomes, paired_difference, wilson


def test_wilson_interval_matches_its_closed_form_at_the_edges() -> None:
    # No successes in n: the interval is [0, z^2 / (n + z^2)]; all successes mirror it.
    z2 = 1.96 ** 2
    assert wilson(0, 10) == [0.0, round(z2 / (10 + z2), 4)]
    assert wilson(10, 10) == [round(10 / (10 + z2), 4), 1.0]
    low, high = wilson(953, 1000)
    assert low < 0.953 < high and high - low < 0.03


def test_outcomes_round_trip_in_item_order() -> None:
    results = [True, False, False, True, True]
    assert outcome_string(results) == "10011" and outcomes(outcome_string(results)) == results


def test_paired_difference_needs_equal_lists_of_two_or_more() -> None:
    assert paired_difference([0, 1], [1, 1]) == (pytest.approx(0.5), pytest.approx(0.5))
    with pytest.raises(ValueError, match="two equally long lists"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError, match="2\\+ items"):
        paired_difference([True], [False])
