"""Token shards: text round-trips through tokenize -> shards -> decode; resume reuses work; sequences pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS

from llada.model.tokenizer import Tokenizer
from llada.training import packing
from llada.training.corpus import CorpusError
from llada.training.packing import PackedDataset, token_dtype, tokenize_corpus


@pytest.fixture()
def tokenizer_dir(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def make_corpus(root: Path) -> dict[str, list[str]]:
    """Three files in two formats; returns the documents each should yield, in order."""
    root.mkdir()
    (root / "a.txt").write_text(CORPUS[0] + "\n" + CORPUS[1])
    (root / "b.txt").write_text(CORPUS[5])
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[2:5]) + "\n")
    return {"a.txt": [CORPUS[0] + "\n" + CORPUS[1]], "b.txt": [CORPUS[5]], "c.jsonl": CORPUS[2:5]}


def decode_documents(directory: Path, tokenizer: Tokenizer) -> dict[str, list[str]]:
    index = json.loads((directory / "index.json").read_text())
    out = {}
    for shard in index["shards"]:
        ids = np.fromfile(directory / shard["file"], dtype=index["dtype"]).tolist()
        assert ids[-1] == tokenizer.ids.eos and len(ids) == shard["tokens"]
        documents, current = [], []
        for token in ids:
            if token == tokenizer.ids.eos:
                documents.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        out[Path(shard["source"]).name] = documents
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_and_summary(tmp_path: Path, tokenizer_dir: Path, tokenizer: Tokenizer, workers: int) -> None:
    expected = make_corpus(tmp_path / "corpus")
    summary = tokenize_corpus([str(tmp_path / "corpus" / "*")], tmp_path / "out", tokenizer_dir, workers=workers,
                              progress=False)
    assert decode_documents(tmp_path / "out", tokenizer) == expected
    assert (summary.files, summary.documents, summary.reused, summary.skipped) == (3, 5, 0, 0)
    assert summary.text_bytes == sum(len(t.encode()) for docs in expected.values() for t in docs)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["tokens"] == summary.tokens == sum(s["tokens"] for s in index["shards"])
    assert index["dtype"] == "uint16"


def test_resume_reuses_unchanged_files(tmp_path: Path, tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    expected = make_corpus(tmp_path / "corpus")
    inputs = [str(tmp_path / "corpus" / "*")]
    tokenize_corpus(inputs, tmp_path / "out", tokenizer_dir, workers=1, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.bin")}
    (tmp_path / "corpus" / "b.txt").write_text("changed text")
    summary = tokenize_corpus(inputs, tmp_path / "out", tokenizer_dir, workers=1, progress=False)
    assert summary.reused == 2
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.bin")}
    assert sum(stamps[name] == after[name] for name in stamps) == 2
    assert decode_documents(tmp_path / "out", tokenizer) == expected | {"b.txt": ["changed text"]}
    assert not list((tmp_path / "out").glob("*.tmp-*"))


def test_bad_records_fail_or_are_counted(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jsonl").write_bytes(b'{"text": "good"}\n{"oops": 1}\nnot json\n')
    with pytest.raises(CorpusError, match="x.jsonl:2"):
        tokenize_corpus([str(tmp_path / "c" / "x.jsonl")], tmp_path / "out", tokenizer_dir, workers=1, progress=False)
    summary = tokenize_corpus([str(tmp_path / "c" / "x.jsonl")], tmp_path / "out", tokenizer_dir, on_error="skip",
                              workers=1, progress=False)
    assert (summary.documents, summary.skipped) == (1, 2)
    sidecar = json.loads(next((tmp_path / "out").glob("shard-*.json")).read_text())
    assert sidecar["issues"][0].endswith("x.jsonl:2: no string field 'text'")


def test_packed_dataset_windows_span_documents_and_shards(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    tokenize_corpus([str(tmp_path / "corpus" / "*")], tmp_path / "out", tokenizer_dir, workers=1, progress=False)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    stream = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], dtype=index["dtype"]) for s in index["shards"]])
    dataset = PackedDataset(tmp_path / "out", seq_len=17)
    assert len(dataset) == len(stream) // 17
    for i in range(len(dataset)):
        assert torch.equal(dataset[i], torch.from_numpy(stream[i * 17:(i + 1) * 17].astype(np.int64)))
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(ValueError, match=f"holds {len(stream)} tokens, fewer than one sequence of data.seq_len"):
        PackedDataset(tmp_path / "out", seq_len=len(stream) + 1)


@pytest.mark.parametrize("chunk", [1 << 24, 7])
def test_token_counts_count_the_whole_stream(tmp_path: Path, tokenizer_dir: Path, tokenizer: Tokenizer, chunk: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token of every shard, the tail a window would drop included, whether counted whole or in
    chunks; an id past the vocabulary is an error, since the data then belongs to another tokenizer."""
    from collections import Counter

    monkeypatch.setattr(packing, "COUNT_CHUNK", chunk)

    make_corpus(tmp_path / "corpus")
    tokenize_corpus([str(tmp_path / "corpus" / "*")], tmp_path / "out", tokenizer_dir, workers=1, progress=False)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    stream = [int(i) for s in index["shards"] for i in np.fromfile(tmp_path / "out" / s["file"], dtype=index["dtype"])]
    counts = PackedDataset(tmp_path / "out", seq_len=17).token_counts(tokenizer.vocab_size)
    assert counts.sum() == len(stream) and dict(Counter(stream)) == {i: c for i, c in enumerate(counts.tolist()) if c}
    with pytest.raises(ValueError, match="outside a vocabulary of 5"):
        PackedDataset(tmp_path / "out", seq_len=17).token_counts(5)


def test_packed_dataset_detects_damage(tmp_path: Path, tokenizer_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    tokenize_corpus([str(tmp_path / "corpus" / "*")], tmp_path / "out", tokenizer_dir, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="llada data tokenize"):
        PackedDataset(tmp_path / "nowhere", 8)
    shard = next((tmp_path / "out").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="wrong size"):
        PackedDataset(tmp_path / "out", 8)


def test_token_dtype() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(126464) == np.uint32
