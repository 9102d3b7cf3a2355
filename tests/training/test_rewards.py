"""Rewards: the built-ins, rewards imported by name, weighting, and failures reported with the sample."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llada.training.rewards import RewardError, exact_answer, integer_format, resolve_reward, score


def test_built_in_rewards() -> None:
    assert exact_answer(" 42\n", {"answer": 42}) == 1.0
    assert exact_answer("42.", {"answer": "42"}) == 0.0
    assert [integer_format(text, {}) for text in ("-7", " 12 ", "12 apples", "")] == [1.0, 1.0, 0.0, 0.0]


def test_rewards_by_module_path_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text("def length(completion, record):\n    return len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["exact_answer", "my_rewards:length"]
    rewards = [resolve_reward(name) for name in names]
    total, values = score(names, rewards, [1.0, 0.5], ["7", "seven"], [{"answer": 7}, {"answer": 7}])
    assert values.tolist() == [[1.0, 1.0], [0.0, 5.0]]
    assert torch.equal(total, torch.tensor([1.5, 2.5], dtype=torch.float64))
    sys.modules.pop("my_rewards", None)
    for bad, problem in (("nope", "unknown reward"), ("no_such_module:f", "cannot be imported"),
                         ("math:nope", "cannot be imported"), ("math:pi", "not callable")):
        with pytest.raises(ValueError, match=problem):
            resolve_reward(bad)


def test_a_failing_reward_names_itself_and_the_sample() -> None:
    with pytest.raises(RewardError, match=r"reward exact_answer raised KeyError.*sample 1 .*'oops'"):
        score(["exact_answer"], [exact_answer], [1.0], ["1", "oops"], [{"answer": 1}, {"question": "?"}])
    with pytest.raises(RewardError, match="returned nan, not a finite number, on sample 0"):
        score(["bad"], [lambda completion, record: float("nan")], [1.0], ["x"], [{}])
    with pytest.raises(RewardError, match="returned None"):
        score(["bad"], [lambda completion, record: None], [1.0], ["x"], [{}])
