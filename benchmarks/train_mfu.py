"""Training throughput and MFU of the real Trainer on one GPU: ~1B-parameter LLaDA, sequence length 2048, bf16.

Builds a throwaway tokenizer and a packed dataset of random token ids (the model sees the official
126,464-token vocabulary), then runs ``llada.training.trainer.Trainer`` eager and compiled for a few steps each
and reports tokens/s and MFU (model FLOPs utilisation, 6·N + attention FLOPs per token against the
card's dense bf16 peak) over the steps after warm-up.

    PYTHONPATH=src python benchmarks/train_mfu.py --out benchmarks/results/train_mfu_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from llada.model.tokenizer import train_tokenizer
from llada.training.config import load_config
from llada.training.packing import FORMAT, INDEX_FILE
from llada.training.trainer import Trainer

VOCAB = 126464


def make_data(root: Path, tokens: int, eos_id: int) -> Path:
    """A packed-token directory of random ids (throughput does not depend on the text)."""
    directory = root / "packed"
    directory.mkdir()
    ids = np.random.default_rng(0).integers(0, VOCAB - 1024, size=tokens, dtype=np.uint32)
    ids.tofile(directory / "shard-0.bin")
    index = {"format": FORMAT, "version": 1, "dtype": "uint32", "vocab_size": VOCAB, "eos_id": eos_id,
             "tokens": tokens, "documents": 1, "shards": [{"file": "shard-0.bin", "tokens": tokens, "documents": 1}]}
    (directory / INDEX_FILE).write_text(json.dumps(index))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per variant (first 4 are warm-up)")
    parser.add_argument("--variants", default="eager,compiled")
    parser.add_argument("--extra", action="append", default=[], help="more --set style overrides")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of two steps")
    parser.add_argument("--out")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tokenizer = train_tokenizer(["a throwaway tokenizer for a throughput benchmark"] * 4, vocab_size=300)
        tokenizer.save_pretrained(root / "tok")
        batch = args.micro_batch * args.accumulation
        data = make_data(root, tokens=(args.steps + 2) * batch * args.seq_len * 2, eos_id=tokenizer.ids.eos)
        for variant in args.variants.split(","):
            overrides = [f"data.path={data}", f"model.tokenizer={root / 'tok'}", f"model.preset={args.preset}",
                         f"model.overrides={{vocab_size: {VOCAB}, embedding_size: {VOCAB}}}",
                         f"data.seq_len={args.seq_len}", f"batch_size={batch}", f"micro_batch_size={args.micro_batch}",
                         f"steps={args.steps}", "save_every=0", "eval_every=0", "data.eval_fraction=0",
                         "data.random_length_probability=0", f"compile={variant == 'compiled'}",
                         f"out_dir={root / variant}", *args.extra]
            trainer = Trainer(load_config(None, overrides))
            trainer.save_checkpoint = lambda: None  # measure training, not disk writes
            torch.cuda.reset_peak_memory_stats()
            if args.profile:
                for _ in range(2):
                    trainer.train_step()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                        torch.profiler.ProfilerActivity.CPU]) as profiler:
                    for _ in range(2):
                        trainer.train_step()
                    torch.cuda.synchronize()
                print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
            records = trainer.run()
            timed = records[4:]
            row = {"variant": variant, "preset": args.preset, "parameters": trainer.model.config.num_parameters(),
                   "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accumulation": args.accumulation,
                   "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                   "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
                   "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30,
                   "losses": [r["loss"] for r in records]}
            results.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(f"{variant:9s} {row['parameters'] / 1e9:.2f}B  {row['tokens_per_s']:10,.0f} tokens/s  MFU {mfu}  "
                  f"peak {row['peak_memory_GiB']:.1f} GiB  loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}",
                  flush=True)
            del trainer
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
