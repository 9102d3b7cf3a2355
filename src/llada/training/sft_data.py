"""Supervised fine-tuning data: chat JSONL -> (prompt, answer) token pairs on disk -> padded batches.

Input lines look like ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``.
Each assistant turn becomes one sample (paper, Appendix B.1): the prompt is the chat template applied
to everything before it (with the assistant header opened), the answer is the rest of the rendered
conversation up to that turn's end-of-turn token. A line ``{"prompt": ..., "completion": ...}`` is a
raw sample without the template: the prompt tokenized as ``llada generate --no-chat`` and
``/v1/completions`` tokenize it, the answer the completion and an EOS. Raw samples keep plain
continuation alive in a chat model (without them it learns to stop at once outside the template). In batches the answers are padded with EOS, and the
padding counts as answer: the model learns to fill the remaining length with EOS, which is how it
decides where its answers stop.

On disk (``token_rows.py``): per sample its offset, prompt length and total length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llada.model.tokenizer import Message, Tokenizer, TokenizerError, dialogue_to_pairs
from llada.training.corpus import CorpusIssue, OnError, parsed_lines
from llada.training.token_rows import nothing_to_write, read_token_rows, write_token_rows

FORMAT = "llada-sft"


@dataclass
class SFTSummary:
    dialogues: int = 0
    samples: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    skipped: int = 0  # malformed lines (only with on_error="skip")


def encode_pair(tokenizer: Tokenizer, history: Sequence[Message], reply: Message) -> tuple[list[int], list[int]]:
    """Prompt and answer ids of one assistant turn, split where the rendered conversation diverges.

    Rendering the conversation with and without the reply and taking the difference works for any
    chat template, so the answer carries exactly the template's end-of-turn tokens.
    """
    prompt_text = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([*history, reply], add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise TokenizerError("the chat template renders the reply without the generation prompt before it; "
                             "cannot split prompt and answer")
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    answer = tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False)
    return prompt, answer


def checked_messages(value: object, field: str) -> list[Message]:
    """``value`` as a non-empty list of messages with string ``role`` and ``content``, else a ValueError
    naming ``field`` and the message at fault."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"no non-empty list field {field!r}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            problem = f"{field}: message {i} needs string 'role' and 'content'"
            raise ValueError(problem)  # noqa: TRY004 - bad data, not a bad call
    return value


def _raw_pair(tokenizer: Tokenizer, value: dict) -> tuple[list[int], list[int]]:
    """Prompt and answer ids of a ``{"prompt", "completion"}`` line (no chat template)."""
    prompt, completion = value["prompt"], value["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must be strings")  # noqa: TRY004 - bad data, not a bad call
    if not prompt or not completion:
        raise ValueError("'prompt' and 'completion' must not be empty")
    return tokenizer.encode(prompt), [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.ids.eos]


def _messages(value: object, field: str) -> list[Message]:
    messages = checked_messages(value.get(field) if isinstance(value, dict) else None, field)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return messages


def build_sft_data(inputs: Sequence[str], output_dir: str | Path, tokenizer_dir: str | Path, max_length: int = 4096,
                   overlong: Literal["drop", "truncate"] = "drop", on_error: OnError = "fail",
                   messages_field: str = "messages", progress: bool = True) -> SFTSummary:
    """Turn chat JSONL files into an SFT directory.

    Args:
        inputs: JSONL files or glob patterns.
        output_dir: target directory (its three files are replaced atomically).
        tokenizer_dir: directory with the tokenizer files and chat template.
        max_length: longest prompt + answer in tokens.
        overlong: ``drop`` longer samples, or ``truncate`` their answers (a prompt that alone reaches
            ``max_length`` is always dropped); both are counted.
        on_error: ``fail`` on the first malformed line, or ``skip`` it (counted, and logged by line).
        messages_field: the field holding the message list.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    summary = SFTSummary()
    issues: list[CorpusIssue] = []
    tokens: list[int] = []
    samples: list[tuple[int, int, int]] = []
    def parse(line: str) -> list[tuple[list[int], list[int]]]:
        value = json.loads(line)
        if isinstance(value, dict) and messages_field not in value and "completion" in value and "prompt" in value:
            return [_raw_pair(tokenizer, value)]
        messages = _messages(value, messages_field)
        return [encode_pair(tokenizer, history, reply) for history, reply in dialogue_to_pairs(messages)]

    for pairs in parsed_lines(inputs, parse, on_error, issues, progress):
        summary.dialogues += 1
        for prompt, answer in pairs:
            if len(prompt) + len(answer) > max_length:
                if overlong == "drop" or len(prompt) >= max_length:
                    summary.dropped_overlong += 1
                    continue
                answer = answer[:max_length - len(prompt)]
                summary.truncated += 1
            samples.append((len(tokens), len(prompt), len(prompt) + len(answer)))
            tokens.extend(prompt + answer)
    summary.samples, summary.tokens, summary.skipped = len(samples), len(tokens), len(issues)
    if not samples:
        raise nothing_to_write("samples", max_length, summary.dropped_overlong, summary.skipped)
    write_token_rows(Path(output_dir), FORMAT, tokens, samples, 3, tokenizer, tokenizer_dir, asdict(summary), issues)
    return summary


class SFTDataset(torch.utils.data.Dataset):
    """(ids, prompt_length) per sample of an SFT directory; ``collate_sft`` pads them into batches."""

    def __init__(self, directory: str | Path) -> None:
        self.index, self.samples, self.tokens = read_token_rows(directory, FORMAT, "llada data sft")
        self.eos_id = self.index["eos_id"]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        offset, prompt_length, length = (int(v) for v in self.samples[item])
        return torch.from_numpy(self.tokens[offset:offset + length].astype(np.int64)), prompt_length


def collate_sft(batch: Sequence[tuple[torch.Tensor, int]], eos_id: int,
                pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad samples with EOS to the longest (or ``pad_to``): (B, L) ids and (B,) prompt lengths.

    The EOS padding belongs to the answer (it is masked and trained on, as in the paper).
    """
    length = max(len(ids) for ids, _ in batch)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({length})")
        length = pad_to
    input_ids = torch.full((len(batch), length), eos_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, :len(ids)] = ids
    return input_ids, torch.tensor([prompt for _, prompt in batch], dtype=torch.long)
