"""Learning-rate schedules: shape of warmup, stable, decay and cosine phases at their boundaries."""

from __future__ import annotations

import itertools
import math

import pytest

from llada.training.schedule import lr_multiplier


def test_wsd_phases() -> None:
    values = [lr_multiplier(s, 100, "wsd", warmup_steps=10, decay_fraction=0.2, min_ratio=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[10:80])
    assert values[80] < 1.0 and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[80:]))


def test_cosine_and_constant() -> None:
    assert lr_multiplier(5, 105, "cosine", warmup_steps=5, min_ratio=0.0) == pytest.approx(1.0)
    assert lr_multiplier(55, 105, "cosine", warmup_steps=5, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(105, 105, "cosine", warmup_steps=5, min_ratio=0.2) == pytest.approx(0.2)
    assert lr_multiplier(3, 10, "constant", warmup_steps=4) == 1.0
    assert math.isclose(lr_multiplier(0, 10, "constant", warmup_steps=4), 0.25)


@pytest.mark.parametrize("kwargs", [{"schedule": "linear"}, {"total_steps": 0}, {"decay_fraction": 1.5}])
def test_bad_arguments(kwargs: dict) -> None:
    arguments = {"step": 0, "total_steps": 10, "schedule": "wsd"} | kwargs
    with pytest.raises(ValueError):
        lr_multiplier(**arguments)
