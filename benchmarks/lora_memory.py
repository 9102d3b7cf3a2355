"""Peak GPU memory and throughput of one LoRA SFT step at the LLaDA-8B shape.

The setup ``llada train`` uses with ``lora.rank > 0``: frozen bf16 base weights, float32 rank-r
adapters on every block projection (through peft), activation checkpointing, bf16 autocast, the
fused masked-diffusion SFT loss (no full logits) and AdamW over the adapters alone. Random base
weights: memory and speed do not depend on their values. Each variant runs a few steps; the figures
are the peak allocated memory over all of them and the median tokens/s after the first.

    PYTHONPATH=src python benchmarks/lora_memory.py --out benchmarks/results/train/lora_memory_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from llada.diffusion.losses import sft_loss
from llada.model.config import preset
from llada.model.lora import add_lora
from llada.model.transformer import LLaDAModel
from llada.training.config import BLOCK_PROJECTIONS
from llada.training.parallelize import apply_activation_checkpointing


def measure(shape: str, seq_len: int, batch: int, rank: int, checkpointing: bool, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the base in bf16 directly: no float32 copy ever exists
    try:
        with torch.device("cuda"):
            model = LLaDAModel(preset(shape))
    finally:
        torch.set_default_dtype(default)
    if checkpointing:
        apply_activation_checkpointing(model)
    add_lora(model, rank=rank, alpha=2.0 * rank, dropout=0.0, targets=BLOCK_PROJECTIONS)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    generator = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 120_000, (batch, seq_len), device="cuda", generator=generator)
    prompt_lengths = torch.full((batch,), seq_len // 4, device="cuda")
    seconds = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sft_loss(model, ids, prompt_lengths, model.config.mask_token_id, generator=generator)
        loss.value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    result = {"shape": shape, "seq_len": seq_len, "batch": batch, "rank": rank,
              "activation_checkpointing": checkpointing,
              "trainable_parameters": sum(p.numel() for p in trainable),
              "base_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
              "weights_gib": round(weights_gib, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "step_seconds": round(statistics.median(seconds[1:]), 3),
              "tokens_per_s": round(batch * seq_len / statistics.median(seconds[1:]), 1)}
    del model, optimizer, loss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="checkpointing,no-checkpointing")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    variants = args.variants.split(",")
    for variant in variants:
        if len(variants) > 1:  # each variant in a fresh process: nothing of the previous one stays allocated
            command = [sys.executable, __file__, "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch",
                       str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps), "--variants", variant]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
            continue
        try:
            row = measure(args.preset, args.seq_len, args.batch, args.rank, variant == "checkpointing", args.steps)
        except torch.OutOfMemoryError as error:
            row = {"variant": variant, "error": f"out of memory: {str(error).splitlines()[0]}"}
        row["device"] = torch.cuda.get_device_name()
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"command": "python benchmarks/lora_memory.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
                "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
