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
repeat's seconds are kept, and for the engine the CUDA graphs it captured and its denoising steps.

    PYTHONPATH=src python benchmarks/rollout_speed.py --out benchmarks/results/post_training/rollout_speed_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time
from dataclasses import dataclass

import torch

from llada import Engine, GenerationSettings, LLaDAModel
from llada.engine.generation import batch_answers
from llada.model.loading import DEMO_MODEL
from llada.model.tokenizer import Tokenizer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class EngineBatch:
    """What an engine batch did besides its tokens: the CUDA graphs it captured and its denoising steps."""

    captures: int
    steps: int


def timed(function, repeats: int) -> tuple[list[float], list]:
    """Seconds of each of ``repeats`` calls after a warm-up call, and what each call returned."""
    function()
    seconds, observed = [], []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        observed.append(function())
        _sync()
        seconds.append(time.perf_counter() - start)
    return seconds, observed


def engine_batch(engine: Engine, rows: list[list[int]], settings: GenerationSettings,
                 generator: torch.Generator) -> EngineBatch:
    """One batch from the engine, brought to the host as ``batch_answers`` brings it; the CUDA graphs it
    captured and its denoising steps.

    The warm-up captures the shapes its batch reached. Under the threshold rule both the steps a
    block takes and which rows end when vary with the samples (it commits by confidence), and the
    engine shrinks a batch to the rows still decoding: a batch that meets a new shape captures it,
    which costs far more than replaying. The two counts tell such batches from the steady state."""
    captured = engine.runtime.captures
    results = engine.generate(rows, settings, generator)
    for result in results:
        result.answer.tolist()
    return EngineBatch(captures=engine.runtime.captures - captured, steps=max(result.steps for result in results))


def reference_batch(model: LLaDAModel, rows: list[list[int]], settings: GenerationSettings,
                    generator: torch.Generator) -> None:
    """One batch from the reference sampler (a full forward pass a step, no graphs to count)."""
    batch_answers(model, rows, settings, None, generator)


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
        "engine_defaults": functools.partial(engine_batch, engine, rows, served, cuda),
        "engine_fixed": functools.partial(engine_batch, engine, rows, fixed, cuda),
        "engine_fixed_full_length": functools.partial(engine_batch, engine, rows, full_length, cuda),
        "reference_sampler": functools.partial(reference_batch, model, rows, fixed, cuda),
    }
    tokens = len(rows) * args.gen_length
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "completions": len(rows),
              "gen_length": args.gen_length, "block_length": args.block_length, "repeats": args.repeats, "torch": torch.__version__,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "variants": {}}
    for name, function in variants.items():
        each, observed = timed(function, args.repeats)  # every timing is kept: the spread is part of the result
        seconds = statistics.median(each)
        row = {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
               "each_seconds": [round(s, 4) for s in each]}
        if observed[0] is not None:  # the engine's: graphs captured and denoising steps, batch by batch
            row["each_captures"] = [o.captures for o in observed]
            row["each_steps"] = [o.steps for o in observed]
        result["variants"][name] = row
        print(name, row, flush=True)
    base = result["variants"]["reference_sampler"]["seconds"]
    for name, row in result["variants"].items():
        row["speedup_over_reference"] = round(base / row["seconds"], 2)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
