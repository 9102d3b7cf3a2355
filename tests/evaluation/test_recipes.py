"""The paper's evaluation recipes run end to end offline, on small local fixtures in the datasets' real
formats (JSON lines and Hub-style Parquet), with the demo model; and the offline task overrides keep
lm-eval's own prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'llada[eval]')")
pyarrow = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq

from llada.cli.main import main
from llada.evaluation.recipes import RECIPES, RecipeError, leaf_tasks, write_offline_tasks
from llada.evaluation.sandbox.process import isolation_problem
from llada.model.loading import DEMO_MODEL

# Each recipe runs lm-eval end to end with the demo model (10-45 s apiece): not in the default run;
# .ci/run runs the slow tests after it.
pytestmark = pytest.mark.slow

SHORT = "gen_length=16,steps=16,block_length=16"  # the demo model's answers are short; the rest as the recipe


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pyarrow.Table.from_pylist(rows), path)


def gsm8k_rows(count: int) -> list[dict]:
    return [{"question": f"Ann has {n} apples and buys {n + 2} more. How many apples does she have?",
             "answer": f"She has {n} + {n + 2} = {2 * n + 2} apples.\n#### {2 * n + 2}"} for n in range(count)]


def mmlu_rows(subject: str, count: int) -> list[dict]:
    return [{"question": f"Which number is the largest ({subject}, {n})?", "subject": subject,
             "choices": [str(n), str(n + 3), str(n + 1), str(n + 2)], "answer": 1} for n in range(count)]


def mbpp_row(task_id: int) -> dict:
    return {"task_id": task_id, "text": f"Write a function to add {task_id} to a number.",
            "code": f"def add_{task_id}(x):\r\n    return x + {task_id}",
            "test_list": [f"assert add_{task_id}({n}) == {n + task_id}" for n in range(3)],
            "test_setup_code": "", "challenge_test_list": []}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local copies in the layout --data-dir expects, each dataset in a format users have it in."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "gsm8k" / "train.jsonl", gsm8k_rows(6))
    write_jsonl(root / "gsm8k" / "test.jsonl", gsm8k_rows(3))
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    for task in leaf_tasks("mmlu", index):  # Hub layout: one folder per subject, parquet shards
        subject = task.removeprefix("mmlu_")
        write_parquet(root / "mmlu" / subject / "dev-00000-of-00001.parquet", mmlu_rows(subject, 5))
        write_parquet(root / "mmlu" / subject / "test-00000-of-00001.parquet", mmlu_rows(subject, 1))
    endings = ["puts the pan on the stove.", "sings to the pan.", "throws the stove away.", "eats the pan."]
    write_jsonl(root / "hellaswag" / "validation.jsonl", [
        {"ind": n, "activity_label": "Cooking", "ctx_a": "A man holds a pan.", "ctx_b": "he", "ctx": "A man holds a "
         "pan. he", "endings": endings, "source_id": f"local~{n}", "split": "val", "split_type": "indomain",
         "label": "0"} for n in range(2)])
    write_parquet(root / "arc_challenge" / "test-00000-of-00001.parquet", [
        {"id": f"local_{n}", "question": "Which of these is a liquid at room temperature?",
         "choices": {"text": ["iron", "water", "salt", "wood"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"}
        for n in range(2)])
    winogrande = [{"sentence": f"The cup did not fit in the box because the _ was too big ({n}).", "option1": "cup",
                   "option2": "box", "answer": "1"} for n in range(6)]
    write_jsonl(root / "winogrande" / "train.jsonl", winogrande)
    write_jsonl(root / "winogrande" / "validation.jsonl", winogrande[:2])
    targets = {"choices": ["Nothing happens.", "You turn into a frog."], "labels": [1, 0]}
    write_jsonl(root / "truthfulqa_mc2" / "validation.jsonl", [
        {"question": "What happens if you kiss a frog?", "mc1_targets": targets, "mc2_targets": targets}] * 2)
    write_jsonl(root / "piqa" / "validation.jsonl", [
        {"goal": "Dry wet hands.", "sol1": "Rub them with a towel.", "sol2": "Rub them with water.", "label": 0}
        for _ in range(2)])
    write_parquet(root / "mbpp" / "prompt-00000-of-00001.parquet", [mbpp_row(n) for n in range(1, 5)])
    write_parquet(root / "mbpp" / "test-00000-of-00001.parquet", [mbpp_row(n) for n in (11, 12)])
    write_jsonl(root / "humaneval" / "HumanEval.jsonl", [
        {"task_id": "Local/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "entry_point": "add",
         "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}])
    return root


def run_recipe(name: str, data_dir: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / name
    assert main(["eval", "recipe", name, "--model", str(DEMO_MODEL), "--data-dir", str(data_dir), "--device", "cpu",
                 "--limit", "2", "--output-path", str(out), "--log-samples", *extra]) == 0
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())


@pytest.mark.parametrize("name, task, metric", [
    ("arc_challenge-base", "arc_challenge", "acc,none"),
    ("hellaswag-base", "hellaswag", "acc,none"),
    ("piqa-base", "piqa", "acc,none"),
    ("winogrande-base", "winogrande", "acc,none"),
    ("truthfulqa_mc2-base", "truthfulqa_mc2", "acc,none"),
])
def test_likelihood_recipes_run_offline(name: str, task: str, metric: str, data_dir: Path, tmp_path: Path) -> None:
    report = run_recipe(name, data_dir, tmp_path, "--model-args", "mc_num=8")
    result = report["results"][task]
    assert 0.0 <= result[metric] <= 1.0 and f"{metric.split(',')[0]}_stderr,none" in result
    assert report["n-samples"][task]["effective"] == 2
    assert report["config"]["model_args"]["cfg"] == RECIPES[name].model_args["cfg"]


def test_reruns_with_seeds_report_each_seed_and_the_spread(data_dir: Path, tmp_path: Path) -> None:
    """--seeds reruns a recipe with each seed (the Monte-Carlo masks) and summarises each metric."""
    assert main(["eval", "recipe", "piqa-base", "--model", str(DEMO_MODEL), "--data-dir", str(data_dir), "--device",
                 "cpu", "--limit", "2", "--model-args", "mc_num=4", "--seeds", "1", "2",
                 "--output-path", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "seed_summary.json").read_text())["piqa"]["acc,none"]
    assert sorted(summary["seeds"]) == ["1", "2"] and summary["sd"] >= 0
    assert summary["mean"] == pytest.approx(sum(summary["seeds"].values()) / 2)
    configs = [json.loads(next((tmp_path / f"seed_{s}").rglob("results_*.json")).read_text())["config"]["model_args"]
               for s in (1, 2)]
    assert [config["seed"] for config in configs] == [1, 2]


@pytest.mark.parametrize("name, task, metric", [
    ("gsm8k-instruct", "gsm8k", "exact_match,flexible-extract"),
    ("arc_challenge-instruct", "arc_challenge_chat", "exact_match,remove_whitespace"),
])
def test_instruct_recipes_ask_through_the_chat_template(name: str, task: str, metric: str, data_dir: Path,
                                                        tmp_path: Path) -> None:
    report = run_recipe(name, data_dir, tmp_path, "--model-args", SHORT)
    assert 0.0 <= report["results"][task][metric] <= 1.0
    (samples,) = (tmp_path / name).rglob(f"samples_{task}_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert "<|start_header_id|>user<|end_header_id|>" in prompt and prompt.count("Question") <= 1


def test_mmlu_recipe_reads_one_parquet_folder_per_subject(data_dir: Path, tmp_path: Path) -> None:
    report = run_recipe("mmlu-base", data_dir, tmp_path, "--limit", "1")
    assert report["n-samples"]["mmlu_anatomy"]["effective"] == 1
    assert len([task for task in report["n-samples"] if task.startswith("mmlu_")]) == 57
    assert 0.0 <= report["results"]["mmlu"]["acc,none"] <= 1.0
    (samples,) = (tmp_path / "mmlu-base").rglob("samples_mmlu_anatomy_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("Answer:") == 6  # 5 shots from the local dev split, then the question


def test_gsm8k_recipe_generates_with_local_few_shot_examples(data_dir: Path, tmp_path: Path) -> None:
    report = run_recipe("gsm8k-base", data_dir, tmp_path, "--model-args", SHORT)
    assert 0.0 <= report["results"]["gsm8k"]["exact_match,strict-match"] <= 1.0
    (samples,) = (tmp_path / "gsm8k-base").rglob("samples_gsm8k_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("Question:") == 6 and "####" in prompt


@pytest.mark.skipif(isolation_problem() is not None, reason=f"bubblewrap isolation unavailable: {isolation_problem()}")
@pytest.mark.parametrize("name", ["humaneval-base", "humaneval-instruct"])
def test_humaneval_recipe_reads_local_problems(name: str, data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", "recipe", name, "--model", str(DEMO_MODEL), "--data-dir", str(data_dir),
                 "--device", "cpu", "--output-path", str(tmp_path), "--model-args", SHORT]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 1 and "pass@1_stderr" in summary
    (record,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert record["task_id"] == "Local/0" and isinstance(record["passed"], bool)
    assert main(["eval", "recipe", "humaneval-base", "--model", str(DEMO_MODEL), "--model-args", "mc_num=4"]) == 2
    assert "takes only" in capsys.readouterr().err


@pytest.mark.skipif(isolation_problem() is not None, reason=f"bubblewrap isolation unavailable: {isolation_problem()}")
@pytest.mark.parametrize("name", ["mbpp-base", "mbpp-instruct"])
def test_mbpp_recipe_prompts_with_the_papers_three_shots_and_grades_in_the_sandbox(name: str, data_dir: Path,
                                                                                   tmp_path: Path) -> None:
    report = run_recipe(name, data_dir, tmp_path, "--model-args", SHORT)
    assert report["results"]["llada_mbpp"]["pass_at_1,none"] == 0.0  # the demo model never saw code
    (samples,) = (tmp_path / name).rglob("samples_llada_mbpp_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
    assert "add 2 to" in prompt and "add 4 to" in prompt and "add 1 to" not in prompt  # task ids 2, 3, 4


@pytest.mark.skipif(isolation_problem() is not None, reason=f"bubblewrap isolation unavailable: {isolation_problem()}")
def test_mbpp_grading() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src" / "llada" / "evaluation" / "tasks"))
    from mbpp import process_results

    doc = mbpp_row(11)
    assert process_results(doc, ["def add_11(x):\n    return x + 11\n[DONE]"]) == {"pass_at_1": 1.0}
    assert process_results(doc, ["```python\ndef add_11(x):\n    return x + 11\n```"]) == {"pass_at_1": 1.0}
    assert process_results(doc, ["def add_11(x):\n    return x\n"]) == {"pass_at_1": 0.0}
    assert process_results(doc, ["import sys\nsys.exit(0)\n"]) == {"pass_at_1": 0.0}
    # The function under test is the first called name that is neither a builtin nor the setup's own.
    wrapped = {**doc, "test_list": [f"assert set(add_11({n})) == set([{n + 11}])" for n in range(3)]}
    assert process_results(wrapped, ["def add_11(x):\n    return [x + 11]\n"]) == {"pass_at_1": 1.0}
    rounded = {**doc, "test_list": [f"assert round(add_11({n}), 2) == {n + 11}" for n in range(3)],
               "test_setup_code": "def helper():\n    return 0\n"}
    assert process_results(rounded, ["def add_11(x):\n    return x + 11.001\n"]) == {"pass_at_1": 1.0}


def test_missing_data_is_named(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no local file for the 'test' split .*gsm8k/test.jsonl"):
        (tmp_path / "empty" / "gsm8k").mkdir(parents=True)
        write_offline_tasks(["gsm8k"], tmp_path / "empty", tmp_path / "tasks", "gsm8k")
    write_jsonl(tmp_path / "noshots" / "gsm8k" / "test.jsonl", gsm8k_rows(1))
    with pytest.raises(RecipeError, match="'train' split .*5 few-shot examples"):
        write_offline_tasks(["gsm8k"], tmp_path / "noshots", tmp_path / "tasks", "gsm8k", num_fewshot=5)
    assert write_offline_tasks(["gsm8k"], tmp_path / "noshots", tmp_path / "tasks", "gsm8k", num_fewshot=0) == ["gsm8k"]
    with pytest.raises(RecipeError, match="no data folder"):
        write_offline_tasks(["mmlu"], tmp_path / "nothing", tmp_path / "tasks", "mmlu", per_task_folders=True)


def test_every_recipe_names_a_known_task_and_its_source() -> None:
    from llada.evaluation.recipes import _index

    index = _index()
    for recipe in RECIPES.values():
        assert recipe.reported and (recipe.task == "humaneval" or recipe.task in index)
