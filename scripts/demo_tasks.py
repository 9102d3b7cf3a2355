"""The demo model's checkable tasks: arithmetic, word lists, verse, definitions, raw continuation.

Every generator draws from a seeded ``random.Random`` and returns ``Item``s. Held-out test items are
drawn first; training draws skip them (``held_out`` keys), so no test question is ever trained on:
- arithmetic: held-out operand pairs never appear in training, in either order;
- word lists: held-out lists never appear in training as the same words in the same order;
- blanks, raw prompts: held-out (line, span) / prompt strings never appear in training.
Definitions and neighbouring lines recall the training text itself; their "held-out" questions are
new questions about seen text (the text is in pretraining), which is what they measure.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Item:
    kind: str
    prompt: str
    answer: str
    raw: bool = False  # a plain-text prompt (no chat template); the answer is a completion

    def as_training_line(self) -> dict:
        """The line ``llada data sft`` reads: chat messages, or a raw prompt/completion pair."""
        if self.raw:
            return {"kind": self.kind, "prompt": self.prompt, "completion": self.answer}
        return {"kind": self.kind, "messages": [{"role": "user", "content": self.prompt},
                                                {"role": "assistant", "content": self.answer}]}

    def as_test_line(self) -> dict:
        return asdict(self)


OPERATIONS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}


def arithmetic_item(kind: str, a: int, b: int) -> Item:
    symbol, value = OPERATIONS[kind]
    return Item(kind, f"What is {a} {symbol} {b}?", str(value(a, b)))


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def arithmetic_test(rng: random.Random, kind: str, count: int) -> list[Item]:
    """Distinct held-out questions of the measured shapes: 2-digit ± 2-digit, 2-digit × 1-digit (2-9)."""
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        pairs.add((_number(rng, 2), rng.randrange(2, 10) if kind == "mul" else _number(rng, 2)))
    return [arithmetic_item(kind, a, b) for a, b in sorted(pairs)]


def held_out_arithmetic(rng: random.Random, counts: dict[str, int]) -> list[Item]:
    """The held-out arithmetic questions: the first draws of the data's random stream, so that
    ``held_out_arithmetic(random.Random(seed), ...)`` gives them again without the text sources."""
    return [item for kind in ("add", "sub", "mul") for item in arithmetic_test(rng, kind, counts[kind])]


def arithmetic_train(rng: random.Random, kind: str, count: int, held_out: set[str]) -> list[Item]:
    """Multi-digit questions around the tested shapes: sums and differences of 1-3 digit numbers,
    products of a 1-3 digit number and a 1-digit one (in either order), never a held-out pair."""
    items = []
    while len(items) < count:
        if kind == "mul":
            a, b = _number(rng, rng.choices((1, 2, 3), (1, 6, 4))[0]), rng.randrange(0, 10)
            a, b = (a, b) if rng.random() < 0.7 else (b, a)
        else:
            a, b = (_number(rng, rng.choices((1, 2, 3), (1, 6, 3))[0]) for _ in range(2))
        item = arithmetic_item(kind, a, b)
        if pair_key(item) not in held_out:
            items.append(item)
    return items


def pair_key(item: Item) -> str:
    """A question's operands and operation, order-free for products (3 * 45 is 45 * 3 held out)."""
    a, symbol, b = item.prompt.removeprefix("What is ").removesuffix("?").split()
    if symbol == "*":
        a, b = sorted((a, b))
    return f"{a} {symbol} {b}"


def common_words(texts: list[str], size: int = 1500) -> list[str]:
    """The ``size`` most frequent lowercase words of 3-8 letters in the texts (the list tasks' words)."""
    counts = Counter(word for text in texts for word in re.findall(r"\b[a-z]{3,8}\b", text))
    return sorted(word for word, _ in counts.most_common(size))


def list_item(kind: str, words: list[str]) -> Item:
    if kind == "reverse":
        return Item(kind, "Reverse the list: " + ", ".join(words), ", ".join(reversed(words)))
    return Item(kind, "Sort alphabetically: " + ", ".join(words), ", ".join(sorted(words)))


def middle_gap(answer: str, count_tokens: Callable[[str], int]) -> str:
    """A list answer with its inner words (all but the first and last) replaced by one gap of their
    length in tokens (``count_tokens``), for ``llada infill --question``. Filling it needs both ends:
    the words are the question's, their order is set by the words on either side."""
    words = answer.split(", ")
    if len(words) < 3:
        raise ValueError(f"a middle gap needs at least 3 words, got {answer!r}")
    return f"{words[0]},[MASK*{count_tokens(' ' + ', '.join(words[1:-1]))}], {words[-1]}"


def list_items(rng: random.Random, kind: str, vocabulary: list[str], count: int, lengths: tuple[int, ...],
               held_out: set[str], distinct: bool = False) -> list[Item]:
    """Lists of distinct words, each list's length drawn from ``lengths``, never a held-out list (and,
    with ``distinct``, never the same list twice: for test sets)."""
    items: dict[str, Item] = {}
    drawn = 0
    while len(items) < count:
        item = list_item(kind, rng.sample(vocabulary, rng.choice(lengths)))
        if item.prompt not in held_out and (not distinct or item.prompt not in items):
            items[item.prompt if distinct else str(drawn)] = item
            drawn += 1
    return list(items.values())


def verse_lines(text: str) -> list[str]:
    """Lines of a work worth quoting: stripped, 20-80 characters, not stage directions or headings."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if 20 <= len(line) <= 80 and not line.startswith("[") and not line.isupper()
            and re.search(r"[a-z]", line)]


def blank_item(lines: list[str], i: int, rng: random.Random) -> Item | None:
    """Line ``i`` with 1-3 consecutive middle words blanked out; None for lines too short."""
    words = lines[i].split()
    if len(words) < 5:
        return None
    size = rng.randint(1, 3)
    start = rng.randrange(1, len(words) - size)
    shown = " ".join([*words[:start], "___", *words[start + size:]])
    return Item("blank", f"Fill in the blank: \"{shown}\"", " ".join(words[start:start + size]))


def neighbour_item(kind: str, lines: list[str], i: int) -> Item:
    if kind == "next":
        return Item(kind, f"Which line follows \"{lines[i]}\"?", lines[i + 1])
    return Item(kind, f"Which line comes before \"{lines[i]}\"?", lines[i - 1])


def raw_item(lines: list[str], i: int, rng: random.Random) -> Item:
    """Plain continuation: the first words of a line (sometimes after the line before it) as the
    prompt, the rest of the line and up to two more as the completion."""
    words = lines[i].split()
    cut = rng.randint(1, max(1, len(words) - 1))
    prefix = (lines[i - 1] + "\n" if i > 0 and rng.random() < 0.3 else "") + " ".join(words[:cut])
    rest = " " + " ".join(words[cut:]) if cut < len(words) else ""
    following = "".join("\n" + line for line in lines[i + 1:i + 1 + rng.randint(1, 2)])
    return Item("raw", prefix, rest + following, raw=True)


def gloss_raw_item(word: str, definition: str) -> Item:
    return Item("raw", f"{word}:", f" {definition}", raw=True)
