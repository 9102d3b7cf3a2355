"""GRPO rollout throughput: the engine against the reference sampler on the same prompts.

A batch of RL rollouts is ``prompts × group`` completions of one length. This times, on the demo model
(bf16 on a GPU, float32 on the CPU) and chat prompts asking 2-digit products (the RL demo's task),
three ways to make them:

- the engine with its serving defaults (dual cache, confidence threshold 0.9), as ``rl.rollout: {}``;
- the engine with the reference sampler's rule (fixed policy, one token per step);
- the same without early stopping (``early_stop=False``: every block decoded, as the reference
  sampler always does), which separates what the engine's caches and graphs gain from what stopping
  a batch once every answer has ended gains;
- the reference sampler (``sampling.generate``: a full forward pass per step), what FSDP runs use.

Tokens/s = completions × gen_length / seconds, median of ``--repeats`` after a warm-up; every
repeat's seconds and the CUDA graphs it captured are kept.

    PYTHONPATH=src python benchmarks/rollout_speed.py --out benchmarks/results/post_training/rollout_speed_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time

import torch

from llada import Engine, GenerationSettings, LLaDAModel
from llada.engine.generation import batch_answers
from llada.model.loading import DEMO_MODEL
from llada.model.tokenizer import Tokenizer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int, engine: Engine | None) -> tuple[list[float], list[int]]:
    """Seconds of each of ``repeats`` calls after a warm-up call, and the CUDA graphs each captured
    (none listed without an engine).

    The warm-up captures the shapes its batch reached; a later batch whose rows finish in another
    pattern (the threshold rule commits by confidence, so that varies with the samples) shrinks
    through new shapes and captures them, which costs far more than replaying. The counts tell those
    batches from the steady state."""
    function()
    seconds, captures = [], []
    for _ in range(repeats):
        before = engine.runtime.captures if engine is not None else 0
        _sync()
        start = time.perf_counter()
        function()
        _sync()
        seconds.append(time.perf_counter() - start)
        if engine is not None:
            captures.append(engine.runtime.captures - before)
    return seconds, captures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LLaDAModel.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                       device=device).eval()
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL)
    questions = random.Random(0)  # the RL demo's kind of prompt: a 2-digit product, through the chat template
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"What is {questions.randint(10, 99)} * "
                                                                  f"{questions.randint(10, 99)}?"}])
               for _ in range(args.prompts)]
    rows = [prompt for prompt in prompts for _ in range(args.group)]
    served = GenerationSettings(gen_length=args.gen_length, block_length=args.block_length, temperature=1.0)
    fixed = GenerationSettings(gen_length=args.gen_length, block_length=args.block_length, temperature=1.0,
                               policy="fixed", steps=args.gen_length)
    full_length = GenerationSettings(gen_length=args.gen_length, block_length=args.block_length, temperature=1.0,
                                     policy="fixed", steps=args.gen_length, early_stop=False)
    engine = Engine(model)
    cuda = torch.Generator(device=device).manual_seed(1)
    variants = {
        "engine_defaults": (served, engine),
        "engine_fixed": (fixed, engine),
        "engine_fixed_full_length": (full_length, engine),
        "reference_sampler": (fixed, None),
    }
    tokens = len(rows) * args.gen_length
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "completions": len(rows), "gen_length": args.gen_length,
              "block_length": args.block_length, "repeats": args.repeats, "torch": torch.__version__,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "variants": {}}
    for name, (settings, maker) in variants.items():
        # every timing is kept: run-to-run spread is part of the result
        each, captures = timed(functools.partial(batch_answers, model, rows, settings, maker, cuda), args.repeats,
                               maker)
        seconds = statistics.median(each)
        result["variants"][name] = {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                                    "each_seconds": [round(s, 4) for s in each]}
        if maker is not None:
            result["variants"][name]["each_captures"] = captures
        print(name, result["variants"][name], flush=True)
    base = result["variants"]["reference_sampler"]["seconds"]
    for name, row in result["variants"].items():
        row["speedup_over_reference"] = round(base / row["seconds"], 2)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
