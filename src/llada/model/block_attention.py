"""One fused attention kernel for the engine's compiled block steps, written in Triton.

A block step's queries attend to two key sets at once: the cache (every position of the sequence,
the queries' own stale entries hidden by the bias) and their own fresh keys/values, which are not
written into the cache first (writing would copy it under ``torch.compile``). Computed with tensor
operations (``kv_cache._attend_cache_and_fresh``) that is four batched matmuls, a softmax reduction
and a normalisation per layer, with the scores (B · H · Q · T floats) written out and read back in
between. This kernel does it in one pass per layer, flash-attention style: online softmax over the
cache in tiles, then over the fresh keys, scores and probabilities never leaving the chip. Where
that leaves most of the GPU idle (batch 1: one program per head), the cache is split into parts
that run side by side, merged by a second kernel (flash-decoding). Measured on an H100
(docs/engine.md): a batch-32 block step of the 8B model 33.26 → 29.44 ms; at batch 1 7.20 → 6.91 ms
(7.16 ms without splitting the cache).

Arithmetic: scores accumulated and kept in float32 (``_attend_cache_and_fresh``'s matmuls round them
to the inputs' dtype first, so the kernel is the more accurate of the two), probabilities rounded to
the values' dtype for their product with the values, float32 accumulation, one rounding at the end.

Triton comes with PyTorch's CUDA builds; where it is missing ``available`` says so and the tensor
operations run instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
BLOCK_KEYS = 64  # keys per tile
WARPS, STAGES = 4, 2  # of the attending kernel (benchmarks/attention_kernel.py --sweep varies them)
ENABLED = True  # False: the tensor operations everywhere (benchmarks compare the two)


def available(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether the kernel serves these queries (B, H, Q, D) and cache (B, K, T, D): on a GPU with Triton
    of compute capability 8 or later (Ampere: bf16 tensor-core products), in bf16 or fp16 (float32
    tiles would multiply in TF32), head dimension a power of two from 16 (the tensor cores' minimum)
    to 128 (larger tiles were not measured and may not fit shared memory)."""
    dim = q.shape[-1]
    return (ENABLED and q.is_cuda and TRITON_INSTALLED and q.dtype in (torch.bfloat16, torch.float16)
            and cache_k.dtype == q.dtype and 16 <= dim <= 128 and dim & (dim - 1) == 0
            and torch.cuda.get_device_properties(q.device).major >= 8)


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use so that importing this module needs no Triton."""
    from llada.model.block_attention_kernel import block_attention as attend
    from llada.model.block_attention_kernel import combine_splits as combine

    return attend, combine


@torch.library.custom_op("llada::block_attention", mutates_args=())
def block_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, bias: torch.Tensor,
                    k: torch.Tensor | None, v: torch.Tensor | None, fresh_bias: torch.Tensor | None,
                    starts: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of ``q`` (B, H, Q, D) over the cache (B, K, T, D) under ``bias`` (B, 1, 1, T)
    and the fresh ``k``/``v`` (B, K, Q, D), if any, under ``fresh_bias`` (B, 1, 1, Q) if given;
    returns (B, Q, H·D), as ``kv_cache._attend_cache_and_fresh``. Check ``available`` first. A custom
    operator, so that ``torch.compile`` and CUDA graphs take the kernel as one opaque call.

    ``starts`` (B,) int: batch-invariant attention (``batch_invariant``). Row b attends to the cache
    from key ``starts[b]`` (its first real key) on, in one part, with tiles of one shape: its result
    does not depend on its left padding nor on the batch's size. Keys before ``starts[b]`` must be
    hidden by ``bias``."""
    batch, heads, queries, dim = q.shape
    kv_heads, length = cache_k.shape[1], cache_k.shape[2]
    group = heads // kv_heads
    fresh = k is not None
    k, v = (k, v) if fresh else (q, q)  # without fresh keys the kernel never reads these
    q, cache_k, cache_v, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, cache_k, cache_v, k, v))
    bias = bias.expand(batch, 1, 1, length)  # one bias for every row arrives with a batch dimension of 1
    fresh_bias = None if fresh_bias is None else fresh_bias.expand(batch, 1, 1, queries)
    out = q.new_empty((batch, queries, heads * dim))
    aligned = starts is not None
    # Rows of a program: up to 64 of its query heads × queries, a power of two (16 at least for tl.dot);
    # aligned, always 64, so that a row's tile has one shape however many queries there are.
    block_m = 64 if aligned else min(64, max(16, 1 << (group * queries - 1).bit_length()))
    programs = (batch * kv_heads, -(-group * queries // block_m))
    parts, split_keys = (1, length) if aligned else _split(programs[0] * programs[1], length, q.device)
    rows = programs[0] * programs[1] * parts * block_m  # of the parts' partial results
    partial = q.new_empty(rows * (dim + 2) if parts > 1 else 0, dtype=torch.float32)  # sums, peaks, totals
    fresh_bias_strides = (0, 0) if fresh_bias is None else (fresh_bias.stride(0), fresh_bias.stride(3))
    shapes = {"GROUP": group, "DIM": dim, "BLOCK_M": block_m}
    # Triton launches on the current device, not the tensors'; CPU tensors run in Triton's interpreter
    # (TRITON_INTERPRET=1), which checks the kernel without a GPU.
    device = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device:
        attend, combine = _kernels()
        sums, peaks, totals = partial.split([rows * dim, rows, rows]) if parts > 1 else (out,) * 3
        attend[(*programs, parts)](
            q, cache_k, cache_v, bias, k, v, bias if fresh_bias is None else fresh_bias, out, sums, peaks, totals,
            starts if aligned else bias, kv_heads, length, queries, split_keys, dim ** -0.5, *q.stride()[:3],
            *cache_k.stride()[:3],
            *cache_v.stride()[:3], *k.stride()[:3], *v.stride()[:3], bias.stride(0), bias.stride(3),
            *fresh_bias_strides, out.stride(0), out.stride(1),
            **shapes, BLOCK=BLOCK_KEYS, FRESH=fresh, FRESH_BIAS=fresh_bias is not None, SPLIT=parts > 1,
            ALIGNED=aligned, num_warps=WARPS, num_stages=STAGES)
        if parts > 1:
            combine[programs](sums, peaks, totals, out, kv_heads, queries, parts, out.stride(0), out.stride(1),
                              **shapes, num_warps=4)
    return out


def _split(programs: int, length: int, device: torch.device) -> tuple[int, int]:
    """Into how many parts to split the cache's keys (each part a program of its own, the parts merged
    by a second kernel), and the keys of a part: enough parts to fill the GPU's multiprocessors once.
    At batch 1 a layer has one program per key/value head (32 at the 8B shape) on a GPU of 132
    multiprocessors, each walking the whole cache tile after tile: 21 µs for a 768-key cache on an
    H200 (0.6 TB/s), 13.5 µs in four parts. Rounded up: at batch 4 (128 programs) two parts took
    27.0 µs against 29.6 µs unsplit (benchmarks/attention_kernel.py --sweep); from batch 8 the
    programs fill the GPU."""
    tiles = max(1, -(-length // BLOCK_KEYS))
    parts = min(tiles, -(-_multiprocessors(device) // programs))
    split_keys = -(-tiles // parts) * BLOCK_KEYS
    return -(-tiles * BLOCK_KEYS // split_keys), split_keys


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count; 1 (no splitting) for the CPU (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@block_attention.register_fake
def _(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, bias: torch.Tensor, k: torch.Tensor | None,
      v: torch.Tensor | None, fresh_bias: torch.Tensor | None, starts: torch.Tensor | None = None) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1] * q.shape[3]))
