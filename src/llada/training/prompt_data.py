"""RL prompt data: JSONL records -> chat-formatted prompt ids on disk, each with its record.

Input lines look like ``{"prompt": "What is 2+3?", "answer": "5"}`` (or ``"messages": [...]``
instead of ``"prompt"``, the conversation so far). The prompt goes through the chat template with
the assistant turn opened, as at generation. Every other field is kept, and the whole line is
handed to the reward functions beside each completion, so a record carries whatever its rewards
check (a reference answer, test cases).

On disk (``token_rows.py``): per record its offset and prompt length, and ``records.jsonl`` with
the records in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llada.model.tokenizer import Tokenizer
from llada.training.corpus import CorpusIssue, OnError, parsed_lines
from llada.training.preference_data import prompt_history
from llada.training.token_rows import nothing_to_write, read_token_rows, write_token_rows

FORMAT = "llada-prompts"
RECORDS_FILE = "records.jsonl"


@dataclass
class PromptSummary:
    prompts: int = 0
    tokens: int = 0
    dropped_overlong: int = 0
    skipped: int = 0  # malformed lines (only with on_error="skip")


def build_prompt_data(inputs: Sequence[str], output_dir: str | Path, tokenizer_dir: str | Path,
                      max_length: int = 2048, on_error: OnError = "fail", progress: bool = True) -> PromptSummary:
    """Turn prompt JSONL files into a prompt directory (replaced atomically; records first, index last).

    Prompts longer than ``max_length`` tokens are dropped and counted; malformed lines stop the run
    with file and line, or with ``on_error="skip"`` are skipped, counted and listed in the index.
    """
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    summary = PromptSummary()
    issues: list[CorpusIssue] = []
    tokens: list[int] = []
    rows: list[tuple[int, int]] = []
    records: list[dict[str, Any]] = []
    def parse(line: str) -> tuple[dict[str, Any], list[int]]:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("a line must be a JSON object")  # noqa: TRY004 - bad data, not a bad call
        return record, tokenizer.encode_chat(prompt_history(record))

    for record, prompt in parsed_lines(inputs, parse, on_error, issues, progress):
        if len(prompt) > max_length:
            summary.dropped_overlong += 1
            continue
        rows.append((len(tokens), len(prompt)))
        tokens.extend(prompt)
        records.append(record)
    summary.prompts, summary.tokens, summary.skipped = len(rows), len(tokens), len(issues)
    if not rows:
        raise nothing_to_write("prompts", max_length, summary.dropped_overlong, summary.skipped)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    staged = output / f"{RECORDS_FILE}.tmp-{os.getpid()}"
    staged.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(staged, output / RECORDS_FILE)
    write_token_rows(output, FORMAT, tokens, rows, 2, tokenizer, tokenizer_dir, asdict(summary), issues)
    return summary


class PromptDataset(torch.utils.data.Dataset):
    """(prompt ids, record) per prompt of a prompt directory."""

    def __init__(self, directory: str | Path) -> None:
        self.index, self.rows, self.tokens = read_token_rows(directory, FORMAT, "llada data prompts")
        lines = (Path(directory) / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
        self.records = [json.loads(line) for line in lines]
        if len(self.records) != len(self.rows):
            raise ValueError(f"{directory}: {len(self.records)} records for {len(self.rows)} prompts; "
                             "run `llada data prompts` again")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, dict[str, Any]]:
        offset, length = (int(v) for v in self.rows[item])
        return torch.from_numpy(self.tokens[offset:offset + length].astype(np.int64)), self.records[item]
