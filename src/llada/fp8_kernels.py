"""An fp8 matmul for few rows (the engine's block steps), written in Triton.

A block step of the 8B model multiplies 32 rows by each fp8 weight matrix: its time is the time to
read the weights. cuBLASLt's fp8 kernels read them at 1.4–3.1 TB/s on an H200 at that shape, so this
kernel computes the product transposed — ``out.T = W @ x.T`` — letting the weight matrix fill the
tensor cores' 64-row side while the few input rows become the narrow side, and splits the reduction
of narrow outputs (4,096 columns make only 64 programs) across programs so that every multiprocessor
reads. Both operands are e4m3, as in ``torch._scaled_mm``; per-row input scales and per-column weight
scales are applied to the float32 accumulator. The kernel writes float32 partial sums, one per slice
of the reduction: their sum and the rounding to the model's dtype are left to the caller, where
``torch.compile`` fuses them into the next operation (a residual addition, the attention's input).
Measured: benchmarks/results/engine/fp8_matmul*_h200.json (docs/engine.md, "FP8").

Triton comes with PyTorch's CUDA builds; where it is missing (CPU-only installs) ``available`` says so
and callers use ``torch._scaled_mm`` instead.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

MAX_ROWS = 32  # above this cuBLASLt is faster (benchmarks/results/engine/fp8_matmul_h200.json)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


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
    """The configuration for ``rows × in_features → out_features``, from a sweep on an H200 at 32 rows
    (benchmarks/results/engine/fp8_matmul_sweep_h200.json): 64 output columns per program, 256
    reduction steps per iteration, 8 warps, 4 stages; the narrow side padded to a power of two (16 at
    least, the tensor cores' minimum)."""
    block_m = max(16, 1 << (rows - 1).bit_length())
    return TileConfig(BLOCK_N, block_m, BLOCK_K, reduction_split(out_features, in_features, multiprocessors),
                      num_warps=8, num_stages=4)


def available(quantized: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this kernel can compute ``quantized @ weight.T`` (both fp8 on a GPU, at most ``MAX_ROWS``
    rows, and weight dimensions the tiles divide). The GPU's fp8 tensor cores were checked when the
    weights were quantized."""
    return (quantized.is_cuda and TRITON_INSTALLED and quantized.dim() == 2 and quantized.shape[0] <= MAX_ROWS
            and weight.shape[0] % BLOCK_N == 0 and weight.shape[1] % BLOCK_K == 0)


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


@torch.library.custom_op("llada::scaled_fp8_matmul_partials", mutates_args=())
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
    ``weight`` (N, K) in e4m3, ``row_scales`` M float32 values, ``weight_scales`` N. Check ``available``
    first."""
    return scaled_fp8_matmul_partials(quantized, row_scales, weight, weight_scales).sum(0)
