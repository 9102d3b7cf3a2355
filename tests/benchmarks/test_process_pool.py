"""Benchmark sweeps run every command; a failure is named with its log, and does not stop the rest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from process_pool import run_all


def test_every_command_runs_and_failures_are_named(tmp_path: Path) -> None:
    def job(name: str, code: str) -> tuple[list[str], Path]:
        return [sys.executable, "-c", code], tmp_path / f"{name}.log"

    jobs = [job("a", "print('done a')"), job("bad", "import sys; print('oops'); sys.exit(3)"), job("c", "print('done c')")]
    with pytest.raises(SystemExit, match=r"1 of 3 runs failed:\n.*exit 3; log .*bad\.log"):
        run_all(jobs, parallel=2)
    assert (tmp_path / "a.log").read_text() == "done a\n" and (tmp_path / "c.log").read_text() == "done c\n"
    assert (tmp_path / "bad.log").read_text() == "oops\n"
    run_all([job("d", "print(1)")], parallel=1)
    with pytest.raises(ValueError, match="at least 1"):
        run_all([], parallel=0)
