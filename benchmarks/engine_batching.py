"""Throughput against batch size on the trained demo model, where threshold decoding commits several
tokens per step and rows finish their blocks at different steps.

The random-weight benchmark (``engine.py``) commits one token per step in every row, so its rows
move in lockstep; here each row moves at its own pace, so a batch step mixes rows that refresh (a
new block) with rows that take a block step. Every batch size decodes the same prompts (the
arithmetic and definition prompts of ``engine_quality.py``), in consecutive batches of that size,
after a warm-up pass over all of them (CUDA graphs captured, block steps compiled). Reported per
batch size: answer tokens/s (up to each answer's first end-of-text token, wall-clock), the speed-up
over batch 1, and the share of answers identical to batch 1's (a row's result must not depend on
its batch). Each batch size also runs through the step-level scheduler (``llada.engine.scheduler``) with
that many rows: continuous batching, where a finished row's slot takes the next waiting prompt at
once instead of idling until the slowest row of its batch is done, as a server would run. Timings
are the median of ``--repeats`` passes (a pass over the demo prompts takes well under a second).

    PYTHONPATH=src python benchmarks/engine_batching.py --device cuda --dtype bfloat16 --compile \
        --out benchmarks/results/engine/batching_demo_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from engine_quality import device_name, prompts, synchronize

from llada.engine.engine import Engine, GenerationSettings
from llada.engine.scheduler import Scheduler
from llada.model.loading import DEMO_MODEL
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel


def decode_all(engine: Engine, ids: list[list[int]], settings: GenerationSettings, batch: int) -> list[list[int]]:
    """Every prompt's answer tokens, decoding ``batch`` prompts per call."""
    return [result.tokens for start in range(0, len(ids), batch)
            for result in engine.generate(ids[start:start + batch], settings)]


def decode_continuously(engine: Engine, ids: list[list[int]], settings: GenerationSettings,
                        batch: int) -> list[list[int]]:
    """Every prompt's answer tokens, all submitted at once to a scheduler running ``batch`` rows."""
    scheduler = Scheduler(engine, max_batch=batch, max_waiting=len(ids), stream=False)
    requests = [scheduler.submit(row, settings) for row in ids]
    scheduler.run_until_idle()
    return [request.result.tokens for request in requests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--arithmetic", type=int, default=112, help="arithmetic prompts (plus 16 definitions)")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's block steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per row (the median is reported)")
    parser.add_argument("--out")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if batches[0] != 1:
        parser.error("--batches must start with 1: the other batch sizes are compared with it")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    model = LLaDAModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    tokenizer = Tokenizer.from_pretrained(args.model)
    ids = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q, _ in prompts(args.arithmetic)]
    engine = Engine(model, compile=args.compile, max_pooled_caches=16)
    base = GenerationSettings(gen_length=args.gen_length, block_length=args.block_length)
    rows = []
    for name, settings in (("dual cache, threshold 0.9", base),
                           ("dual cache, threshold 0.9, keep prompt", replace(base, keep_prompt=True))):
        single, single_rate = None, None  # batch 1's answers and tokens/s
        for batch in batches:
            for mode, decode in (("batches", decode_all), ("scheduler", decode_continuously)):
                if batch == 1 and mode == "scheduler":
                    continue  # one row at a time is the same work either way
                decode(engine, ids, settings, batch)  # warm-up: every shape this batch size meets
                timings = []
                for _ in range(args.repeats):
                    synchronize(args.device)
                    start = time.perf_counter()
                    answers = decode(engine, ids, settings, batch)
                    synchronize(args.device)
                    timings.append(time.perf_counter() - start)
                seconds = statistics.median(timings)
                single = single or answers
                tokens = sum(len(answer) for answer in answers)
                row = {"setting": name, "mode": mode, "batch": batch, "tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / seconds,
                       "same_as_batch_1": sum(a == b for a, b in zip(answers, single)) / len(answers)}
                single_rate = single_rate or row["tokens_per_s"]
                row["speedup"] = row["tokens_per_s"] / single_rate
                rows.append(row)
                print(f"{name:40s} {mode:9s} batch {batch:3d}: {row['tokens_per_s']:9.1f} tokens/s "
                      f"({row['speedup']:5.1f}x batch 1), {row['same_as_batch_1']:6.1%} answers as at batch 1",
                      flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "prompts": len(ids), "gen_length": args.gen_length,
                                              "block_length": args.block_length, "device": device_name(args.device),
                                              "dtype": args.dtype, "compile": args.compile, "repeats": args.repeats,
                                              "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
