"""Preference data: JSONL pairs of a chosen and a rejected answer -> token triples on disk -> batches.

Input lines look like ``{"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}``. Instead of
``prompt``, ``messages`` may hold the conversation so far (ending with the user's turn), and
``chosen`` / ``rejected`` may be a one-message list ``[{"role": "assistant", "content": ...}]``
(the conversational layout of other preference libraries). Both answers go through the chat
template exactly as an SFT reply does (``sft_data.encode_pair``), so each ends with the template's
end-of-turn token and the prompt opens the assistant turn.

A pair whose prompt plus longer answer exceeds ``max_length`` is dropped (cutting one answer would
change what is preferred), and so is one whose two answers are identical (it carries no preference);
both are counted. On disk (``token_rows.py``): per pair its offset and the lengths of prompt, chosen
and rejected answer, stored back to back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llada.model.tokenizer import Message, Tokenizer
from llada.training.corpus import CorpusIssue, OnError, parsed_lines
from llada.training.sft_data import checked_messages, encode_pair
from llada.training.token_rows import nothing_to_write, read_token_rows, write_token_rows

FORMAT = "llada-preference"


@dataclass
class PreferenceSummary:
    pairs: int = 0
    tokens: int = 0
    dropped_overlong: int = 0
    dropped_identical: int = 0
    skipped: int = 0  # malformed lines (only with on_error="skip")


def prompt_history(record: dict) -> list[Message]:
    """The conversation before the answer: ``prompt`` as one user turn, or ``messages`` as given."""
    if "prompt" in record and "messages" in record:
        raise ValueError("give either 'prompt' or 'messages', not both")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise ValueError("'prompt' must be a non-empty string")
        return [{"role": "user", "content": record["prompt"]}]
    messages = checked_messages(record.get("messages"), "messages")
    if messages[-1]["role"] == "assistant":
        raise ValueError("'messages' must end before the answer (its last message is the assistant's)")
    return messages


def _reply(record: dict, field: str) -> Message:
    value = record.get(field)
    if isinstance(value, list):
        messages = checked_messages(value, field)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"{field!r} as a list must hold exactly one assistant message")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise ValueError(f"{field!r} must be a string or a one-message list, got {type(value).__name__}")  # noqa: TRY004
    return {"role": "assistant", "content": value}


def encode_preference(tokenizer: Tokenizer, line: str) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen answer and rejected answer ids of one JSONL line (ValueError if malformed)."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")  # noqa: TRY004 - bad data, not a bad call
    history = prompt_history(record)
    prompt, chosen = encode_pair(tokenizer, history, _reply(record, "chosen"))
    same_prompt, rejected = encode_pair(tokenizer, history, _reply(record, "rejected"))
    if same_prompt != prompt:
        raise ValueError("the chat template renders the prompt differently for the two answers")
    return prompt, chosen, rejected


def build_preference_data(inputs: Sequence[str], output_dir: str | Path, tokenizer_dir: str | Path,
                          max_length: int = 4096, on_error: OnError = "fail", progress: bool = True
                          ) -> PreferenceSummary:
    """Turn preference JSONL files into a preference directory (its files replaced atomically).

    Args:
        inputs: JSONL files or glob patterns.
        max_length: longest prompt + answer in tokens; longer pairs are dropped and counted.
        on_error: ``fail`` on the first malformed line (naming file and line), or ``skip`` it
            (counted, and listed in the index).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    summary = PreferenceSummary()
    issues: list[CorpusIssue] = []
    tokens: list[int] = []
    rows: list[tuple[int, int, int, int]] = []
    for prompt, chosen, rejected in parsed_lines(inputs, lambda line: encode_preference(tokenizer, line), on_error,
                                                 issues, progress):
        if chosen == rejected:
            summary.dropped_identical += 1
        elif len(prompt) + max(len(chosen), len(rejected)) > max_length:
            summary.dropped_overlong += 1
        else:
            rows.append((len(tokens), len(prompt), len(chosen), len(rejected)))
            tokens.extend(prompt + chosen + rejected)
    summary.pairs, summary.tokens, summary.skipped = len(rows), len(tokens), len(issues)
    if not rows:
        raise nothing_to_write("pairs", max_length, summary.dropped_overlong, summary.skipped)
    write_token_rows(Path(output_dir), FORMAT, tokens, rows, 4, tokenizer, tokenizer_dir, asdict(summary), issues)
    return summary


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PreferenceDataset(torch.utils.data.Dataset):
    """(prompt, chosen, rejected) id tensors per pair of a preference directory."""

    def __init__(self, directory: str | Path) -> None:
        self.index, self.rows, self.tokens = read_token_rows(directory, FORMAT, "llada data preference")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> Triple:
        offset, prompt, chosen, rejected = (int(v) for v in self.rows[item])
        ids = torch.from_numpy(self.tokens[offset:offset + prompt + chosen + rejected].astype(np.int64))
        return ids[:prompt], ids[prompt:prompt + chosen], ids[prompt + chosen:]


def collate_preference(batch: Sequence[Triple], eos_id: int) -> dict[str, torch.Tensor]:
    """Pairs as tensors: ``input_ids`` (B, L) rows of prompt, chosen and rejected answer back to back
    (EOS-padded on the right, padding never scored), and the three lengths per row."""
    lengths = torch.tensor([[len(part) for part in triple] for triple in batch], dtype=torch.long)  # (B, 3)
    input_ids = torch.full((len(batch), int(lengths.sum(1).max())), eos_id, dtype=torch.long)
    for row, triple in enumerate(batch):
        joined = torch.cat(triple)
        input_ids[row, :len(joined)] = joined
    return {"input_ids": input_ids, "prompt_lengths": lengths[:, 0], "chosen_lengths": lengths[:, 1],
            "rejected_lengths": lengths[:, 2]}


def split_pairs(batch: dict[str, torch.Tensor]) -> list[Triple]:
    """The (prompt, chosen, rejected) triples back from a collated batch, on its device."""
    triples = []
    for row, lengths in zip(batch["input_ids"], zip(batch["prompt_lengths"].tolist(),
                                                    batch["chosen_lengths"].tolist(),
                                                    batch["rejected_lengths"].tolist())):
        prompt, chosen, rejected = lengths
        triples.append((row[:prompt], row[prompt:prompt + chosen], row[prompt + chosen:prompt + chosen + rejected]))
    return triples
