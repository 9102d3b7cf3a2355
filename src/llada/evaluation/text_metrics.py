"""Scores of generated text against a reference answer."""

from __future__ import annotations


def word_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall (multiset overlap, case-insensitive), as in SQuAD.

    Two empty texts score 1; an empty against a non-empty one scores 0.
    """
    predicted, expected = prediction.lower().split(), reference.lower().split()
    common = sum(min(predicted.count(word), expected.count(word)) for word in set(predicted))
    if not predicted or not expected or common == 0:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
