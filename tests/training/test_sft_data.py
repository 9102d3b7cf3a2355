"""SFT data: prompts and answers split exactly at the template's generation prompt; limits and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llada.model.tokenizer import Tokenizer
from llada.training.corpus import CorpusError
from llada.training.sft_data import SFTDataset, build_sft_data, collate_sft, encode_pair

DIALOGUE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": " Green. "}]


@pytest.fixture()
def tokenizer_dir(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_encode_pair_splits_at_the_generation_prompt(tokenizer: Tokenizer) -> None:
    prompt, answer = encode_pair(tokenizer, DIALOGUE[:4], DIALOGUE[4])
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(DIALOGUE[:4], add_generation_prompt=True)
    assert tokenizer.decode(answer) == "Green.<|eot_id|>"
    assert answer[-1] == tokenizer.ids.eot


def test_multi_turn_dialogue_gives_one_sample_per_reply(tmp_path: Path, tokenizer_dir: Path,
                                                        tokenizer: Tokenizer) -> None:
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": DIALOGUE},
                                                      {"messages": DIALOGUE[1:3]}])
    summary = build_sft_data([str(source)], tmp_path / "sft", tokenizer_dir, progress=False)
    assert (summary.dialogues, summary.samples, summary.skipped) == (2, 3, 0)
    dataset = SFTDataset(tmp_path / "sft")
    answers = [tokenizer.decode(ids[prompt:].tolist()) for ids, prompt in (dataset[i] for i in range(3))]
    assert answers == ["Blue.<|eot_id|>", "Green.<|eot_id|>", "Blue.<|eot_id|>"]
    ids, prompt = dataset[1]
    assert tokenizer.decode(ids[:prompt].tolist()).endswith("Another?<|eot_id|><|start_header_id|>assistant"
                                                             "<|end_header_id|>\n\n")


def test_raw_prompt_completion_lines_skip_the_chat_template(tmp_path: Path, tokenizer_dir: Path,
                                                          tokenizer: Tokenizer) -> None:
    """A raw sample's prompt is tokenized as generate --no-chat tokenizes it; its answer ends in EOS."""
    source = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "The king", "completion": " is dead."},
                                                  {"messages": DIALOGUE[1:3]},
                                                  {"prompt": "The king", "completion": ""},
                                                  {"prompt": 3, "completion": "x"}])
    summary = build_sft_data([str(source)], tmp_path / "sft", tokenizer_dir, on_error="skip", progress=False)
    assert (summary.samples, summary.skipped) == (2, 2)
    ids, prompt = SFTDataset(tmp_path / "sft")[0]
    assert ids[:prompt].tolist() == tokenizer.encode("The king")
    assert ids[prompt:].tolist() == [*tokenizer.encode(" is dead.", add_special_tokens=False), tokenizer.ids.eos]
    issues = json.loads((tmp_path / "sft" / "index.json").read_text())["issues"]
    assert "must not be empty" in issues[0] and "must be strings" in issues[1]


def test_overlong_samples_are_dropped_or_truncated(tmp_path: Path, tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    long_reply = {"role": "assistant", "content": "word " * 200}
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": [DIALOGUE[1], long_reply]}, {"messages": DIALOGUE[1:3]}])
    dropped = build_sft_data([str(source)], tmp_path / "a", tokenizer_dir, max_length=64, progress=False)
    assert (dropped.samples, dropped.dropped_overlong, dropped.truncated) == (1, 1, 0)
    truncated = build_sft_data([str(source)], tmp_path / "b", tokenizer_dir, max_length=64, overlong="truncate",
                               progress=False)
    assert (truncated.samples, truncated.dropped_overlong, truncated.truncated) == (2, 0, 1)
    assert len(SFTDataset(tmp_path / "b")[0][0]) == 64


def test_nothing_left_to_train_on_is_an_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": DIALOGUE[1:3]}, "{not json"])
    with pytest.raises(ValueError, match="no samples to write: 1 longer than the maximum length 5, 1 malformed"):
        build_sft_data([str(source)], tmp_path / "out", tokenizer_dir, max_length=5, on_error="skip", progress=False)
    assert not (tmp_path / "out").exists()


def test_malformed_lines(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": DIALOGUE[1:3]}, "{not json", {"messages": []},
                                                {"messages": [{"role": "user", "content": "only a question"}]},
                                                {"messages": [{"role": "user"}]}])
    with pytest.raises(CorpusError, match=r"c.jsonl:2: invalid JSON"):
        build_sft_data([str(source)], tmp_path / "out", tokenizer_dir, progress=False)
    summary = build_sft_data([str(source)], tmp_path / "out", tokenizer_dir, on_error="skip", progress=False)
    assert (summary.samples, summary.skipped) == (1, 4)
    issues = json.loads((tmp_path / "out" / "index.json").read_text())["issues"]
    assert [issue.split(": ", 1)[0].rsplit(":", 1)[1] for issue in issues] == ["2", "3", "4", "5"]
    assert "no assistant message" in issues[2] and "message 0 needs" in issues[3]


def test_collate_pads_answers_with_eos() -> None:
    batch = [(torch.tensor([5, 6, 7]), 2), (torch.tensor([8, 9, 10, 11, 12]), 1)]
    ids, prompts = collate_sft(batch, eos_id=1)
    assert ids.tolist() == [[5, 6, 7, 1, 1], [8, 9, 10, 11, 12]] and prompts.tolist() == [2, 1]
    assert collate_sft(batch, eos_id=1, pad_to=7)[0].shape == (2, 7)
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate_sft(batch, eos_id=1, pad_to=4)
