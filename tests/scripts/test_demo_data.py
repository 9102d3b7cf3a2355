"""The demo model's task data: no held-out question is ever trained on, answers are right, and the
demo script's arithmetic questions are the held-out ones."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import demo_tasks
import prepare_demo_data

WORDS = [f"w{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]


@pytest.fixture()
def small_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer items than the real data (whose draws are the same code), so the test runs in a second."""
    monkeypatch.setattr(prepare_demo_data, "TRAIN_COUNTS", {k: v // 100 for k, v in prepare_demo_data.TRAIN_COUNTS.items()})
    monkeypatch.setattr(prepare_demo_data, "TEST_COUNTS", {k: v // 4 for k, v in prepare_demo_data.TEST_COUNTS.items()})


def stub_sources(rng: random.Random) -> tuple[list[list[str]], list[tuple[str, str]], list[str]]:
    lines = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(300)] for _ in range(3)]
    pairs = [(word, f"meaning of {word}") for word in WORDS]
    return lines, pairs, WORDS


def test_no_held_out_question_is_trained_on(small_counts: None) -> None:
    rng = random.Random(0)
    lines, pairs, vocabulary = stub_sources(rng)
    test = prepare_demo_data.held_out_tasks(lines, pairs, vocabulary, rng)
    train = prepare_demo_data.training_tasks(lines, pairs, vocabulary, test, rng)
    assert {i.kind for i in test} == set(prepare_demo_data.TEST_COUNTS)
    assert {i.prompt for i in test}.isdisjoint(i.prompt for i in train)
    # Products are held out in both orders: 3 * 45 is the same question as 45 * 3.
    held_products = {demo_tasks.pair_key(i) for i in test if i.kind == "mul"}
    assert held_products.isdisjoint(demo_tasks.pair_key(i) for i in train if i.kind == "mul")
    for item in (i for i in test + train if i.kind in demo_tasks.OPERATIONS):
        a, symbol, b = item.prompt.removeprefix("What is ").removesuffix("?").split()
        assert int(item.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[symbol]
    for item in (i for i in test if i.kind in ("add", "sub")):
        assert all(10 <= int(n) <= 99 for n in item.prompt[8:-1].split(" ")[::2])
    for item in (i for i in test + train if i.kind == "reverse"):
        assert item.answer.split(", ") == item.prompt.split(": ", 1)[1].split(", ")[::-1]


def test_training_lines_are_what_llada_data_sft_reads() -> None:
    chat = demo_tasks.Item("add", "What is 1 + 2?", "3").as_training_line()
    raw = demo_tasks.Item("raw", "The king", " is dead", raw=True).as_training_line()
    assert chat["messages"][1] == {"role": "assistant", "content": "3"}
    assert raw == {"kind": "raw", "prompt": "The king", "completion": " is dead"}


def test_the_demo_asks_held_out_arithmetic(small_counts: None) -> None:
    """scripts/demo.py draws the arithmetic test set again from the seed alone; it must be the same set
    prepare_demo_data writes (it is drawn first from the same stream)."""
    rng = random.Random(0)
    lines, pairs, vocabulary = stub_sources(random.Random(1))
    written = [i for i in prepare_demo_data.held_out_tasks(lines, pairs, vocabulary, rng) if i.kind in ("add", "sub", "mul")]
    assert written == demo_tasks.held_out_arithmetic(random.Random(0), prepare_demo_data.TEST_COUNTS)


def test_a_middle_gap_stands_for_the_inner_words_and_their_token_count() -> None:
    count = lambda text: len(text.split())
    gapped = demo_tasks.middle_gap("ash, bee, cow, dog", count)
    assert gapped == "ash,[MASK*2], dog"
    assert gapped.replace("[MASK*2]", " bee, cow") == "ash, bee, cow, dog"
    with pytest.raises(ValueError, match="at least 3 words"):
        demo_tasks.middle_gap("ash, bee", count)
