"""Datasets of the shipped lm-eval tasks, generated (deterministically) rather than downloaded.

Arithmetic questions follow the demo model's instruction format ("What is a + b?"), so those tasks
measure something on it; word reversal asks for a reordering that a masked diffusion model (which
sees the whole answer at once) and a left-to-right model find differently hard; the counting
documents give lm-eval's perplexity path (``loglikelihood_rolling``) something to score. All work
for any checkpoint.
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


WORDS = ("red", "green", "blue", "king", "queen", "river", "stone", "light", "night", "bread", "horse", "sword",
         "winter", "garden", "crown", "heart", "storm", "friend", "water", "house")


def _reversals(size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        words = rng.sample(WORDS, rng.randrange(3, 6))
        answer = " ".join(reversed(words))
        wrong = set()
        while len(wrong) < 3:  # distractors: other orders of the same words
            candidate = " ".join(rng.sample(words, len(words)))
            if candidate != answer:
                wrong.add(candidate)
        choices = [answer, *sorted(wrong)]
        rng.shuffle(choices)
        rows.append({"question": f"Reverse the order of the words: {' '.join(words)}", "answer": answer,
                     "choices": choices, "label": choices.index(answer)})
    return rows


def word_reversal(size: int = 200, seed: int = 1234, **_: object) -> datasets.DatasetDict:
    """``size`` word-reversal questions as a test split (generation and 4-way choice)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_reversals(int(size), int(seed)))})


def counting(size: int = 20, seed: int = 1234, **_: object) -> datasets.DatasetDict:
    """``size`` documents that count up from a random start, for perplexity (rolling log-likelihood)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(int(size)):
        start = rng.randrange(0, 500)
        rows.append({"text": " ".join(str(n) for n in range(start, start + rng.randrange(10, 40)))})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
