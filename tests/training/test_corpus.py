"""Corpus readers: every format yields its documents; bad records fail or are skipped, never lost silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from llada.training.corpus import CorpusError, CorpusIssue, expand_inputs, read_documents


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_text_file_as_one_document_or_lines(tmp_path: Path) -> None:
    file = write(tmp_path / "a.txt", "first line\n\nsecond line\n")
    assert [r.text for r in read_documents(file)] == ["first line\n\nsecond line\n"]
    assert [(r.text, r.line) for r in read_documents(file, text_unit="line")] == [("first line", 1), ("second line", 3)]


def test_jsonl_fields_and_errors(tmp_path: Path) -> None:
    file = write(tmp_path / "a.jsonl", b'{"text": "one"}\n{"body": "x"}\n{broken\n\xff\xfe\n{"text": "five"}\n')
    with pytest.raises(CorpusError, match=r"a.jsonl:2: no string field 'text'"):
        list(read_documents(file))
    issues: list[CorpusIssue] = []
    records = list(read_documents(file, on_error="skip", report=issues.append))
    assert [(r.text, r.line) for r in records] == [("one", 1), ("five", 5)]
    assert [(i.line, i.problem.split(" (")[0]) for i in issues] == [(2, "no string field 'text'"), (3, "invalid JSON"),
                                                                      (4, "not valid UTF-8")]
    assert [r.text for r in read_documents(file, text_field="body", on_error="skip", report=issues.append)] == ["x"]


def test_non_utf8_text_and_empty_files(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.txt", b"fine\nbroken \xff here\n")
    with pytest.raises(CorpusError, match=r"bad.txt:2: not valid UTF-8"):
        list(read_documents(bad))
    empty = write(tmp_path / "empty.txt", "  \n")
    issues: list[CorpusIssue] = []
    assert list(read_documents(empty, on_error="skip", report=issues.append)) == []
    assert str(issues[0]).endswith("empty.txt: file is empty")


def test_parquet(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    file = tmp_path / "a.parquet"
    parquet.write_table(pyarrow.table({"text": ["alpha", "", "gamma"], "n": [1, 2, 3]}), file)
    assert [(r.text, r.line) for r in read_documents(file)] == [("alpha", 1), ("gamma", 3)]
    with pytest.raises(CorpusError, match="no column 'body'"):
        list(read_documents(file, text_field="body"))
    write(tmp_path / "broken.parquet", b"PAR1 not really")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        list(read_documents(tmp_path / "broken.parquet"))


def test_expand_inputs(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "c.jsonl"):
        write(tmp_path / name, "x")
    assert [p.name for p in expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])] == ["a.txt", "b.txt"]
    with pytest.raises(CorpusError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.md")])
    with pytest.raises(CorpusError, match="matches no file"):
        expand_inputs([str(tmp_path / "missing.txt")])
