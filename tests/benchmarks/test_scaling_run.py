"""One scaling run end to end on a tiny corpus (CPU): it finishes with a result that records its corpus,
schedule and scores; a run that diverges before its first checkpoint is recorded as diverged, so a sweep
counts its rate as tried and bad rather than silently missing."""

from __future__ import annotations

import hashlib
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaling_mdm_vs_ar as scaling

from llada.model.tokenizer import Tokenizer
from llada.training.packing import tokenize_corpus

WORDS = ["the", "river", "runs", "past", "a", "stone", "wall", "where", "the", "old", "crown", "lies", "under",
         "green", "water", "and", "night"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scaling")
    Tokenizer.from_pretrained(ROOT / "models/demo").save_pretrained(root / "tokenizer")
    for name, seed in (("train", 0), ("heldout", 1)):
        (root / f"{name}.txt").write_text(" ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(40000)))
    train = tokenize_corpus([str(root / "train.txt")], root / "train", root / "tokenizer", workers=1, progress=False)
    tokenize_corpus([str(root / "heldout.txt")], root / "heldout_tokens", root / "tokenizer", workers=1, progress=False)
    ids = Tokenizer.from_pretrained(root / "tokenizer").encode(" ".join(WORDS), add_special_tokens=False)
    (root / "choices.json").write_text(json.dumps([{"source": "prose", "document": "d", "context": ids[:6],
                                                    "choices": [ids[6:8], ids[8:10], ids[10:12], ids[12:14]],
                                                    "label": 0}] * 3))
    (root / "manifest.json").write_text(json.dumps({"train_tokens": train.tokens, "unigram_baseline": 0.25,
                                                    "train_documents_sha256": hashlib.sha256(b"t").hexdigest(),
                                                    "tokenizer_sha256": "x"}))
    return root


def arguments(corpus: Path, tmp_path: Path, **changes) -> Namespace:
    values = {"data": corpus, "size": "xs", "objective": "pretrain", "lr": 1e-3, "seed": 0, "batch_size": 2,
              "seq_len": 32, "steps": 6, "mc_num": 2, "config": str(ROOT / "configs/demo_pretrain.yaml"),
              "runs": tmp_path / "runs", "out": tmp_path / "result.json"}
    return Namespace(**{**values, **changes})


def test_the_unigram_baseline_is_the_held_out_cross_entropy_of_training_frequencies(corpus: Path) -> None:
    """By hand from the two token streams read window by window: add-one smoothed frequencies of the
    training tokens, averaged negative log over every held-out token."""
    import math
    from collections import Counter

    from llada.training.packing import PackedDataset

    def stream(folder: str) -> list[int]:
        data = PackedDataset(corpus / folder, 1)
        return [int(data[i]) for i in range(len(data))]

    vocabulary = Tokenizer.from_pretrained(corpus / "tokenizer").vocab_size
    train, heldout = Counter(stream("train")), stream("heldout_tokens")
    total = sum(train.values())
    expected = -sum(math.log((train[t] + 1) / (total + vocabulary)) for t in heldout) / len(heldout)
    assert scaling.unigram_test_loss(corpus) == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_a_run_finishes_with_its_scores_and_a_diverged_one_is_recorded(corpus: Path, tmp_path: Path) -> None:
    scaling.run(arguments(corpus, tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 6 and result["tokens"] == 6 * 2 * 32 and result["rollbacks"] == 0
    assert len(result["curve"]) >= 1 and result["test_loss"] > 0 and result["choice"]["items"] == 3
    assert len(result["choice"]["per_item"]) == 3 and result["choice"]["per_item"].count("1") == result["choice"]["correct"]
    assert result["data"]["train_documents_sha256"] == hashlib.sha256(b"t").hexdigest()
    corpus_id = hashlib.sha256(b"t").hexdigest()[:8]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [f"xs-pretrain-lr0.001-seed0-6x2x32-{corpus_id}"]

    wild = arguments(corpus, tmp_path, lr=1e4, out=tmp_path / "wild.json", runs=tmp_path / "wild-runs", steps=40)
    with pytest.raises(SystemExit, match="diverged"):
        scaling.run(wild)
    recorded = json.loads((tmp_path / "wild.json").read_text())
    assert recorded["diverged"] and recorded["val_loss"] is None and recorded["lr"] == 1e4


@pytest.mark.slow
def test_a_stopped_run_exits_resumable_and_the_same_command_finishes_it(corpus: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """As under a time limit's SIGTERM: the trainer saves at step 3 and stops; the run exits with the
    pool's resumable status and writes no result; run again, it resumes and finishes."""
    from process_pool import RESUMABLE_EXIT

    class StoppedAtThree(scaling.Trainer):
        def _agree_on_stop(self) -> None:
            self.stop_requested = self.step >= 3
            super()._agree_on_stop()

    monkeypatch.setattr(scaling, "Trainer", StoppedAtThree)
    with pytest.raises(SystemExit) as stopped:
        scaling.run(arguments(corpus, tmp_path))
    assert stopped.value.code == RESUMABLE_EXIT and not (tmp_path / "result.json").exists()
    monkeypatch.undo()
    scaling.run(arguments(corpus, tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 6 and [p["step"] for p in result["curve"]] == [1, 2, 3, 4, 5, 6]
