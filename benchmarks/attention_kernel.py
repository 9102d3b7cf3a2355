"""The block-step attention kernel (``llada.model.block_attention``) alone, at the 8B model's layer shape.

One layer's attention of a block of 32 queries (32 heads of 128) over a cache of ``T`` keys plus
their own fresh keys, bf16, for several batch sizes and cache lengths: the kernel against the
tensor operations it replaces (``kv_cache._attend_cache_and_fresh`` without it, uncompiled), and the
cache bytes read per microsecond. Each figure is the median over 30 replays of a CUDA graph of 20
calls (so launch overhead is the graph's, as in a compiled block step), in µs per call.

``--sweep`` times the kernel with its tile of keys (``BLOCK_KEYS``) and the number of parts the cache
is split into varied: the parts follow from a pretended multiprocessor count, a multiple (0: no
splitting) of the card's real one. ``--warps``/``--stages`` add the attending kernel's warps and
software-pipeline stages to the sweep (default: the module's); ``--shapes`` picks the batch sizes
and cache lengths.

    PYTHONPATH=src python benchmarks/attention_kernel.py --out benchmarks/results/engine/attention_kernel_h200.json
    PYTHONPATH=src python benchmarks/attention_kernel.py --sweep --out benchmarks/results/engine/attention_kernel_sweep_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from llada.model import block_attention
from llada.model.kv_cache import _attend_cache_and_fresh

HEADS, QUERIES, DIM = 32, 32, 128


def graph_time(call: Callable[[], object], calls: int = 20, replays: int = 30) -> float:
    """Median µs per call of ``call`` replayed from a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton's compilation) outside the capture
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def layer_inputs(batch: int, length: int) -> tuple[torch.Tensor, ...]:
    """Queries, cache keys/values, cache bias, fresh keys/values of one layer (random, bf16)."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    bias = torch.zeros(batch, 1, 1, length, device="cuda", dtype=torch.bfloat16)
    return (randn(batch, HEADS, QUERIES, DIM), randn(batch, HEADS, length, DIM), randn(batch, HEADS, length, DIM),
            bias, randn(batch, HEADS, QUERIES, DIM), randn(batch, HEADS, QUERIES, DIM))


def parts_of(batch: int, length: int) -> int:
    """How many parts the kernel splits this cache into (one program per batch row and head here)."""
    return block_attention._split(batch * HEADS, length, torch.device("cuda", torch.cuda.current_device()))[0]


def compare(shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for batch, length in shapes:
        inputs = layer_inputs(batch, length)
        times = {}
        for enabled in (True, False):
            block_attention.ENABLED = enabled
            times[enabled] = graph_time(lambda: _attend_cache_and_fresh(*inputs, None))  # noqa: B023
        block_attention.ENABLED = True
        cache_bytes = 2 * batch * HEADS * length * DIM * 2
        row = {"parts": parts_of(batch, length), "batch": batch, "cache": length, "kernel_us": round(times[True], 2),
               "tensor_ops_us": round(times[False], 2), "cache_bytes": cache_bytes,
               "kernel_TBps": round(cache_bytes / times[True] / 1e6, 3)}
        print(row, flush=True)
        rows.append(row)
    return rows


def sweep(shapes: list[tuple[int, int]], warps: list[int], stages: list[int]) -> list[dict]:
    real = torch.cuda.get_device_properties(0).multi_processor_count
    saved = block_attention._multiprocessors, block_attention.BLOCK_KEYS, block_attention.WARPS, block_attention.STAGES
    rows = []
    try:
        for batch, length in shapes:
            inputs = layer_inputs(batch, length)
            for block, factor, warp, stage in itertools.product((32, 64, 128), (0, 1, 2, 4), warps, stages):
                block_attention.BLOCK_KEYS, block_attention.WARPS, block_attention.STAGES = block, warp, stage
                block_attention._multiprocessors = lambda device, f=factor: max(1, f * real)
                row = {"batch": batch, "cache": length, "block": block, "sm_factor": factor, "warps": warp,
                       "stages": stage, "parts": parts_of(batch, length),
                       "us": round(graph_time(lambda: _attend_cache_and_fresh(*inputs, None)), 2)}  # noqa: B023
                print(row, flush=True)
                rows.append(row)
    finally:
        (block_attention._multiprocessors, block_attention.BLOCK_KEYS, block_attention.WARPS,
         block_attention.STAGES) = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--warps", default=str(block_attention.WARPS), help="--sweep: comma-separated warp counts")
    parser.add_argument("--stages", default=str(block_attention.STAGES), help="--sweep: comma-separated stage counts")
    parser.add_argument("--shapes", default="1x768,1x2048,4x768",
                        help="--sweep: comma-separated BATCHxCACHE shapes (batch rows x cached keys)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.sweep:
        try:
            shapes = [(int(b), int(n)) for b, n in (shape.split("x") for shape in args.shapes.split(","))]
        except ValueError:
            parser.error(f"--shapes takes BATCHxCACHE pairs such as 1x768,32x768, got {args.shapes!r}")
        rows = sweep(shapes, [int(w) for w in args.warps.split(",")],
                     [int(n) for n in args.stages.split(",")])
    else:
        rows = compare([(1, 768), (1, 2048), (1, 4096), (32, 768), (8, 768)])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
