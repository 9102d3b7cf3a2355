"""The statistics the benchmarks share for scores over a fixed set of items: a proportion's interval,
and differences paired item by item (two models, or two directions, on the same items), with the
per-item outcomes kept compactly in result files so pairs can be formed later."""

from __future__ import annotations

import math


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def outcome_string(outcomes: list[bool]) -> str:
    """Per-item outcomes as "1"/"0" in item order: compact in a result JSON, read back by ``outcomes``."""
    return "".join("1" if ok else "0" for ok in outcomes)


def outcomes(text: str) -> list[bool]:
    return [c == "1" for c in text]


def paired_difference(old: list, new: list) -> tuple[float, float]:
    """Mean of new - old over the same items (booleans or numbers), and its standard error: pairing
    removes the items' own difficulty from the error, which two separate intervals would keep."""
    if len(old) != len(new) or len(old) < 2:
        raise ValueError(f"a paired difference needs two equally long lists of 2+ items, got {len(old)} and {len(new)}")
    differences = [float(b) - float(a) for a, b in zip(old, new)]
    mean = sum(differences) / len(differences)
    spread = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, math.sqrt(spread / len(differences))
