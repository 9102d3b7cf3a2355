"""Preference data: JSONL pairs through the chat template to token triples on disk and back, with
malformed lines named by file and line, and pairs that teach nothing counted, not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llada.cli.main import main
from llada.model.tokenizer import Tokenizer
from llada.training.corpus import CorpusError
from llada.training.preference_data import (
    PreferenceDataset,
    build_preference_data,
    collate_preference,
    split_pairs,
)
from llada.training.sft_data import SFTDataset, encode_pair


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(directory)
    return directory


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_pairs_round_trip_through_the_chat_template(tmp_path: Path, tokenizer: Tokenizer, tokenizer_dir: Path) -> None:
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]
    records = [{"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "12"},
               {"messages": history, "chosen": [{"role": "assistant", "content": "The quick brown fox."}],
                "rejected": "the lazy dog"}]
    summary = build_preference_data([str(_write(tmp_path / "pairs.jsonl", records))], tmp_path / "out", tokenizer_dir,
                                    progress=False)
    assert (summary.pairs, summary.skipped, summary.dropped_identical, summary.dropped_overlong) == (2, 0, 0, 0)
    dataset = PreferenceDataset(tmp_path / "out")
    assert len(dataset) == 2
    for (prompt, chosen, rejected), (messages, good, bad) in zip(
            (dataset[0], dataset[1]),
            (([{"role": "user", "content": "What is 3 + 4?"}], "7", "12"), (history, "The quick brown fox.", "the lazy dog"))):
        expected_prompt, expected_chosen = encode_pair(tokenizer, messages, {"role": "assistant", "content": good})
        _, expected_rejected = encode_pair(tokenizer, messages, {"role": "assistant", "content": bad})
        assert prompt.tolist() == expected_prompt
        assert chosen.tolist() == expected_chosen and rejected.tolist() == expected_rejected
        assert chosen[-1].item() == tokenizer.ids.eot  # each answer closes its turn, as in SFT
    batch = collate_preference([dataset[0], dataset[1]], eos_id=tokenizer.ids.eos)
    for got, want in zip(split_pairs(batch), (dataset[0], dataset[1])):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert sum(batch[k].sum().item() for k in ("prompt_lengths", "chosen_lengths", "rejected_lengths")) == \
        json.loads((tmp_path / "out" / "index.json").read_text())["tokens"]


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "invalid JSON"),
    ({"prompt": "Hi", "chosen": "a"}, "'rejected' must be a string"),
    ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}, "not both"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "must end before the answer"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "non-empty string"),
    ({"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "message 0 needs"),
    ([1, 2], "JSON object"),
])
def test_malformed_lines_name_file_and_line(tmp_path: Path, tokenizer_dir: Path, line, problem: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(CorpusError, match=rf"bad.jsonl:2: .*{problem}"):
        build_preference_data([str(path)], tmp_path / "out", tokenizer_dir, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()  # nothing half-written
    summary = build_preference_data([str(path)], tmp_path / "out", tokenizer_dir, on_error="skip", progress=False)
    assert (summary.pairs, summary.skipped) == (1, 1)
    assert problem in json.loads((tmp_path / "out" / "index.json").read_text())["issues"][0]


def test_identical_and_overlong_pairs_are_dropped_and_counted(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "same", "rejected": "same"},
                                            {"prompt": "Hi", "chosen": "a", "rejected": "the lazy dog " * 30},
                                            {"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    summary = build_preference_data([str(path)], tmp_path / "out", tokenizer_dir, max_length=40, progress=False)
    assert (summary.pairs, summary.dropped_identical, summary.dropped_overlong) == (1, 1, 1)


def test_cli_and_format_checks(tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    assert main(["data", "preference", str(path), "--tokenizer", str(tokenizer_dir), "--output",
                 str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 1
    with pytest.raises(ValueError, match="llada-preference.*not 'llada-sft'"):
        SFTDataset(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="llada data preference"):
        PreferenceDataset(tmp_path / "missing")
    assert main(["data", "preference", str(tmp_path / "nothing.jsonl"), "--tokenizer", str(tokenizer_dir),
                 "--output", str(tmp_path / "x")]) == 2
