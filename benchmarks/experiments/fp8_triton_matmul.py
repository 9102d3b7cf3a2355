"""Tried and dropped: a Triton fp8 matmul for the engine's block steps (few rows).

Idea: at 32 rows an fp8 projection of the 8B model is bound by reading its weights, and cuBLASLt's
fp8 kernels seemed to read them slower than its bf16 ones. The kernel here computes the product
transposed (``out.T = W @ x.T``: the weight matrix fills the tensor cores' 64-row side, the few input
rows the narrow side), splits the reduction of 4,096-wide outputs over two programs so that every
multiprocessor reads, applies both scales to the float32 accumulator and leaves the sum of the
partial results to the caller (``torch.compile`` fuses it into the next operation). It limits the
tensor cores' reduced-precision fp8 additions to 128 products at a time: Triton's default on Hopper
(all of them) had 20× the error (largest error / mean |output|: 2e-2 against 9e-4) for 2–5% less time.

Result (H200, benchmarks/results/engine/fp8_triton/, docs/engine.md "Tried and dropped"): the kernel
alone at 32 rows reads 3.2–3.6 TB/s on the wide projections, but in a compiled, graph-captured block
step of the 8B model, wired into ``Fp8Linear`` (commit e626bc1, ``benchmarks/engine.py --part step
--variants compiled_cuda_graphs,compiled_cuda_graphs_fp8,compiled_cuda_graphs_fp8_cublas``), the step
took 4.34 ms against 4.11 ms with cuBLASLt: the engine keeps ``torch._scaled_mm``.

Each variant of ``--compare`` maps a bf16 input (rows × in) to a bf16 output (rows × out), including
the run-time quantization of the input, compiled and timed as a CUDA graph of 20 calls that cycle
through copies of the weights (1 GB at least, so that weights come from memory, not L2).
``--sweep`` times the kernel alone over a grid of tile configurations.

    PYTHONPATH=src:benchmarks python benchmarks/experiments/fp8_triton_matmul.py --compare \
        --out benchmarks/results/engine/fp8_triton/compare_h200.json
    PYTHONPATH=src:benchmarks python benchmarks/experiments/fp8_triton_matmul.py --sweep --rows 32,128 \
        --out benchmarks/results/engine/fp8_triton/sweep_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fp8_matmul import SHAPES, graph_time_us, quantize_rows, write_results  # benchmarks/ on the path

from llada.model.quantize import Fp8Linear


@dataclass(frozen=True)
class TileConfig:
    """How one product is cut: ``block_n`` output columns by all rows (padded to ``block_m``) per
    program, ``block_k`` reduction steps per iteration, the reduction split over ``split_k`` programs.
    ``imprecise_products``: fp8 products the tensor cores may add at their own reduced precision before
    each float32 addition (None: Triton's default, which on Hopper is all of them)."""

    block_n: int
    block_m: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    imprecise_products: int | None = 128


BLOCK_N = 64
BLOCK_K = 256


def reduction_split(out_features: int, in_features: int, multiprocessors: int) -> int:
    """Into how many slices the reduction is split: doubled while the programs still fit on the
    multiprocessors at once (a split costs a float32 partial sum per slice, read back by the caller)."""
    split = 1
    while ((out_features // BLOCK_N) * split * 2 <= multiprocessors
           and in_features % (BLOCK_K * split * 2) == 0):
        split *= 2
    return split


def tile_config(rows: int, out_features: int, in_features: int, multiprocessors: int) -> TileConfig:
    """The configuration for ``rows × in_features → out_features``, from a first sweep on an H200 at 32
    rows (``fp8_triton/sweep_32_rows_single_output_h200.json``): 64 output columns per program, 256
    reduction steps per iteration, 8 warps, 4 stages; the narrow side padded to a power of two (16 at
    least, the tensor cores' minimum)."""
    block_m = max(16, 1 << (rows - 1).bit_length())
    return TileConfig(BLOCK_N, block_m, BLOCK_K, reduction_split(out_features, in_features, multiprocessors),
                      num_warps=8, num_stages=4)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use so that importing this module needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_fp8_matmul_transposed(weight_ptr, input_ptr, weight_scale_ptr, input_scale_ptr, out_ptr,
                                     rows, in_features, out_features,
                                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                     SPLIT_K: tl.constexpr, IMPRECISE_PRODUCTS: tl.constexpr):
        # One program: output columns [n0, n0 + BLOCK_N) for every row, over one slice of the reduction.
        column = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row = tl.arange(0, BLOCK_M)
        slice_length = in_features // SPLIT_K
        k = tl.program_id(1) * slice_length + tl.arange(0, BLOCK_K)
        weight_tile = weight_ptr + column[:, None] * in_features + k[None, :]  # (BLOCK_N, BLOCK_K)
        input_tile = input_ptr + row[None, :] * in_features + k[:, None]  # (BLOCK_K, BLOCK_M): x.T
        row_exists = row[None, :] < rows
        accumulator = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for _ in range(0, slice_length, BLOCK_K):
            accumulator = tl.dot(tl.load(weight_tile), tl.load(input_tile, mask=row_exists, other=0.0),
                                 accumulator, max_num_imprecise_acc=IMPRECISE_PRODUCTS)
            weight_tile += BLOCK_K
            input_tile += BLOCK_K
        accumulator *= tl.load(weight_scale_ptr + column)[:, None]
        accumulator *= tl.load(input_scale_ptr + row, mask=row < rows, other=0.0)[None, :]
        out = out_ptr + tl.program_id(1) * rows * out_features + row[None, :] * out_features + column[:, None]
        tl.store(out, accumulator, mask=row_exists)

    return scaled_fp8_matmul_transposed


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch(quantized: torch.Tensor, row_scales: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
           config: TileConfig) -> torch.Tensor:
    """The kernel's float32 partial sums, (split_k, rows, out_features), for the tiles given."""
    rows, in_features = quantized.shape
    out_features = weight.shape[0]
    out = torch.empty((config.split_k, rows, out_features), dtype=torch.float32, device=quantized.device)
    grid = (out_features // config.block_n, config.split_k)
    _kernel()[grid](weight.contiguous(), quantized.contiguous(), weight_scales.contiguous().reshape(-1),
                    row_scales.contiguous().reshape(-1), out, rows, in_features, out_features,
                    BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
                    SPLIT_K=config.split_k, IMPRECISE_PRODUCTS=config.imprecise_products,
                    num_warps=config.num_warps, num_stages=config.num_stages)
    return out


@torch.library.custom_op("llada_experiments::scaled_fp8_matmul_partials", mutates_args=())
def scaled_fp8_matmul_partials(quantized: torch.Tensor, row_scales: torch.Tensor, weight: torch.Tensor,
                               weight_scales: torch.Tensor) -> torch.Tensor:
    """A custom operator, so that ``torch.compile`` and CUDA graphs take the kernel as one opaque call."""
    rows, in_features = quantized.shape
    config = tile_config(rows, weight.shape[0], in_features, _multiprocessors(quantized.device.index or 0))
    return launch(quantized, row_scales, weight, weight_scales, config)


@scaled_fp8_matmul_partials.register_fake
def _(quantized: torch.Tensor, row_scales: torch.Tensor, weight: torch.Tensor,
      weight_scales: torch.Tensor) -> torch.Tensor:
    split = reduction_split(weight.shape[0], weight.shape[1], _multiprocessors(quantized.device.index or 0))
    return quantized.new_empty((split, quantized.shape[0], weight.shape[0]), dtype=torch.float32)


def scaled_fp8_matmul(quantized: torch.Tensor, row_scales: torch.Tensor, weight: torch.Tensor,
                      weight_scales: torch.Tensor) -> torch.Tensor:
    """``(quantized @ weight.T) · row_scales · weight_scales`` in float32: ``quantized`` (M, K) and
    ``weight`` (N, K) in e4m3, ``row_scales`` M float32 values, ``weight_scales`` N."""
    return scaled_fp8_matmul_partials(quantized, row_scales, weight, weight_scales).sum(0)


COPIES_BYTES = 1 << 30


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


def weight_copies(fan_in: int, fan_out: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(bf16 weight, fp8 weight, its scales) copies: at least ``COPIES_BYTES`` of bf16 weights."""
    copies = []
    for _ in range(max(2, math.ceil(COPIES_BYTES / (2 * fan_in * fan_out)))):
        weight = (torch.randn(fan_out, fan_in, device="cuda") / fan_in**0.5).bfloat16()
        layer = Fp8Linear(weight)  # the engine's own weight quantization
        copies.append((weight, layer.weight, layer.scales))
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
    parser.add_argument("--rows", default="16,32,64,128")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compare", action="store_true", help="the kernel against bf16 and cuBLASLt's fp8 matmuls")
    mode.add_argument("--sweep", action="store_true", help="time the Triton kernel's tile configurations")
    parser.add_argument("--imprecise-products", type=int, default=128,
                        help="with --sweep: fp8 products accumulated at the tensor cores' precision before each "
                             "float32 addition")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_list = [int(rows) for rows in args.rows.split(",")]
    results = sweep_configs(rows_list, args.imprecise_products) if args.sweep else compare_variants(rows_list)
    if args.out:
        write_results(args.out, results)



if __name__ == "__main__":
    main()
