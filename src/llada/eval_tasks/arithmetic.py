"""Datasets of the shipped lm-eval tasks, generated (deterministically) rather than downloaded.

The questions follow the demo model's instruction format ("What is a + b?"), so the tasks measure
something on it; they work for any checkpoint.
"""

from __future__ import annotations

import random

import datasets

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _questions(size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        a, b, operator = rng.randrange(0, 100), rng.randrange(0, 100), rng.choice(sorted(OPERATORS))
        value = OPERATORS[operator](a, b)
        wrong = set()
        while len(wrong) < 3:  # distractors: near misses a model could plausibly give
            candidate = value + rng.choice([-10, -2, -1, 1, 2, 10, a, -b])
            if candidate != value:
                wrong.add(candidate)
        choices = [str(value)] + [str(w) for w in sorted(wrong)]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} {operator} {b}?", "answer": str(value), "choices": choices,
                     "label": choices.index(str(value))})
    return rows


def arithmetic(size: int = 200, seed: int = 1234, **_: object) -> datasets.DatasetDict:
    """``size`` questions as a test split (lm-eval's ``custom_dataset`` hook; --metadata can change them)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_questions(int(size), int(seed)))})
