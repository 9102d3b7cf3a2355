"""Sampling ablations on the demo model: steps, block length, remasking, guidance (reference sampler).

Held-out chat questions of the demo data (``scripts/prepare_demo_data.py`` writes
``data/demo/tasks_test.jsonl``: arithmetic, word lists, verse, definitions) are answered under
each setting with the engine's exact mode (``cache="none"``, ``policy="fixed"``, no early stop:
the reference sampler's algorithm, token for token, but computing logits for the current block
only, which makes it several times faster on a CPU). Scores per kind: exact match of the answer
text with the held-out answer, and word-overlap F1 (as in SQuAD), which still moves when a weak
model is never exactly right.

    python scripts/prepare_demo_data.py --out data/demo
    python benchmarks/sampling_ablations.py --data data/demo/tasks_test.jsonl \
        --out benchmarks/results/eval/sampling_ablations_demo.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from llada.engine.answer_text import answer_text
from llada.engine.engine import Engine, GenerationSettings
from llada.evaluation.text_metrics import word_f1
from llada.model.loading import DEMO_MODEL
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

# (label, steps, block_length, remasking, cfg_scale) for answers of 32 tokens; the first is the baseline.
SETTINGS = [
    ("baseline: 32 steps, block 8, low-confidence", 32, 8, "low_confidence", 0.0),
    ("steps 16", 16, 8, "low_confidence", 0.0),
    ("steps 8", 8, 8, "low_confidence", 0.0),
    ("steps 4", 4, 8, "low_confidence", 0.0),
    ("block 4", 32, 4, "low_confidence", 0.0),
    ("block 16", 32, 16, "low_confidence", 0.0),
    ("block 32 (one block)", 32, 32, "low_confidence", 0.0),
    ("random remasking", 32, 8, "random", 0.0),
    ("cfg 0.5", 32, 8, "low_confidence", 0.5),
    ("cfg 1.0", 32, 8, "low_confidence", 1.0),
    ("cfg 2.0", 32, 8, "low_confidence", 2.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--data", default="data/demo/tasks_test.jsonl")
    parser.add_argument("--per-kind", type=int, default=50)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = LLaDAModel.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(args.model)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for line in Path(args.data).read_text().splitlines():
        record = json.loads(line)
        if not record["raw"] and len(by_kind[record["kind"]]) < args.per_kind:
            by_kind[record["kind"]].append(record)
    samples = [s for kind in sorted(by_kind) for s in by_kind[kind]]
    ids = [tokenizer.encode_chat([{"role": "user", "content": s["prompt"]}]) for s in samples]
    engine = Engine(model)
    rows = []
    for label, steps, block, remasking, cfg in SETTINGS:
        settings = GenerationSettings(gen_length=args.gen_length, block_length=block, policy="fixed", steps=steps,
                                      cache="none", early_stop=False, remasking=remasking, cfg_scale=cfg)
        start = time.perf_counter()
        results = engine.generate(ids, settings, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        exact: dict[str, list[bool]] = defaultdict(list)
        overlap: dict[str, list[float]] = defaultdict(list)
        for sample, answer in zip(samples, (r.answer for r in results)):
            expected = sample["answer"].strip()
            text = answer_text(tokenizer, answer.tolist()).strip()
            exact[sample["kind"]].append(text == expected)
            overlap[sample["kind"]].append(word_f1(text, expected))
        row = {"setting": label, "steps": steps, "block_length": block, "remasking": remasking, "cfg_scale": cfg,
               "seconds": seconds, "exact": {k: sum(v) / len(v) for k, v in sorted(exact.items())},
               "f1": {k: sum(v) / len(v) for k, v in sorted(overlap.items())}}
        row["mean_f1"] = sum(row["f1"].values()) / len(row["f1"])
        row["mean_exact"] = sum(row["exact"].values()) / len(row["exact"])
        rows.append(row)
        print(f"{label:45s} F1 " + "  ".join(f"{kind} {value:5.1%}" for kind, value in row["f1"].items())
              + f"  mean {row['mean_f1']:5.1%}  exact {row['mean_exact']:5.1%}  ({seconds:.1f} s)", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "per_kind": args.per_kind,
                                              "gen_length": args.gen_length, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
