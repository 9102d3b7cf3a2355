"""The demo model on its held-out task questions: exact match per kind with 95% Wilson intervals.

Reads ``tasks_test.jsonl`` from ``scripts/prepare_demo_data.py`` (none of its questions is in the
training data; see scripts/demo_tasks.py), answers every question with the engine at the settings
``make demo`` uses, and scores:
- chat kinds: the answer text, stripped, equals the expected answer exactly;
- ``raw`` (plain prompts without the chat template, as ``/v1/completions`` and ``generate --no-chat``
  see them): the continuation is non-empty (its content is not scored: the prompts are line starts).
Beside each kind, a trivial baseline: copying the list (reverse, sort), the most common answer of the
kind (the rest), and for ``raw`` an empty answer.

``sort_middle`` is infilling, from the same held-out sorting questions: the answer is given with its
first and last word and a gap where the middle words go (``llada infill --question``), so the gap is
filled from both sides. Its baseline fills the gap with the missing words in the order the question
lists them (right whenever that order happens to be sorted).

    python benchmarks/demo_tasks.py --model models/demo --tests data/demo/tasks_test.jsonl --out result.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from sample_statistics import wilson
from tqdm.auto import tqdm

from llada import Engine, GenerationSettings
from llada.diffusion.infilling import infill_text
from llada.engine.answer_text import answer_text
from llada.model.loading import load
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

# scripts/demo_tasks.py (the task definitions) shares this file's name, so it is loaded by path.
_spec = importlib.util.spec_from_file_location("demo_task_kinds", Path(__file__).parents[1] / "scripts" / "demo_tasks.py")
task_kinds = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_kinds)

# What `make demo` passes (its answers are short).
SETTINGS = GenerationSettings(gen_length=32, block_length=8)


def baseline(kind: str, items: list[dict]) -> float:
    """Share of items a trivial answer gets right (see the module docstring)."""
    if kind == "raw":
        return 0.0
    if kind in ("reverse", "sort"):
        return sum(i["prompt"].split(": ", 1)[1] == i["answer"] for i in items) / len(items)
    most_common = Counter(i["answer"] for i in items).most_common(1)[0][1]
    return most_common / len(items)


def middle_baseline(item: dict) -> bool:
    """Whether the missing middle words, in the question's order, are the sorted answer."""
    inner = item["answer"].split(", ")[1:-1]
    listed = [word for word in item["prompt"].split(": ", 1)[1].split(", ") if word in inner]
    return listed == inner


def fill_middles(model: LLaDAModel, tokenizer: Tokenizer, items: list[dict]) -> list[str]:
    """Each sorting answer re-made by infilling its middle words between its first and last."""
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    answers = []
    for item in tqdm(items, desc="infilling", unit="item"):
        answers.append(infill_text(model, tokenizer, task_kinds.middle_gap(item["answer"], count), item["prompt"]))
    return answers


def score(kind: str, text: str, expected: str) -> bool:
    return bool(text.strip()) if kind == "raw" else text.strip() == expected.strip()


def run(model_dir: str, tests: Path, device: str, dtype: str, batch_size: int, seed: int,
        compile: bool) -> dict:
    items = [json.loads(line) for line in tests.read_text(encoding="utf-8").splitlines()]
    model, tokenizer = load(model_dir, device, dtype)
    engine = Engine(model, compile=compile)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    prompts = [tokenizer.encode(i["prompt"]) if i["raw"] else
               tokenizer.encode_chat([{"role": "user", "content": i["prompt"]}]) for i in items]
    answers: list[str] = []
    started = time.perf_counter()
    for start in tqdm(range(0, len(items), batch_size), desc="answering", unit="batch"):
        results = engine.generate(prompts[start:start + batch_size], SETTINGS, generator)
        answers += [answer_text(tokenizer, r.answer.tolist()) for r in results]
    middles = [{**i, "kind": "sort_middle"} for i in items if i["kind"] == "sort" and i["answer"].count(", ") >= 2]
    answers += fill_middles(model, tokenizer, middles)
    items += middles
    seconds = time.perf_counter() - started
    by_kind: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for item, answer in zip(items, answers):
        by_kind[item["kind"]].append((item, answer))
    kinds = {}
    for kind, pairs in by_kind.items():
        right = sum(score(kind, answer, item["answer"]) for item, answer in pairs)
        asked = [i for i, _ in pairs]
        trivial = sum(map(middle_baseline, asked)) / len(asked) if kind == "sort_middle" else baseline(kind, asked)
        kinds[kind] = {"items": len(pairs), "correct": right, "accuracy": round(right / len(pairs), 4),
                       "interval": wilson(right, len(pairs)), "baseline": round(trivial, 4),
                       "examples": [{"prompt": i["prompt"], "expected": i["answer"], "answer": a} for i, a in pairs[:5]]}
    return {"model": model_dir, "tests": str(tests), "device": str(model.device), "dtype": str(model.dtype),
            "settings": {"gen_length": SETTINGS.gen_length, "block_length": SETTINGS.block_length,
                         "policy": SETTINGS.policy, "threshold": SETTINGS.threshold, "cache": SETTINGS.cache},
            "seed": seed, "seconds": round(seconds, 1), "kinds": kinds,
            "answers": [{"kind": i["kind"], "prompt": i["prompt"], "expected": i["answer"], "answer": a}
                        for i, a in zip(items, answers)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/demo")
    parser.add_argument("--tests", type=Path, default=Path("data/demo/tasks_test.jsonl"))
    parser.add_argument("--out", type=Path, help="JSON file for the figures and every answer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    result = run(args.model, args.tests, args.device, args.dtype, args.batch_size, args.seed, args.compile)
    print(f"{'kind':<10}{'items':>6}{'exact':>8}  {'95% interval':<16}{'baseline':>9}")
    for kind, row in result["kinds"].items():
        low, high = row["interval"]
        print(f"{kind:<10}{row['items']:>6}{row['accuracy']:>8.1%}  [{low:.1%}, {high:.1%}]{'':<3}{row['baseline']:>8.1%}")
    print(f"{len(result['answers'])} answers in {result['seconds']} s on {result['device']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
