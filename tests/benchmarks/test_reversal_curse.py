"""The reversal-curse benchmark's design, checked on its own data: test facts are taught in one
direction only, the sets share no one, infilling asks for exactly the missing name, and the rate is
chosen on the tuning pairs, never the test pairs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import reversal_curse as reversal


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reversal")
    reversal.make_data(out, seed=0, vocab=512, copies=2)
    return out


def test_test_facts_are_taught_forward_only_and_the_sets_share_no_one(data: Path) -> None:
    pairs = json.loads((data / "pairs.json").read_text())
    assert {name: len(p) for name, p in pairs.items()} == reversal.SETS
    people = [person for p in pairs.values() for pair in p for person in (pair["a"], pair["b"])]
    assert len(people) == len(set(people))  # nobody is in two pairs or two sets
    lines = (data / "facts.txt").read_text().splitlines()
    by_person: dict[str, list[str]] = {}
    for line in lines:
        for person in re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", line):
            by_person.setdefault(person, []).append(line)
    for name in ("test", "tune"):
        for pair in pairs[name]:
            taught = by_person[pair["a"]]
            assert taught == by_person[pair["b"]]  # every sentence naming one names the other
            assert sorted(set(taught)) == sorted(t.format(**pair) for t in reversal.FORWARD_TEMPLATES)
            assert all(line.index(pair["a"]) < line.index(pair["b"]) for line in taught)  # A before B, always
            assert len(taught) == 2 * len(reversal.FORWARD_TEMPLATES)  # each phrasing once per copy
    for pair in pairs["both"]:
        expected = [t.format(**pair) for t in reversal.FORWARD_TEMPLATES + reversal.REVERSE_TEMPLATES]
        assert sorted(set(by_person[pair["a"]])) == sorted(expected)
    # The reverse question's wording never appears with a test person in it.
    reverse_heads = {reversal.REVERSE_QUESTION.format(b=p["b"]) for p in pairs["test"]}
    assert not any(line.startswith(head) for line in lines for head in reverse_heads)


def test_infilling_masks_exactly_the_missing_name(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in model that fills each mask with the right token shows where the gap is and how long:
    the answers read back are exactly the missing names, in both directions."""
    import torch

    from llada.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(data / "tokenizer")
    pairs = json.loads((data / "pairs.json").read_text())["test"][:20]
    truth = iter([tokenizer.encode(reversal.TAUGHT_SENTENCE.format(**pair), add_special_tokens=False)
                  for gap in ("b", "a") for pair in pairs])
    seen = []

    def perfect_infill(model: object, ids: torch.Tensor) -> torch.Tensor:
        sentence = [tokenizer.ids.eos, *next(truth)]
        seen.append(ids.tolist())
        assert len(ids) == len(sentence)  # the gap has the name's length in tokens
        masked = ids == tokenizer.ids.mask
        assert masked.any() and torch.equal(ids[~masked], torch.tensor(sentence)[~masked])  # the rest is given
        return torch.tensor(sentence)

    monkeypatch.setattr(reversal, "infill", perfect_infill)
    assert reversal.infill_names(None, tokenizer, pairs, "b") == [" " + p["b"] for p in pairs]
    assert reversal.infill_names(None, tokenizer, pairs, "a") == [" " + p["a"] for p in pairs]
    lead = len(tokenizer.encode(reversal.LEAD, add_special_tokens=False))
    assert seen[0].index(tokenizer.ids.mask) > 1 + lead  # B's gap late in the sentence
    assert seen[len(pairs)].index(tokenizer.ids.mask) == 1 + lead  # A's right after the lead word


def test_every_name_is_taught_as_the_tokens_each_question_asks_for(data: Path) -> None:
    """A name is the same tokens wherever it appears: no line opens with one, and the answer each
    question expects (" " + the name) is a run of the taught sentence's tokens, which the question's
    tokens followed by it reproduce. (Taught at the start of a line, A was other tokens than the reverse
    question asks for after "is".)"""
    from llada.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(data / "tokenizer")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    lines = (data / "facts.txt").read_text().splitlines()
    assert not any(re.match(r"[A-Z][a-z]+ [A-Z][a-z]+", line) for line in lines)
    for pair in json.loads((data / "pairs.json").read_text())["test"][:100]:
        taught = encode(reversal.TAUGHT_SENTENCE.format(**pair))
        for question, gap in ((reversal.FORWARD_QUESTION, "b"), (reversal.REVERSE_QUESTION, "a")):
            asked, answer = encode(question.format(**pair)), encode(" " + pair[gap])
            assert encode(question.format(**pair) + " " + pair[gap]) == asked + answer
            assert any(taught[i:i + len(answer)] == answer for i in range(len(taught))), (question, pair)
            # and those tokens, decoded as a model's answer is (end-of-text after it), score as right
            said = tokenizer.decode([*answer, *encode("."), tokenizer.ids.eos], skip_special_tokens=True)
            assert reversal.accuracy([said], [pair[gap]])["correct"] == 1


def test_scores_keep_each_item_and_the_rate_is_chosen_on_the_tuning_pairs(tmp_path: Path) -> None:
    scored = reversal.accuracy([" Bo Ka. extra", " Wrong", " Li Mo \nmore", "Di Ra."], ["Bo Ka", "Di Ra", "Li Mo", "Di Ra"])
    assert scored["correct"] == 2 and scored["per_item"] == "1010"  # the last is glued to the word before

    def run(lr: float, tune: float, test: float) -> dict:
        return {"objective": "pretrain", "lr": lr, "seed": 0,
                "scores": {"tune_forward": {"accuracy": tune}, "test_forward": {"accuracy": test, "items": 4},
                           "test_reverse": {"accuracy": 0.0, "items": 4}}}

    paths = []
    for i, r in enumerate((run(1e-3, tune=0.8, test=0.1), run(3e-3, tune=0.2, test=0.9))):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(r))
    summary = reversal.report(paths)["pretrain"]
    assert summary["lr"] == 1e-3 and summary["test_forward"]["mean"] == 0.1  # the test score never chooses

    assert "test_forward_minus_test_reverse" not in summary  # no per-item outcomes kept: no paired difference

    seeds = []
    for seed, (forward, reverse) in enumerate((("1101", "0100"), ("1111", "0011"), ("1111", None))):
        paired = run(1e-3, tune=0.8, test=forward.count("1") / 4)
        paired["seed"] = seed
        paired["scores"]["test_forward"].update(items=4, per_item=forward)
        if reverse:  # seed 2 kept only one direction's outcomes: no pair for it
            paired["scores"]["test_reverse"].update(items=4, per_item=reverse)
        seeds.append(tmp_path / f"seed{seed}.json")
        seeds[-1].write_text(json.dumps(paired))
    differences = reversal.report([*seeds, paths[1]])["pretrain"]["test_forward_minus_test_reverse"]
    # seed 0: 1, 0, 0, 1 -> mean 0.5, sd sqrt(1/3), stderr sqrt(1/3)/2; seed 1: 1, 1, 0, 0 -> the same
    assert differences == [{"seed": 0, "difference": 0.5, "stderr": pytest.approx((1 / 3) ** 0.5 / 2)},
                           {"seed": 1, "difference": 0.5, "stderr": pytest.approx((1 / 3) ** 0.5 / 2)}]


def test_a_run_stopped_early_writes_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A part-trained model's scores are no result: the run exits resumable (a rerun starts it over)
    and the sweep does not skip its point next time."""
    from argparse import Namespace

    from process_pool import RESUMABLE_EXIT

    (tmp_path / "pairs.json").write_text(json.dumps({"test": [{"a": "Bo Ka", "b": "Di Ra"}]}))
    stopped = Namespace(step=40)
    monkeypatch.setattr(reversal, "train", lambda *args: stopped)
    arguments = Namespace(data=tmp_path, objective="pretrain", lr=1e-3, seed=0, steps=100, batch_size=2,
                          seq_len=16, runs=tmp_path / "runs", out=tmp_path / "result.json")
    with pytest.raises(SystemExit) as exit_status:
        reversal.run(arguments)
    assert exit_status.value.code == RESUMABLE_EXIT and not (tmp_path / "result.json").exists()


def test_the_length_matched_guess_and_the_report_refuses_mixed_designs(tmp_path: Path) -> None:
    class WordTokenizer:  # one token per word: lengths 2, 2 and 1
        def encode(self, text: str, add_special_tokens: bool) -> list[str]:
            return text.split()

    # two names of length 2 (each guessed right half the time), one of length 1 (always)
    assert reversal.length_matched_guess(WordTokenizer(), ["Bo Ka", "Di Ra", "Li"]) == pytest.approx(2 / 3)

    def result(templates: object, seed: int) -> Path:
        path = tmp_path / f"design{seed}.json"
        path.write_text(json.dumps({"objective": "pretrain", "lr": 1e-3, "seed": seed, "templates": templates,
                                    "length_matched_guess": {"a": 0.005, "b": 0.004},
                                    "scores": {"tune_forward": {"accuracy": 0.5}}}))
        return path

    current = json.loads(json.dumps(reversal.TEMPLATES))
    assert reversal.report([result(current, 0), result(current, 1)])["pretrain"]["length_matched_guess"]["a"] == 0.005
    with pytest.raises(SystemExit, match="different sentences"):
        reversal.report([result(current, 0), result(None, 1)])  # a run of the first design kept no templates
