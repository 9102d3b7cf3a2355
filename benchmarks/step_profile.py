"""Where the GPU time of one cached block step goes, kernel by kernel (LLaDA-8B shape, random weights).

Runs the engine's compiled dual-cache block step without CUDA graphs (so that the profiler sees each
kernel; a graph replays the same kernels) at prompt 512 / answer 256 / block 32 / batch 1 (``--batch``), and sums
the kernels' GPU time per step, grouped into matmuls, attention, Inductor's fused kernels and the
rest, with the largest kernels listed.

    PYTHONPATH=src python benchmarks/step_profile.py --out benchmarks/results/engine/step_profile_h200.json
    PYTHONPATH=src python benchmarks/step_profile.py --quantize fp8 --out benchmarks/results/engine/step_profile_fp8_h200.json
    PYTHONPATH=src python benchmarks/step_profile.py --batch 32 --out benchmarks/results/engine/step_profile_batch32_h200.json
    PYTHONPATH=src python benchmarks/step_profile.py --batch 32 --reuse-decided --steps 20 \
        --out benchmarks/results/engine/step_profile_batch32_reuse_decided_h200.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from engine import random_model
from torch.profiler import ProfilerActivity, profile

from llada.engine.engine import Engine, GenerationSettings
from llada.model.quantize import QUANTIZERS

GROUPS = (("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "scaled_mm", "splitk")),
          ("attention", ("flash", "attention", "fmha")),
          ("inductor fused", ("triton",)))


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, keys in GROUPS if any(key in lowered for key in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b")
    parser.add_argument("--quantize", choices=sorted(QUANTIZERS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reuse-decided", action="store_true",
                        help="sparse block steps (settings.reuse_decided): the queried width shrinks step by step")
    parser.add_argument("--out")
    args = parser.parse_args()
    model = random_model(args.preset)
    if args.quantize:
        QUANTIZERS[args.quantize](model)
    prompt = torch.randint(0, model.config.vocab_size - 1000, (args.batch, 512), device="cuda")
    settings = GenerationSettings(gen_length=256, block_length=32, policy="fixed", steps=256, cache="dual",
                                  early_stop=False, reuse_decided=args.reuse_decided)
    engine = Engine(model, cuda_graphs=False, compile=True)
    run = engine.start(prompt, settings)
    # The refresh, then compiling the block step; sparse steps compile one graph per queried width, so
    # they warm up over a whole block first (else the profile shows Inductor benchmarking new kernels).
    for _ in range(5 + (settings.block_length + 1 if args.reuse_decided else 0)):
        run.advance()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(args.steps):
            run.advance()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in trace.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time / args.steps  # microseconds per step
            kernels[event.name][1] += 1 / args.steps
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (micros, count) in kernels.items():
        groups[group_of(name)][0] += micros
        groups[group_of(name)][1] += count
    total = sum(micros for micros, _ in kernels.values())
    print(f"GPU time per step {total / 1e3:.2f} ms in {sum(c for _, c in kernels.values()):.0f} kernels")
    for group, (micros, count) in sorted(groups.items(), key=lambda item: -item[1][0]):
        print(f"  {group:16s} {micros / 1e3:6.2f} ms  {count:5.0f} kernels  ({micros / max(count, 1):5.1f} us each)")
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:15]
    for name, (micros, count) in top:
        print(f"    {micros / 1e3:6.3f} ms {count:5.0f}x  {name[:110]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "quantize": args.quantize,
            "batch": args.batch, "reuse_decided": args.reuse_decided, "gpu_ms_per_step": total / 1e3,
            "groups": {g: {"ms": m / 1e3, "kernels": c} for g, (m, c) in groups.items()},
            "top_kernels": [{"name": n, "ms": m / 1e3, "count": c} for n, (m, c) in top]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
