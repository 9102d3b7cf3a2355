"""Prepared fine-tuning data on disk, shared by SFT and preference data.

A directory holds ``tokens.bin`` (every sample's ids back to back, in the smallest unsigned dtype
that fits the vocabulary), ``samples.npy`` (one int64 row per sample: its offset into the tokens,
then the lengths of its parts) and ``index.json`` (format, counts, the tokenizer's EOS id and vocabulary
size). The index is written last, after the other two are in place, so a directory with an index is
complete: an interrupted run leaves the previous set or none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.bin"
SAMPLES_FILE = "samples.npy"


def write_token_rows(output: Path, data_format: str, tokens: np.ndarray, rows: np.ndarray,
                     index: dict[str, Any]) -> None:
    """Replace ``output``'s three files with these tokens, rows and ``index`` fields (format and dtype added)."""
    output.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tokens.tofile(output / (TOKENS_FILE + suffix))
    with open(output / (SAMPLES_FILE + suffix), "wb") as file:
        np.save(file, rows.astype(np.int64))
    record = {"format": data_format, "version": 1, "dtype": tokens.dtype.name, **index}
    (output / (INDEX_FILE + suffix)).write_text(json.dumps(record, indent=2) + "\n")
    for name in (TOKENS_FILE, SAMPLES_FILE, INDEX_FILE):  # the index last: it marks the set complete
        os.replace(output / (name + suffix), output / name)


def read_token_rows(directory: str | Path, data_format: str, command: str
                    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The index, the (N, columns) rows and the memory-mapped tokens of a directory of ``data_format``;
    ``command`` is what makes one, for the error when it is missing."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: run `{command}` first")
    index = json.loads(index_path.read_text())
    if index.get("format") != data_format:
        raise ValueError(f"{index_path} is a {index.get('format')!r} index, not {data_format!r} (made by `{command}`)")
    rows = np.load(directory / SAMPLES_FILE)
    size = (directory / TOKENS_FILE).stat().st_size
    tokens = np.memmap(directory / TOKENS_FILE, dtype=np.dtype(index["dtype"]), mode="r") if size \
        else np.zeros(0, dtype=np.int64)
    return index, rows, tokens
