"""Reading raw training text: plain text, JSONL and Parquet files, with bad records reported, not lost.

Each reader yields ``Record(text, line)`` for one document. Problems (undecodable bytes, malformed
JSON, a missing field, an empty file) become ``CorpusIssue``s: with ``on_error="fail"`` the first one
raises ``CorpusError`` naming file and line; with ``"skip"`` the record is skipped and the issue is
handed to the caller, who counts and reports it. Tokenization happens elsewhere.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

OnError = Literal["fail", "skip"]
T = TypeVar("T")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet"}


class CorpusError(ValueError):
    """A record could not be read and the error policy is to fail."""


@dataclass(frozen=True)
class Record:
    """One document and where it came from (1-based line, 0 for whole-file documents, row for Parquet)."""

    text: str
    line: int


@dataclass(frozen=True)
class CorpusIssue:
    """A record that could not be used."""

    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}" if self.line else f"{self.path}: {self.problem}"


def describe_error(error: Exception) -> str:
    """What was wrong with a line, in words (JSON and decoding errors name their cause)."""
    if isinstance(error, UnicodeDecodeError):
        return "not valid UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON ({error.msg})"
    return str(error)


def parsed_lines(inputs: Sequence[str], parse: Callable[[str], T], on_error: OnError, issues: list[CorpusIssue],
                 progress: bool = True) -> Iterator[T]:
    """``parse(line)`` for each non-blank line of the input files (paths or globs), with a progress bar.

    A line ``parse`` rejects with a ValueError (JSON, fields, chat template), or whose bytes are not
    UTF-8, stops the run with a ``CorpusError`` naming file and line (``on_error="fail"``), or is
    skipped and appended to ``issues``.
    """
    for path in expand_inputs(inputs):
        lines = path.read_bytes().split(b"\n")
        for number, raw in enumerate(tqdm(lines, desc=path.name, unit="line", disable=not progress), start=1):
            if not raw.strip():
                continue
            try:
                value = parse(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                issue = CorpusIssue(str(path), number, describe_error(error))
                if on_error == "fail":
                    raise CorpusError(f"{issue} (use --on-error skip to skip such lines)") from error
                issues.append(issue)
                continue
            yield value


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Paths and glob patterns -> sorted, de-duplicated files; a pattern matching nothing is an error."""
    files: set[Path] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()]
        else:
            matches = [Path(pattern)] if Path(pattern).is_file() else []
        if not matches:
            raise CorpusError(f"input {pattern!r} matches no file")
        files.update(m.resolve() for m in matches)
    return sorted(files)


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file (gzipped when named ``.gz``);
    ValueError naming file:line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from error


def file_kind(path: Path) -> Literal["text", "jsonl", "parquet"]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def read_documents(path: Path, text_field: str = "text", text_unit: Literal["file", "line"] = "file",
                   on_error: OnError = "fail", report: Callable[[CorpusIssue], None] | None = None) -> Iterator[Record]:
    """Documents of one file.

    Args:
        path: a .txt-like, .jsonl or .parquet file.
        text_field: the field (JSONL) or column (Parquet) that holds the text.
        text_unit: for plain text, one document per file (default) or per non-empty line.
        on_error: ``fail`` raises on the first bad record; ``skip`` reports it and goes on.
        report: receives each skipped issue (required to not lose track with ``skip``).
    """
    def problem(line: int, message: str) -> None:
        issue = CorpusIssue(str(path), line, message)
        if on_error == "fail":
            raise CorpusError(str(issue) + " (use --on-error skip to skip such records)")
        if report is not None:
            report(issue)

    kind = file_kind(path)
    if kind == "parquet":
        yield from _read_parquet(path, text_field, problem)
        return
    raw = path.read_bytes()
    if not raw.strip():
        problem(0, "file is empty")
        return
    if kind == "text" and text_unit == "file":
        try:
            yield Record(raw.decode("utf-8"), 0)
        except UnicodeDecodeError as error:
            line = raw[:error.start].count(b"\n") + 1
            problem(line, f"not valid UTF-8 (byte {error.start})")
        return
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            problem(number, "not valid UTF-8")
            continue
        if kind == "text":
            yield Record(line, number)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problem(number, f"invalid JSON ({error.msg})")
            continue
        text = value.get(text_field) if isinstance(value, dict) else None
        if not isinstance(text, str):
            problem(number, f"no string field {text_field!r}")
            continue
        if text:
            yield Record(text, number)


def _read_parquet(path: Path, column: str, problem: Callable[[int, str], None]) -> Iterator[Record]:
    try:
        from pyarrow import parquet
    except ImportError as error:
        raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install 'llada[parquet]')") from error
    try:
        table = parquet.ParquetFile(str(path))
    except Exception as error:  # noqa: BLE001 - pyarrow raises its own ArrowInvalid and OSError subclasses
        problem(0, f"not a readable Parquet file ({error})")
        return
    if column not in table.schema_arrow.names:
        problem(0, f"no column {column!r} (columns: {table.schema_arrow.names})")
        return
    row = 0
    for batch in table.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                problem(row, f"column {column!r} is not a string")
            elif value:
                yield Record(value, row)
