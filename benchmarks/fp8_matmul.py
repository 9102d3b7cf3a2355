"""Ways to run one projection of the 8B model with fp8 weights, against bf16, at the engine's row counts.

Each variant maps a bf16 input (rows × in) to a bf16 output (rows × out), including the run-time
quantization of the input, compiled with ``torch.compile`` and timed as a CUDA graph of 20 calls
(GPU time per call, no host overhead):

- ``bf16``: ``F.linear`` with bf16 weights (the baseline).
- ``fp8_rowwise``: ``torch._scaled_mm`` given per-row input scales and per-column weight scales
  (PyTorch's row-wise scaled kernel).
- ``fp8_unit_scales``: ``torch._scaled_mm`` with scales of 1 (cuBLASLt's plain fp8 matmul) writing
  bf16, the scales applied to the output afterwards (one fused elementwise kernel).
- ``fp8_unit_scales_fast_accum``: the same with Hopper's fast fp8 accumulation.

    PYTHONPATH=src python benchmarks/fp8_matmul.py --out benchmarks/results/engine/fp8_matmul_h200.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llada.model.quantize import FP8_MAX, Fp8Linear

SHAPES = {"qkv (fused)": (4096, 12288), "attn_out": (4096, 4096), "gate_up (fused)": (4096, 24576),
          "ff_out": (12288, 4096)}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scales).to(torch.float8_e4m3fn), scales


def variants(weight: torch.Tensor) -> dict:
    quantized = Fp8Linear(weight)  # the engine's own weight quantization
    w8, w_scales_row = quantized.weight, quantized.scales
    one = torch.ones((), device=weight.device)

    def bf16(x):
        return F.linear(x, weight)

    def fp8_rowwise(x):
        q, s = quantize_rows(x)
        return torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=w_scales_row, out_dtype=torch.bfloat16)

    def unit_scales(fast: bool):
        def run(x):
            q, s = quantize_rows(x)
            raw = torch._scaled_mm(q, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                   use_fast_accum=fast)
            return (raw.float() * s * w_scales_row).to(torch.bfloat16)
        return run

    return {"bf16": bf16, "fp8_rowwise": fp8_rowwise, "fp8_unit_scales": unit_scales(False),
            "fp8_unit_scales_fast_accum": unit_scales(True)}


def graph_time_us(run: Callable[[int], object], calls: int = 20) -> float:
    """GPU microseconds per call of ``run(i)`` (call ``i`` of a CUDA graph of ``calls`` calls)."""
    for i in range(3):
        run(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            run(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,256,1024,8192")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for shape_name, (fan_in, fan_out) in SHAPES.items():
        weight = (torch.randn(fan_out, fan_in, device="cuda") / fan_in**0.5).bfloat16()
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, fan_in, device="cuda").bfloat16()
            reference = x.double() @ weight.double().T
            line = {"shape": shape_name, "in": fan_in, "out": fan_out, "rows": rows}
            for name, fn in variants(weight).items():
                compiled = torch.compile(fn, fullgraph=True)
                out = compiled(x)
                error = ((out.double() - reference).norm() / reference.norm()).item()
                line[f"{name}_us"] = graph_time_us(lambda _: compiled(x))  # noqa: B023 - called right here
                line[f"{name}_rel_error"] = error
            results.append(line)
            print(f"{shape_name:16s} rows {rows:5d}  " + "  ".join(
                f"{name} {line[name + '_us']:7.1f} us ({line[name + '_rel_error']:.1e})" for name in variants(weight)),
                flush=True)
            torch._dynamo.reset()
    if args.out:
        write_results(args.out, results)


def write_results(path: str, results: list[dict]) -> None:
    """``results`` as JSON, with the card and PyTorch version that produced them."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
