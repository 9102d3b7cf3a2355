"""Quality against speed of the engine's settings on the shipped demo model (runs on a CPU in a minute).

For a fixed set of chat prompts — arithmetic questions, whose answers can be checked, and
definitions of common words — every setting's answers are compared with the reference sampler's
(one token per step, a full forward pass per step): *agreement* is the share of answers identical
to the reference's, *accuracy* the share of arithmetic answers that are right, *steps* the mean
number of denoising steps (forward passes) per answer, and *tokens per step* the answer tokens (up
to and including the first end-of-text token) divided by those steps. Every method runs one prompt
at a time (after warm-up answers), tokens/s counting answer tokens up to the first end-of-text token
over wall-clock time. The two "published" rows run the prefix- and dual-cache algorithms with
threshold 0.9 as their papers describe them: plain PyTorch (no CUDA graphs), no early stop.

    python benchmarks/engine_quality.py --out benchmarks/results/engine/quality_demo.json \
        --plot benchmarks/results/engine/quality_demo.png
    python benchmarks/engine_quality.py --quantize int8 --out benchmarks/results/engine/quality_demo_int8.json
    python benchmarks/engine_quality.py --quantize fp8 --out benchmarks/results/engine/quality_demo_fp8.json
    PYTHONPATH=src python benchmarks/engine_quality.py --device cuda --dtype bfloat16 \
        --out benchmarks/results/engine/quality_demo_gpu.json --plot benchmarks/results/engine/quality_demo_gpu.png
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from llada.diffusion.sampling import generate
from llada.engine.answer_text import answer_text
from llada.engine.engine import Engine, GenerationSettings
from llada.model.loading import DEMO_MODEL
from llada.model.quantize import QUANTIZERS
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

WORDS = ["king", "house", "water", "light", "sword", "love", "night", "river", "friend", "bread", "horse", "storm",
         "crown", "heart", "garden", "winter"]

SETTINGS = {
    "exact (no cache, fixed)": {"cache": "none", "policy": "fixed"},
    "prefix cache, fixed": {"cache": "prefix", "policy": "fixed"},
    "dual cache, fixed": {"cache": "dual", "policy": "fixed"},
    "no cache, threshold 0.9": {"cache": "none", "policy": "threshold", "threshold": 0.9},
    "prefix cache, threshold 0.9": {"cache": "prefix", "policy": "threshold", "threshold": 0.9},
    **{f"dual cache, threshold {t}": {"cache": "dual", "policy": "threshold", "threshold": t}
       for t in (0.95, 0.9, 0.8, 0.7, 0.5, 0.3)},
    **{f"dual cache, factor {f}": {"cache": "dual", "policy": "factor", "factor": f} for f in (0.5, 1.0, 2.0)},
    "dual cache, threshold 0.9, keep prompt": {"cache": "dual", "policy": "threshold", "threshold": 0.9,
                                               "keep_prompt": True},
    "prefix cache, threshold 0.9, keep prompt": {"cache": "prefix", "policy": "threshold", "threshold": 0.9,
                                                 "keep_prompt": True},
    "dual cache, threshold 0.9, reuse decided": {"cache": "dual", "policy": "threshold", "threshold": 0.9,
                                                 "reuse_decided": True},
    "dual cache, fixed, reuse decided": {"cache": "dual", "policy": "fixed", "reuse_decided": True},
}


def prompts(count: int, seed: int = 0) -> list[tuple[str, str | None]]:
    """(question, expected answer or None) pairs in the demo model's instruction formats."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b, operator = rng.randrange(0, 100), rng.randrange(0, 100), rng.choice("+-*")
        out.append((f"What is {a} {operator} {b}?", str({"+": a + b, "-": a - b, "*": a * b}[operator])))
    out += [(f"Define the word \"{word}\".", None) for word in WORDS]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--arithmetic", type=int, default=48, help="arithmetic prompts (plus 16 definitions)")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--quantize", choices=sorted(QUANTIZERS),
                        help="quantize the block weights after the reference answers (llada.model.quantize)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: CUDA graphs for the engine's steps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the engine's block steps")
    parser.add_argument("--out")
    parser.add_argument("--plot")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LLaDAModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    tokenizer = Tokenizer.from_pretrained(args.model)
    questions = prompts(args.arithmetic)
    ids = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q, _ in questions]
    # One prompt at a time, like the engine's rows below (timed after one warm-up answer).
    generate(model, torch.tensor([ids[0]], device=args.device), steps=args.gen_length, gen_length=args.gen_length,
             block_length=args.block_length)
    synchronize(args.device)
    start = time.perf_counter()
    out = [generate(model, torch.tensor([row], device=args.device), steps=args.gen_length,
                    gen_length=args.gen_length, block_length=args.block_length)[0, len(row):].tolist() for row in ids]
    synchronize(args.device)
    reference_seconds = time.perf_counter() - start
    reference = [answer_text(tokenizer, row) for row in out]

    def score(texts: list[str]) -> tuple[float, float]:
        agree = sum(a == b for a, b in zip(texts, reference)) / len(texts)
        checked = [(text.strip(), expected) for text, (_, expected) in zip(texts, questions) if expected is not None]
        return agree, sum(text == expected for text, expected in checked) / len(checked)

    reference_agreement, reference_accuracy = score(reference)
    ends = {tokenizer.ids.eos, tokenizer.ids.eot}
    reference_tokens = sum(next((i + 1 for i, t in enumerate(row) if t in ends), args.gen_length) for row in out)
    rows = [{"setting": "reference sampler", "agreement": reference_agreement, "accuracy": reference_accuracy,
             "steps": float(args.gen_length), "tokens_per_step": reference_tokens / (len(ids) * args.gen_length),
             "tokens_per_s": reference_tokens / reference_seconds}]
    if args.quantize:
        QUANTIZERS[args.quantize](model)
    engine = Engine(model, compile=args.compile)
    published = Engine(model, cuda_graphs=False)  # the published algorithms: plain PyTorch, no early stop
    runs = [(name, engine, overrides) for name, overrides in SETTINGS.items()]
    runs += [(f"published {cache} cache, threshold 0.9", published,
              {"cache": cache, "policy": "threshold", "threshold": 0.9, "early_stop": False})
             for cache in ("prefix", "dual")]
    # Warm-up: on a GPU every prompt once, so that the graphs of every shape a setting meets (each
    # reuse_decided width, for one) are captured before the timing; on the CPU one prompt does.
    warm_up = ids if args.device.startswith("cuda") else ids[:1]
    for name, runner, overrides in runs:
        settings = GenerationSettings(gen_length=args.gen_length, block_length=args.block_length, **overrides)
        for row in warm_up:
            runner.generate([row], settings)
        synchronize(args.device)
        start = time.perf_counter()
        # One prompt at a time: a batch advances block by block in lockstep, so its step count is
        # the slowest row's; per-prompt runs show each answer's own number of steps.
        results = [runner.generate([row], settings)[0] for row in ids]
        synchronize(args.device)
        seconds = time.perf_counter() - start
        texts = [answer_text(tokenizer, r.answer.tolist()) for r in results]
        agreement, accuracy = score(texts)
        tokens = sum(len(r.tokens) for r in results)
        steps = sum(r.steps for r in results)
        rows.append({"setting": name, "agreement": agreement, "accuracy": accuracy, "steps": steps / len(results),
                     "tokens_per_step": tokens / steps, "tokens_per_s": tokens / seconds})
    for row in rows:
        print(f"{row['setting']:30s} agreement {row['agreement']:6.1%}  arithmetic {row['accuracy']:6.1%}  "
              f"{row['steps']:5.1f} steps  {row['tokens_per_step']:5.2f} tokens/step  "
              f"{row['tokens_per_s']:8.1f} tokens/s ({args.device})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "prompts": len(questions),
                                              "gen_length": args.gen_length, "block_length": args.block_length,
                                              "quantize": args.quantize, "device": device_name(args.device),
                                              "dtype": args.dtype, "compile": args.compile, "torch": torch.__version__,
                                              "rows": rows}, indent=2) + "\n")
    if args.plot:
        plot(rows, Path(args.plot), device_name(args.device))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def plot(rows: list[dict], path: Path, device: str) -> None:
    """Agreement against tokens/s and against steps, one marker per setting named in a shared legend
    (many settings share an agreement level, where labels beside the points would overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    for axis, key, label in ((axes[0], "tokens_per_s", f"answer tokens/s ({device}, one prompt at a time)"),
                             (axes[1], "steps", "denoising steps per answer")):
        for i, row in enumerate(rows):
            axis.scatter(row[key], row["agreement"], s=45, color=colors[i % len(colors)],
                         marker=markers[i // len(colors) % len(markers)], label=row["setting"], alpha=0.85)
        axis.set_xlabel(label)
        axis.set_ylabel("answers identical to the reference sampler's")
        axis.grid(alpha=0.3)
    for axis in axes:  # the reference and the fastest settings lie orders of magnitude apart
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes[1].invert_xaxis()  # fewer steps to the right, like more tokens/s on the left plot
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.suptitle("Engine settings on the demo model: quality against speed")
    figure.tight_layout(rect=(0, 0, 0.78, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
