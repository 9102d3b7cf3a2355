"""Preference optimization on the demo model: after VRPO on pairs of a correct and a wrong answer to
arithmetic questions, does the model prefer the correct answer to questions it has never seen?

Stages (each a subcommand):
- ``pairs``: from the demo model's task data (``scripts/prepare_demo_data.py``), training pairs on
  arithmetic questions of its SFT training data (one wrong answer per question: the right value moved
  by 1-10, or another operator's value) and held-out pairs on its held-out arithmetic questions
  (``tasks_test.jsonl``: 2-digit ± 2-digit and 2-digit × 1-digit, never in any training data).
  With ``--products``, 2-digit × 2-digit products instead: a shape the demo model was never
  fine-tuned on (it multiplies by one digit only), where it is mostly wrong, so that training has
  room to show a gain; training and held-out questions are disjoint (either operand order) and
  none is in the SFT data;
- ``evaluate``: a model's held-out preference accuracy (its ELBO of the correct answer above that of
  the wrong one; ELBO from 64 stratified draws) and exact-match accuracy of its own answers (the
  engine's defaults, 8 tokens), each with a 95% Wilson interval, beside two baselines: chance and
  "prefer the shorter answer";
- ``compare``: before vs after on the same items, the paired difference with its standard error;
- ``prompts``: training pairs as RL prompts (the correct answer kept for the exact-answer reward).

    python scripts/prepare_demo_data.py --out data/demo
    python benchmarks/preference_demo.py pairs --demo-data data/demo --out data/demo/preference
    llada data preference data/demo/preference/train.jsonl --tokenizer models/demo --output data/demo/preference/pairs
    llada train configs/demo_vrpo.yaml
    llada export runs/demo-vrpo runs/demo-vrpo-model --dtype fp32
    python benchmarks/preference_demo.py evaluate --model models/demo --pairs data/demo/preference/heldout.jsonl --out before.json
    python benchmarks/preference_demo.py evaluate --model runs/demo-vrpo-model --pairs ... --out after.json
    python benchmarks/preference_demo.py compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch
from sample_statistics import paired_difference, wilson
from tqdm.auto import tqdm

from llada import Engine, GenerationSettings
from llada.diffusion.likelihood import packed_elbo_samples
from llada.model.loading import load
from llada.training.preference_data import encode_preference

QUESTION = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


ARITHMETIC_KINDS = ("add", "sub", "mul")


def _questions(path: Path) -> list[tuple[int, str, int]]:
    """The arithmetic questions of a training file (chat lines) or a test file (prompt lines)."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") in ARITHMETIC_KINDS:
            match = QUESTION.match(record["messages"][0]["content"] if "messages" in record else record["prompt"])
            found.append((int(match[1]), match[2], int(match[3])))
    return found


def _pair(question: tuple[int, str, int], rng: random.Random) -> dict:
    a, operator, b = question
    value = OPERATORS[operator](a, b)
    others = [OPERATORS[o](a, b) for o in OPERATORS if o != operator]
    candidates = [value + d for d in range(-10, 11) if d] + others
    wrong = rng.choice([c for c in candidates if c != value])
    return {"prompt": f"What is {a} {operator} {b}?", "chosen": str(value), "rejected": str(wrong)}


def _write_pairs(out: Path, train: list[tuple[int, str, int]], heldout: list[tuple[int, str, int]],
                 rng: random.Random) -> None:
    """train.jsonl and heldout.jsonl under ``out``: one (correct, wrong) pair per question."""
    out.mkdir(parents=True, exist_ok=True)
    for name, questions in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (out / name).write_text("".join(json.dumps(_pair(q, rng)) + "\n" for q in questions))


def make_pairs(demo_data: Path, out: Path, train_count: int, heldout_count: int, seed: int) -> None:
    rng = random.Random(seed)
    sft_train, unseen = _questions(demo_data / "sft_train.jsonl"), _questions(demo_data / "tasks_test.jsonl")
    train = rng.sample(sorted(set(sft_train)), train_count)
    heldout = rng.sample(unseen, min(heldout_count, len(unseen)))
    assert not set(heldout) & set(sft_train)
    _write_pairs(out, train, heldout, rng)
    print(f"{len(train)} training pairs (from {len(set(sft_train))} distinct SFT questions), {len(heldout)} held-out "
          f"pairs (from {len(unseen)} questions in no training data) -> {out}")


def make_product_pairs(demo_data: Path, out: Path, train_count: int, heldout_count: int, seed: int) -> None:
    rng = random.Random(seed)
    trained = {(min(a, b), max(a, b)) for a, operator, b in _questions(demo_data / "sft_train.jsonl") if operator == "*"}
    products = [(a, b) for a in range(10, 100) for b in range(a, 100) if (a, b) not in trained]
    if train_count + heldout_count > len(products):
        raise SystemExit(f"only {len(products)} 2-digit x 2-digit products are not in the SFT data; ask for fewer")
    chosen = rng.sample(products, train_count + heldout_count)
    ordered = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]  # either order is one product
    questions = [(a, "*", b) for a, b in ordered]
    _write_pairs(out, questions[:train_count], questions[train_count:], rng)
    print(f"{train_count} training and {heldout_count} held-out pairs of 2-digit x 2-digit products (disjoint, "
          f"none of the {len(trained)} products in the SFT data) -> {out}")


@torch.no_grad()
def evaluate(model_dir: str, pairs_path: Path, device: str, draws: int, seed: int) -> dict:
    model, tokenizer = load(model_dir, device, "auto")
    records = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    triples = [encode_preference(tokenizer, json.dumps(r)) for r in records]
    prefers, shorter = [], []
    for start in tqdm(range(0, len(triples), 16), desc="scoring", unit="batch"):
        chunk = triples[start:start + 16]
        items, generators = [], []
        for offset, (prompt, chosen, rejected) in enumerate(chunk):
            for answer in (chosen, rejected):
                items.append((torch.tensor(prompt), torch.tensor(answer)))
                generators.append(torch.Generator(device=model.device).manual_seed(seed + start + offset))
        samples = packed_elbo_samples(model, items, draws, generator=generators)
        for k, (_, chosen, rejected) in enumerate(chunk):
            prefers.append(float(samples[2 * k].mean()) > float(samples[2 * k + 1].mean()))
            shorter.append(len(chosen) < len(rejected) or (len(chosen) == len(rejected) and random.random() < 0.5))
    engine = Engine(model)
    settings = GenerationSettings(gen_length=8, block_length=8)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in records]
    exact = []
    for start in tqdm(range(0, len(prompts), 64), desc="answering", unit="batch"):
        for result, record in zip(engine.generate(prompts[start:start + 64], settings),
                                  records[start:start + 64]):
            ids = result.answer.tolist()
            stops = [i for i, t in enumerate(ids) if t in (tokenizer.ids.eos, tokenizer.ids.eot)]
            text = tokenizer.decode(ids[:stops[0]] if stops else ids, skip_special_tokens=True)
            exact.append(text.strip() == record["chosen"])
    n = len(records)
    return {"model": model_dir, "items": n, "elbo_draws": draws, "seed": seed, "device": str(model.device),
            "preference_accuracy": sum(prefers) / n, "preference_interval": wilson(sum(prefers), n),
            "exact_match": sum(exact) / n, "exact_match_interval": wilson(sum(exact), n),
            "baseline_chance": 0.5, "baseline_shorter_answer": sum(shorter) / n,
            "per_item": {"prefers_correct": prefers, "exact": exact}}


def compare(before: dict, after: dict) -> dict:
    """Paired before/after differences on the same items, with standard errors."""
    result = {}
    for name, key in (("preference_accuracy", "prefers_correct"), ("exact_match", "exact")):
        mean, stderr = paired_difference(before["per_item"][key], after["per_item"][key])
        result[name] = {"before": before[name], "after": after[name], "difference": round(mean, 4),
                        "difference_stderr": round(stderr, 4), "items": len(before["per_item"][key])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pairs = commands.add_parser("pairs")
    pairs.add_argument("--demo-data", type=Path, required=True)
    pairs.add_argument("--out", type=Path, required=True)
    pairs.add_argument("--train", type=int, default=4000)
    pairs.add_argument("--heldout", type=int, default=600)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--products", action="store_true", help="2-digit x 2-digit products (see above)")
    scoring = commands.add_parser("evaluate")
    scoring.add_argument("--model", required=True)
    scoring.add_argument("--pairs", type=Path, required=True)
    scoring.add_argument("--device", default="auto")
    scoring.add_argument("--draws", type=int, default=64)
    scoring.add_argument("--seed", type=int, default=0)
    scoring.add_argument("--out", type=Path, required=True)
    prompts = commands.add_parser("prompts", help="pairs -> RL prompts (the chosen answer as the reference answer)")
    prompts.add_argument("pairs_file", type=Path)
    prompts.add_argument("--out", type=Path, required=True)
    comparing = commands.add_parser("compare")
    comparing.add_argument("before", type=Path)
    comparing.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "pairs":
        make = make_product_pairs if args.products else make_pairs
        make(args.demo_data, args.out, args.train, args.heldout, args.seed)
    elif args.command == "prompts":
        records = [json.loads(line) for line in args.pairs_file.read_text().splitlines()]
        args.out.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["chosen"]}) + "\n" for r in records))
    elif args.command == "evaluate":
        random.seed(args.seed)
        result = evaluate(args.model, args.pairs, args.device, args.draws, args.seed)
        args.out.write_text(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "per_item"}))
    else:
        print(json.dumps(compare(json.loads(args.before.read_text()), json.loads(args.after.read_text())), indent=2))


if __name__ == "__main__":
    main()
