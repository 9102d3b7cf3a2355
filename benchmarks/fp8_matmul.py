"""Ways to run one projection of the 8B model with fp8 weights, against bf16, at the engine's row counts.

Each variant maps a bf16 input (rows × in) to a bf16 output (rows × out), including the run-time
quantization of the input, compiled with ``torch.compile`` and timed as a CUDA graph of 20 calls
(GPU time per call, no host overhead). The calls cycle through copies of the weight matrix (1 GB of
them at least), so that each call reads its weights from memory as a model's layers do, not from L2:

- ``bf16``: ``F.linear`` with bf16 weights (the baseline).
- ``fp8_rowwise``: ``torch._scaled_mm`` given per-row input scales and per-column weight scales
  (PyTorch's row-wise scaled kernel).
- ``fp8_unit_scales``: ``torch._scaled_mm`` with scales of 1 (cuBLASLt's plain fp8 matmul) writing
  bf16, the scales applied to the output afterwards (one fused elementwise kernel).
- ``fp8_triton``: ``llada.fp8_kernels.scaled_fp8_matmul`` (rows ≤ its ``MAX_ROWS`` only).

``--sweep`` times, instead, every tile configuration of the Triton kernel in a grid for each shape and
row count, and prints the best beside the one ``tile_config`` picks.

    PYTHONPATH=src python benchmarks/fp8_matmul.py --out benchmarks/results/engine/fp8_matmul_h200.json
    PYTHONPATH=src python benchmarks/fp8_matmul.py --sweep --rows 16,32,64,128 \
        --out benchmarks/results/engine/fp8_triton_sweep_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llada.fp8_kernels import MAX_ROWS, TileConfig, launch, scaled_fp8_matmul, tile_config
from llada.quantize import FP8_MAX

SHAPES = {"qkv (fused)": (4096, 12288), "attn_out": (4096, 4096), "gate_up (fused)": (4096, 24576),
          "ff_out": (12288, 4096)}
COPIES_BYTES = 1 << 30


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scales).to(torch.float8_e4m3fn), scales


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX
    return (weight.float() / scales[:, None]).to(torch.float8_e4m3fn), scales[None, :].contiguous()


def bf16(x, weight, w8, w_scales):
    return F.linear(x, weight)


def fp8_rowwise(x, weight, w8, w_scales):
    q, s = quantize_rows(x)
    return torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=w_scales, out_dtype=torch.bfloat16)


def fp8_unit_scales(x, weight, w8, w_scales):
    q, s = quantize_rows(x)
    one = torch.ones((), device=x.device)
    raw = torch._scaled_mm(q, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return (raw.float() * s * w_scales).to(torch.bfloat16)


def fp8_triton(x, weight, w8, w_scales):
    q, s = quantize_rows(x)
    return scaled_fp8_matmul(q, s, w8, w_scales).to(torch.bfloat16)


VARIANTS = {"bf16": bf16, "fp8_rowwise": fp8_rowwise, "fp8_unit_scales": fp8_unit_scales, "fp8_triton": fp8_triton}


def graph_time_us(run: Callable[[int], object], calls: int = 20) -> float:
    """GPU microseconds per call of ``run(i)`` (call ``i`` of a CUDA graph of ``calls`` calls)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            run(i)
    torch.cuda.current_stream().wait_stream(stream)
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


def weight_copies(fan_in: int, fan_out: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(bf16 weight, fp8 weight, its scales) copies: at least ``COPIES_BYTES`` of bf16 weights."""
    copies = []
    for _ in range(max(2, math.ceil(COPIES_BYTES / (2 * fan_in * fan_out)))):
        weight = (torch.randn(fan_out, fan_in, device="cuda") / fan_in**0.5).bfloat16()
        copies.append((weight, *quantize_weight(weight)))
    return copies


def compare_variants(rows_list: list[int]) -> list[dict]:
    results = []
    for shape_name, (fan_in, fan_out) in SHAPES.items():
        copies = weight_copies(fan_in, fan_out)
        for rows in rows_list:
            x = torch.randn(rows, fan_in, device="cuda").bfloat16()
            reference = x.double() @ copies[0][0].double().T
            line = {"shape": shape_name, "in": fan_in, "out": fan_out, "rows": rows}
            for name, fn in VARIANTS.items():
                if name == "fp8_triton" and rows > MAX_ROWS:
                    continue
                compiled = torch.compile(fn, fullgraph=True)
                error = ((compiled(x, *copies[0]).double() - reference).norm() / reference.norm()).item()
                line[f"{name}_us"] = graph_time_us(lambda i: compiled(x, *copies[i % len(copies)]))  # noqa: B023
                line[f"{name}_rel_error"] = error
            results.append(line)
            print(f"{shape_name:16s} rows {rows:5d}  " + "  ".join(
                f"{name} {line[name + '_us']:7.1f} us ({line[name + '_rel_error']:.1e})"
                for name in VARIANTS if name + "_us" in line), flush=True)
            torch._dynamo.reset()
    return results


def sweep_configs(rows_list: list[int], imprecise_products: int | None) -> list[dict]:
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for shape_name, (fan_in, fan_out) in SHAPES.items():
        copies = weight_copies(fan_in, fan_out)
        for rows in rows_list:
            quantized, row_scales = quantize_rows(torch.randn(rows, fan_in, device="cuda").bfloat16())
            _, w8, w_scales = copies[0]
            expected = (quantized.double() @ w8.double().T) * row_scales * w_scales
            chosen = tile_config(rows, fan_out, fan_in, multiprocessors)
            grid = [dataclasses.replace(chosen, imprecise_products=products) for products in (None, 128, 32)]
            grid += [TileConfig(block_n, chosen.block_m, block_k, split_k, num_warps, num_stages, imprecise_products)
                     for block_n, block_k, split_k, num_warps, num_stages in itertools.product(
                         (64, 128, 256), (128, 256), (1, 2, 4, 8), (4, 8), (3, 4))
                     if fan_in % (block_k * split_k) == 0 and fan_out % block_n == 0]
            timings = []
            for config in grid:
                run = functools.partial(_launch_copy, copies, quantized, row_scales, config)
                try:
                    first = run(0).sum(0)
                except Exception as error:  # noqa: BLE001 - a configuration the compiler refuses (shared memory)
                    print(f"  {config}: {type(error).__name__}", flush=True)
                    continue
                # The largest error relative to the output's typical size.
                error = ((first.double() - expected).abs().max() / expected.abs().mean()).item()
                if error > 0.1:
                    raise RuntimeError(f"{config} computes a different product (error {error:.1e})")
                timings.append({"us": graph_time_us(run), "max_error": error, **dataclasses.asdict(config)})
                if len(timings) <= 3:
                    print(f"  {config}: {timings[-1]['us']:.1f} us, max error {error:.1e}", flush=True)
            chosen_timings = timings[:3]
            timings.sort(key=lambda timing: timing["us"])
            best = timings[0]
            results.append({"shape": shape_name, "rows": rows, "chosen": chosen_timings, "best": timings[:8]})
            print(f"{shape_name:16s} rows {rows:4d}  best {best['us']:6.1f} us "
                  f"({fan_in * fan_out / best['us'] / 1e6:.2f} TB/s) {best}", flush=True)
    return results


def _launch_copy(copies, quantized, row_scales, config, i):
    _, w8, w_scales = copies[i % len(copies)]
    return launch(quantized, row_scales, w8, w_scales, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,128,256,1024,8192")
    parser.add_argument("--sweep", action="store_true", help="time the Triton kernel's tile configurations")
    parser.add_argument("--imprecise-products", type=int, default=128,
                        help="with --sweep: fp8 products accumulated at the tensor cores' precision before each "
                             "float32 addition")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_list = [int(rows) for rows in args.rows.split(",")]
    results = sweep_configs(rows_list, args.imprecise_products) if args.sweep else compare_variants(rows_list)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
