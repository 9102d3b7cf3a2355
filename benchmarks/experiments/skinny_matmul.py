"""Block-step projections at 32 rows (LLaDA-8B shapes, bf16): cuBLAS against Inductor's max-autotune.

Each projection's weight is cycled through enough copies (2 GB) that it is read from memory, not
L2, and the calls are replayed from a CUDA graph (no launch overhead). Prints µs per call and the
weight-reading bandwidth. Result (H200): docs/engine.md, "Tried and dropped".

    PYTHONPATH=src python benchmarks/experiments/skinny_matmul.py
"""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096),
          "head": (4096, 126464)}  # (in, out)
ROWS = 32


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def graph_ms(run, replays: int = 20) -> float:
    """Milliseconds per replay of a CUDA graph of ``run()`` (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def microseconds(function, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Mean µs per call of ``function(x, w)`` over the weight copies, replayed from a CUDA graph."""
    def run() -> None:
        for weight in weights:
            function(x, weight)

    return graph_ms(run) / len(weights) * 1e3


def main() -> None:
    torch.manual_seed(0)
    inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
    autotuned = torch.compile(linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    for name, (width_in, width_out) in SHAPES.items():
        copies = max(4, int(2e9 // (width_out * width_in * 2)))
        weights = [torch.randn(width_out, width_in, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(ROWS, width_in, device="cuda", dtype=torch.bfloat16)
        cublas, tuned = microseconds(linear, x, weights), microseconds(autotuned, x, weights)
        gigabytes = weights[0].numel() * 2 / 1e9
        print(f"{name:8s} {gigabytes * 1e3:7.1f} MB cublas {cublas:7.1f} us {gigabytes / cublas * 1e3:5.2f} TB/s | "
              f"autotune {tuned:7.1f} us {gigabytes / tuned * 1e3:5.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
