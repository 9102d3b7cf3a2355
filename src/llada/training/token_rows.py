"""Prepared fine-tuning data on disk, shared by SFT and preference data.

A directory holds ``tokens.bin`` (every sample's ids back to back, in the smallest unsigned dtype
that fits the vocabulary), ``samples.npy`` (one int64 row per sample: its offset into the tokens,
then the lengths of its parts) and ``index.json`` (format, counts, and ``tokenizer_record``: the
tokenizer's EOS id, vocabulary size, vocabulary fingerprint and directory). The index is written last, after the other two are in place, so a directory with an index is
complete: an interrupted run leaves the previous set or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llada.model.tokenizer import Tokenizer

INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.bin"
SAMPLES_FILE = "samples.npy"


def tokenizer_record(tokenizer: Tokenizer, tokenizer_dir: str | Path) -> dict[str, Any]:
    """What tokenized data records of its tokenizer, for the trainer to check against its own."""
    return {"eos_id": tokenizer.ids.eos, "vocab_size": tokenizer.vocab_size, "vocab_sha256": tokenizer.vocab_sha256,
            "tokenizer": str(Path(tokenizer_dir).resolve())}


def check_made_with(index: dict[str, Any], path: str | Path, tokenizer: Tokenizer, tokenizer_dir: str | Path) -> None:
    """Refuse data tokenized with another tokenizer than ``tokenizer``, naming both (ids would mean other
    tokens). Data made before the fingerprint was recorded is checked by its EOS id alone."""
    made_with = index.get("vocab_sha256", tokenizer.vocab_sha256)
    if index["eos_id"] != tokenizer.ids.eos or made_with != tokenizer.vocab_sha256:
        raise ValueError(f"{path} was made with another tokenizer: {index.get('tokenizer', 'unrecorded')} "
                         f"(EOS {index['eos_id']}, vocabulary {made_with[:12]}), not this run's {tokenizer_dir} "
                         f"(EOS {tokenizer.ids.eos}, vocabulary {tokenizer.vocab_sha256[:12]}); tokenize the data "
                         f"with the run's tokenizer")


def nothing_to_write(what: str, max_length: int, dropped_overlong: int, skipped: int) -> ValueError:
    """The error for input that leaves nothing to train on (written instead of an empty directory)."""
    return ValueError(f"no {what} to write: {dropped_overlong} longer than the maximum length {max_length}, "
                      f"{skipped} malformed; nothing was written")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_token_rows(output: Path, data_format: str, tokens: list[int], rows: list[tuple[int, ...]], columns: int,
                     tokenizer: Tokenizer, tokenizer_dir: str | Path, fields: dict[str, Any],
                     issues: Sequence[object]) -> None:
    """Replace ``output``'s three files: the tokens, the (N, ``columns``) rows, and an index of the
    format, the tokenizer (``tokenizer_record``), ``fields`` (counts) and the first 100 ``issues``."""
    output.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    dtype = token_dtype(tokenizer.vocab_size)
    np.asarray(tokens, dtype=dtype).tofile(output / (TOKENS_FILE + suffix))
    with open(output / (SAMPLES_FILE + suffix), "wb") as file:
        np.save(file, np.asarray(rows, dtype=np.int64).reshape(-1, columns))
    record = {"format": data_format, "version": 1, "dtype": dtype.name, **tokenizer_record(tokenizer, tokenizer_dir),
              **fields, "issues": [str(issue) for issue in issues[:100]]}
    (output / (INDEX_FILE + suffix)).write_text(json.dumps(record, indent=2) + "\n")
    for name in (TOKENS_FILE, SAMPLES_FILE, INDEX_FILE):  # the index last: it marks the set complete
        os.replace(output / (name + suffix), output / name)


def read_index(directory: Path, data_format: str, command: str) -> dict[str, Any]:
    """A data directory's ``index.json``, checked to be of ``data_format``; ``command`` makes one."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: run `{command}` first")
    index = json.loads(index_path.read_text())
    if index.get("format") != data_format:
        raise ValueError(f"{index_path} is a {index.get('format')!r} index, not {data_format!r} (made by `{command}`)")
    return index


def read_token_rows(directory: str | Path, data_format: str, command: str
                    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The index, the (N, columns) rows and the memory-mapped tokens of a directory of ``data_format``;
    ``command`` is what makes one, for the error when it is missing."""
    directory = Path(directory)
    index = read_index(directory, data_format, command)
    rows = np.load(directory / SAMPLES_FILE)
    size = (directory / TOKENS_FILE).stat().st_size
    tokens = np.memmap(directory / TOKENS_FILE, dtype=np.dtype(index["dtype"]), mode="r") if size \
        else np.zeros(0, dtype=np.int64)
    return index, rows, tokens
