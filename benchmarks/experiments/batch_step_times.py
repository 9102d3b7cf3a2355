"""Where a pass of consecutive batches spends its time on the demo model: every step of every batch
timed on its own (the GPU synchronised after each, so the figures add up to more than a pass
without syncs), with the batch's rows, the rows still decoding, the rows refreshed and the graphs
captured during that step. Used to see why batches of 32 gain less over batch 1 at 256-token
answers than at 32-token answers (docs/engine.md, "Batching on a trained model").

    PYTHONPATH=src:benchmarks python benchmarks/experiments/batch_step_times.py --batch 32 --gen-length 256 \
        --block-length 32 --out benchmarks/results/engine/batch_step_times_gen256_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from engine_quality import device_name, prompts, synchronize

from llada.engine.engine import Engine, GenerationSettings
from llada.model.loading import DEMO_MODEL
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel


def timed_pass(engine: Engine, ids: list[list[int]], settings: GenerationSettings, batch: int) -> list[dict]:
    """One row per step: which batch, its shape and live rows before the step, refreshes, ms, captures."""
    rows = []
    for number, start in enumerate(range(0, len(ids), batch)):
        synchronize(engine.device.type)
        begin = time.perf_counter()
        run = engine.start(ids[start:start + batch], settings)
        synchronize(engine.device.type)
        rows.append({"batch": number, "what": "start", "ms": (time.perf_counter() - begin) * 1e3})
        while not run.done:
            live = run.rows.live()
            refreshed = sum(run.rows.block_step[r] == 0 for r in live)
            graphs = len(engine.runtime._graphs)
            begin = time.perf_counter()
            run.advance()
            synchronize(engine.device.type)
            rows.append({"batch": number, "what": "step", "rows": int(run.x.shape[0]) if not run.done else None,
                         "live": len(live), "refreshed": refreshed, "captured": len(engine.runtime._graphs) - graphs,
                         "ms": (time.perf_counter() - begin) * 1e3})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    model = LLaDAModel.from_pretrained(str(DEMO_MODEL), dtype=torch.bfloat16 if args.device == "cuda" else torch.float32).to(args.device)
    tokenizer = Tokenizer.from_pretrained(str(DEMO_MODEL))
    ids = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q, _ in prompts(112)]
    engine = Engine(model, compile=args.device == "cuda", max_pooled_caches=16)
    settings = GenerationSettings(gen_length=args.gen_length, block_length=args.block_length)
    result = {}
    for batch in (1, args.batch):
        for _ in range(2):  # warm-up: every shape captured
            timed_pass(engine, ids, settings, batch)
        steps = timed_pass(engine, ids, settings, batch)
        total = sum(row["ms"] for row in steps)
        kinds = {}
        for row in steps:
            kind = row["what"] if row["what"] == "start" else ("refresh step" if row["refreshed"] else "block step")
            kinds.setdefault(kind, []).append(row["ms"])
        summary = {kind: {"count": len(ms), "ms": round(sum(ms), 2), "median_ms": round(sorted(ms)[len(ms) // 2], 3)}
                   for kind, ms in kinds.items()}
        print(f"batch {batch}: {total:.1f} ms synchronised, captures {sum(r.get('captured', 0) for r in steps)}", summary)
        result[batch] = {"total_ms": total, "kinds": summary, "steps": steps}
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device_name(args.device), "gen_length": args.gen_length,
                                              "block_length": args.block_length, "batches": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
