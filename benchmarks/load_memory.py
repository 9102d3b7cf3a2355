"""Peak host memory and time of loading a checkpoint: ``LLaDAModel.from_pretrained`` vs the naive way.

Writes a random checkpoint of a preset (bf16, sharded like the releases), then loads it in fresh
processes and samples the process's anonymous resident memory (RssAnon: what the load itself
allocates; memory-mapped file pages are page cache and not counted) every few milliseconds.

The naive baseline builds the model in full (random init), reads every shard into a state dict with
``safetensors.torch.load_file``, then copies it in: about twice the model's size at its peak.

    PYTHONPATH=src python benchmarks/load_memory.py --preset 1b --device cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from llada.model.checkpoint import save_model
from llada.model.config import preset
from llada.model.transformer import LLaDAModel


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status (Linux only)")


def load_in_this_process(method: str, directory: str, device: str) -> dict:
    """Load once with ``method`` while a thread records the peak anonymous memory."""
    baseline = rss_anon_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if method == "from_pretrained":
        model = LLaDAModel.from_pretrained(directory, dtype=torch.bfloat16, device=device)
    else:
        from safetensors.torch import load_file

        from llada.model.checkpoint import from_official, read_config

        config = read_config(directory)
        torch.set_default_dtype(torch.bfloat16)
        model = LLaDAModel(config)
        tensors = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        model.load_state_dict(from_official(tensors))
        model.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"method": method, "device": device, "seconds": seconds, "weights_GB": weights / 1e9,
            "peak_extra_host_GB": (peak - baseline) / 1e9, "peak_over_weights": (peak - baseline) / weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", help="existing checkpoint directory (default: write a random one)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_in_this_process(args.child[0], args.child[1], args.device)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.checkpoint
        if directory is None:
            directory = str(Path(scratch) / "ckpt")
            torch.set_default_dtype(torch.bfloat16)
            start = time.perf_counter()
            save_model(LLaDAModel(preset(args.preset)), directory, max_shard_size="5GB")
            print(f"wrote a random {args.preset} checkpoint in {time.perf_counter() - start:.1f} s", flush=True)
        results = []
        for method in ("from_pretrained", "naive"):
            output = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", method, directory],
                                    capture_output=True, text=True, check=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            row = results[-1]
            print(f"{method:16s} {row['seconds']:7.1f} s  weights {row['weights_GB']:.2f} GB  peak extra host memory "
                  f"{row['peak_extra_host_GB']:.2f} GB ({row['peak_over_weights']:.2f}x weights)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
