"""Peak GPU memory and speed of the shipped 8B post-training recipes, run by ``llada train`` itself.

    python benchmarks/post_training_memory.py prepare /tmp/pt8b
    python benchmarks/post_training_memory.py measure /tmp/pt8b --out benchmarks/results/post_training/memory_8b.json

``prepare`` writes a checkpoint of random bf16 weights at the preset's shape (the 8B preset keeps its
126,464-row vocabulary; a preset smaller than the tokenizer takes the tokenizer's) carrying the shipped demo tokenizer and its special ids, and synthetic data
made with that tokenizer: dialogues of ``--sft-length`` tokens (a quarter prompt), preference pairs
and RL prompts with ``--prompt-length``-token prompts and ``--answer-length``-token answers.

``measure`` runs each recipe (``configs/llada8b_{sft,dpo,vrpo,grpo}_lora.yaml``: LoRA rank 16 on every
block projection, activation checkpointing) for ``--steps`` steps, each in its own process so that
nothing of one stays allocated in the next, on that checkpoint and data, with ``batch_size`` set to
two micro-batches (the peak is a micro-batch's: more accumulation only lengthens the step). GRPO's
rollouts are ``--answer-length`` tokens. It reads ``metrics.jsonl``: the largest ``peak_memory_gib``
(tensors) and ``peak_reserved_gib`` (held by PyTorch's allocator) over the steps, rollouts
included, and the median tokens/s after the first step.

Random weights: memory does not depend on their values, and random weights never end an answer
early, so GRPO's rollouts always run to their full length (the most memory they take).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

RECIPES = {"sft": "configs/llada8b_sft_lora.yaml", "dpo": "configs/llada8b_dpo_lora.yaml",
           "vrpo": "configs/llada8b_vrpo_lora.yaml", "grpo": "configs/llada8b_grpo_lora.yaml"}
DATA = {"sft": "sft", "dpo": "pairs", "vrpo": "pairs", "grpo": "prompts"}  # prepared data folder of each
WORDS = ["river", "stone", "crown", "sword", "light", "night", "field", "bread", "water", "north", "voice", "table",
         "green", "winter", "paper", "garden", "silver", "window", "market", "letter", "mountain"]


def _text(tokenizer, length: int, rng: random.Random) -> str:
    """Words whose encoding is cut to ``length`` tokens (re-encoding the text may differ by a token)."""
    words = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < length:
        words.extend(rng.choice(WORDS) for _ in range(length))
    return tokenizer.decode(tokenizer.encode(" ".join(words), add_special_tokens=False)[:length])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _llada(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "llada", *arguments], check=True)


def prepare(directory: Path, preset_name: str, tokenizer_dir: str, sft_length: int, prompt_length: int,
            answer_length: int, samples: int) -> None:
    import torch

    from llada.model.config import preset
    from llada.model.tokenizer import Tokenizer
    from llada.model.transformer import LLaDAModel

    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.ids
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = {}
    if preset(preset_name).embedding_size < tokenizer.vocab_size:  # small presets (a CPU try): the tokenizer's
        sizes = {"vocab_size": tokenizer.vocab_size, "embedding_size": tokenizer.vocab_size}
    config = preset(preset_name, mask_token_id=ids.mask, eos_token_id=ids.eos, pad_token_id=ids.pad,
                    eot_token_id=ids.eot, **sizes)
    with torch.device(device):
        model = LLaDAModel(config).to(torch.bfloat16)
    checkpoint = directory / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    del model

    rng = random.Random(0)
    raw = directory / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    _write_jsonl(raw / "chats.jsonl", [{"messages": [
        {"role": "user", "content": _text(tokenizer, sft_length // 4, rng)},
        {"role": "assistant", "content": _text(tokenizer, sft_length - sft_length // 4, rng)}]}
        for _ in range(samples)])
    _write_jsonl(raw / "pairs.jsonl", [{"prompt": _text(tokenizer, prompt_length, rng),
                                        "chosen": _text(tokenizer, answer_length, rng),
                                        "rejected": _text(tokenizer, answer_length, rng)} for _ in range(samples)])
    _write_jsonl(raw / "prompts.jsonl", [{"prompt": _text(tokenizer, prompt_length, rng), "answer": "42"}
                                         for _ in range(samples)])
    longest = str(2 * (sft_length + prompt_length + answer_length))  # room for the chat template
    _llada("data", "sft", str(raw / "chats.jsonl"), "--tokenizer", str(checkpoint), "--output",
           str(directory / "sft"), "--max-length", longest)
    _llada("data", "preference", str(raw / "pairs.jsonl"), "--tokenizer", str(checkpoint), "--output",
           str(directory / "pairs"), "--max-length", longest)
    _llada("data", "prompts", str(raw / "prompts.jsonl"), "--tokenizer", str(checkpoint), "--output",
           str(directory / "prompts"), "--max-length", longest)
    print(f"prepared {preset_name} weights and {samples} samples of each kind in {directory}")


def measure(directory: Path, objectives: list[str], steps: int, answer_length: int) -> list[dict]:
    rows = []
    for objective in objectives:
        run = directory / f"run-{objective}"
        overrides = [f"model.init_from={directory / 'checkpoint'}", f"data.path={directory / DATA[objective]}",
                     f"out_dir={run}", f"steps={steps}", "batch_size=2", "micro_batch_size=1", "save_every=0",
                     "eval_every=0", "log_every=1", "data.eval_fraction=0.05"]
        if objective == "grpo":  # blocks of 32 tokens, or the largest that divides the answer
            block = max(size for size in range(1, min(32, answer_length) + 1) if answer_length % size == 0)
            overrides += [f"rl.rollout.gen_length={answer_length}", f"rl.rollout.block_length={block}"]
        arguments = ["train", RECIPES[objective]]
        for override in overrides:
            arguments += ["--set", override]
        _llada(*arguments)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        row = {"objective": objective, "recipe": RECIPES[objective], "overrides": overrides, "steps": len(records),
               **{key: max((round(r[key], 2) for r in records if key in r), default=None)  # None on the CPU
                  for key in ("peak_memory_gib", "peak_reserved_gib")},
               "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records[1:] or records), 1)}
        for key in ("rollout_tokens_per_s", "rollout_seconds"):
            if key in records[-1]:
                row[key] = round(statistics.median(r[key] for r in records if key in r), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("prepare")
    making.add_argument("directory", type=Path)
    making.add_argument("--preset", default="8b")
    making.add_argument("--tokenizer", default="models/demo", help="tokenizer directory (default: the demo model's)")
    making.add_argument("--sft-length", type=int, default=2048)
    making.add_argument("--prompt-length", type=int, default=512)
    making.add_argument("--answer-length", type=int, default=512)
    making.add_argument("--samples", type=int, default=64)
    measuring = commands.add_parser("measure")
    measuring.add_argument("directory", type=Path)
    measuring.add_argument("--objectives", default="sft,dpo,vrpo,grpo")
    measuring.add_argument("--steps", type=int, default=3)
    measuring.add_argument("--answer-length", type=int, default=256, help="GRPO rollout length (default 256)")
    measuring.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory, args.preset, args.tokenizer, args.sft_length, args.prompt_length, args.answer_length,
                args.samples)
        return
    rows = measure(args.directory, args.objectives.split(","), args.steps, args.answer_length)
    if args.out:
        import torch

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "device": torch.cuda.get_device_name()
                                        if torch.cuda.is_available() else "cpu", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
