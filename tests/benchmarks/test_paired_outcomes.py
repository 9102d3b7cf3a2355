"""The paired statistics the benchmarks share: outcomes round-trip through their compact form, and a
paired difference refuses lists that cannot be paired."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from preference_demo import outcome_string, outcomes, paired_difference


def test_outcomes_round_trip_in_item_order() -> None:
    results = [True, False, False, True, True]
    assert outcome_string(results) == "10011" and outcomes(outcome_string(results)) == results


def test_paired_difference_needs_equal_lists_of_two_or_more() -> None:
    assert paired_difference([0, 1], [1, 1]) == (pytest.approx(0.5), pytest.approx(0.5))
    with pytest.raises(ValueError, match="two equally long lists"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError, match="2\\+ items"):
        paired_difference([True], [False])
