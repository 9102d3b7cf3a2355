"""Verifiable rewards for RL: Python functions of a completion and its prompt's record.

A reward is ``reward(completion: str, record: dict) -> float``, where ``record`` is the prompt's
JSONL line (so it can carry the reference answer, test cases, anything the reward needs). A recipe
names rewards either by a built-in name or as ``package.module:function``. A reward that raises or
returns something other than a finite number stops the run with the reward's name, the sample and
its record: a silently zeroed reward would train on a lie.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

Reward = Callable[[str, dict[str, Any]], float]


class RewardError(RuntimeError):
    """A reward function failed on a sample."""


def exact_answer(completion: str, record: dict[str, Any]) -> float:
    """1 if the completion, stripped of surrounding whitespace, is the record's ``answer``, else 0."""
    if "answer" not in record:
        raise KeyError("the record has no 'answer' field to compare with")
    return float(completion.strip() == str(record["answer"]).strip())


def integer_format(completion: str, record: dict[str, Any]) -> float:
    """1 if the completion is a bare integer (the demo arithmetic task's answer format), else 0."""
    return float(re.fullmatch(r"\s*-?\d+\s*", completion) is not None)


BUILT_IN: dict[str, Reward] = {"exact_answer": exact_answer, "integer_format": integer_format}


def resolve_reward(name: str) -> Reward:
    """A built-in reward by name, or ``module:function`` imported."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, separator, attribute = name.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"unknown reward {name!r}: use a built-in ({', '.join(BUILT_IN)}) or 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {name!r} cannot be imported: {error}") from error
    if not callable(function):
        raise ValueError(f"reward {name!r} is not callable")  # noqa: TRY004 - a bad recipe value
    return function


def score(names: Sequence[str], rewards: Sequence[Reward], weights: Sequence[float], completions: Sequence[str],
          records: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted total reward of each completion (N,) and each reward's values (N, R)."""
    values = torch.zeros(len(completions), len(rewards), dtype=torch.float64)
    for column, (name, reward) in enumerate(zip(names, rewards)):
        for row, (completion, record) in enumerate(zip(completions, records)):
            try:
                value = reward(completion, record)
            except Exception as error:
                raise RewardError(f"reward {name} raised {type(error).__name__}: {error} on sample {row} "
                                  f"(completion {completion!r}, record {record!r})") from error
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(f"reward {name} returned {value!r}, not a finite number, on sample {row} "
                                  f"(completion {completion!r}, record {record!r})")
            values[row, column] = float(value)
    return values @ torch.tensor(list(weights), dtype=torch.float64), values
