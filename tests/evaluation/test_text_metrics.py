"""Word-overlap F1 against hand-computed values."""

from __future__ import annotations

import pytest

from llada.evaluation.text_metrics import word_f1


@pytest.mark.parametrize("prediction, reference, expected", [
    ("a part of the face", "a part of the face", 1.0),
    ("the king is dead", "long live the king", 2 * 0.5 * 0.5 / (0.5 + 0.5)),  # 2 common of 4 and 4
    ("The The cat", "the cat", 2 * (2 / 3) * 1 / (2 / 3 + 1)),  # multiset: "the" counts once in the reference
    ("dog", "cat", 0.0),
    ("", "", 1.0),
    ("", "cat", 0.0),
])
def test_word_f1(prediction: str, reference: str, expected: float) -> None:
    assert word_f1(prediction, reference) == pytest.approx(expected)
