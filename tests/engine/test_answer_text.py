"""Settled answer text (``llada.engine.answer_text``): only text later steps cannot change is sent; the pieces
sent join to the final answer; end-of-text, stop sequences and max_tokens end it with the right reason;
holding back a possible stop sequence looks at no more than the stop string's length."""

from __future__ import annotations

from llada.engine.answer_text import AnswerText, stop_prefix_at_end
from llada.model.tokenizer import Tokenizer


def feed(text: AnswerText, ids: list[int], order: list[int], mask: int) -> list[str]:
    """Decide ``ids`` one position at a time in ``order``; the deltas after each step."""
    canvas = [mask] * len(ids)
    deltas = []
    for step, position in enumerate(order):
        canvas[position] = ids[position]
        deltas.append(text.update(canvas, finished=step == len(order) - 1))
    return deltas


def test_partial_utf8_characters_are_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Ωμέγα 日本語 🙂 café", add_special_tokens=False)
    partial = [tokenizer.decode(ids[:k]) for k in range(1, len(ids))]
    assert any(p.endswith("\ufffd") for p in partial), "the test needs a character split over tokens"
    text = AnswerText(tokenizer, tokenizer.ids.mask, (tokenizer.ids.eos,), max_tokens=len(ids))
    deltas = feed(text, ids, list(range(len(ids))), tokenizer.ids.mask)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == "Ωμέγα 日本語 🙂 café" and text.finish_reason == "length"
    assert text.completion_tokens == len(ids)


def test_text_waits_for_the_decided_prefix(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    text = AnswerText(tokenizer, tokenizer.ids.mask, (tokenizer.ids.eos,), max_tokens=len(ids))
    order = list(range(len(ids)))[::-1]  # right to left: nothing is settled until the first token is decided
    deltas = feed(text, ids, order, tokenizer.ids.mask)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "The quick brown fox"


def test_a_possible_stop_sequence_is_held_back_and_a_stop_sequence_ends_the_answer(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("To be, or not to be", add_special_tokens=False)
    text = AnswerText(tokenizer, tokenizer.ids.mask, (tokenizer.ids.eos,), max_tokens=len(ids), stop=["or nat", "t to"])
    sent = ""
    for k in range(1, len(ids) + 1):
        sent += text.update(ids[:k] + [tokenizer.ids.mask] * (len(ids) - k))
        decoded = tokenizer.decode(ids[:k])
        assert decoded.startswith(sent)
        if decoded.endswith("or n"):
            assert not sent.endswith("or n")  # could still become "or nat"
        if text.complete:
            break
    assert sent == "To be, or no" and text.finish_reason == "stop"
    covering = next(k for k in range(len(ids)) if len(tokenizer.decode(ids[:k])) >= len(sent))
    assert text.completion_tokens == covering
    assert text.update(ids) == ""  # nothing after the end


def test_end_of_text_and_max_tokens_end_the_answer(tokenizer: Tokenizer) -> None:
    mask, eos = tokenizer.ids.mask, tokenizer.ids.eos
    words = tokenizer.encode("one two three four", add_special_tokens=False)
    ended = AnswerText(tokenizer, mask, (eos, tokenizer.ids.eot), max_tokens=16)
    assert ended.update(words[:2] + [tokenizer.ids.eot] + [mask] * 5) == tokenizer.decode(words[:2])
    assert (ended.finish_reason, ended.completion_tokens) == ("stop", 2)
    cut = AnswerText(tokenizer, mask, (eos,), max_tokens=3)
    assert cut.update(words[:2] + [mask] * 6) == tokenizer.decode(words[:2]) and not cut.complete
    assert cut.update(words[:3] + [mask] * 5) == tokenizer.decode(words[:3])[len(tokenizer.decode(words[:2])):]
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 3)


def test_the_held_back_stop_prefix_is_the_longest_and_bounded_by_the_stop_string() -> None:
    def brute_force(text: str, stop: str) -> int:
        return max((n for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)

    cases = [("abc", "x"), ("abc", "cd"), ("abab", "abac"), ("aaaa", "aaaaa"), ("", "ab"), ("xa", "ab"), ("ab", "ab")]
    for text, stop in cases:
        assert stop_prefix_at_end(text, stop) == brute_force(text, stop), (text, stop)
    # Only the last len(stop) - 1 characters, and no more than the text has, are compared: instant
    # here, where trying every prefix length of the stop string would take hours.
    assert stop_prefix_at_end("xa", "a" * 10_000_000) == 1
    assert stop_prefix_at_end("b" * 1_000_000 + "a" * 300, "a" * 256) == 255
