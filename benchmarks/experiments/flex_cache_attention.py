"""A compiled block step whose cache attention runs as FlexAttention, against the engine's own.

The engine attends a block's queries to the cache (own positions hidden by the bias) and to the
block's fresh keys at once (``kv_cache._attend_cache_and_fresh``). Here the cache part is one
``flex_attention`` call (bias as a score modification, returning its log-sum-exp) and the fresh
part a small softmax, merged by their log-sum-exps. Checks the two agree on random inputs, then
times the engine's compiled dual-cache step (``engine.py --part step``) with each, at batch 1 and
32. Result (H200): docs/engine.md, "Tried and dropped".

    PYTHONPATH=src:benchmarks python benchmarks/experiments/flex_cache_attention.py
"""

from __future__ import annotations

import torch
from engine import random_model, step_part
from torch.nn.attention.flex_attention import flex_attention

from llada.model import kv_cache

ENGINE_ATTENTION = kv_cache._attend_cache_and_fresh


def flex_version(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, bias: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same contract as ``kv_cache._attend_cache_and_fresh``: (B, Q, H·D)."""
    batch, heads, length, dim = q.shape
    scale = dim ** -0.5
    table = bias[:, 0, 0, :]  # (B, T)

    def add_bias(score, b, h, q_index, k_index):
        return score + table[b, k_index]

    out, lse = flex_attention(q, cache_k, cache_v, score_mod=add_bias, scale=scale,
                              enable_gqa=cache_k.shape[1] != heads, return_lse=True)
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    fresh = (grouped @ k.transpose(-1, -2)).float() * scale  # (B, K, G·Q, Q)
    fresh_lse = fresh.logsumexp(-1)
    fresh_out = (fresh - fresh_lse[..., None]).exp().to(q.dtype) @ v
    fresh_lse = fresh_lse.reshape(batch, heads, length)
    fresh_out = fresh_out.reshape(batch, heads, length, dim)
    total = torch.logaddexp(lse.float(), fresh_lse)
    merged = (out.float() * (lse.float() - total).exp()[..., None]
              + fresh_out.float() * (fresh_lse - total).exp()[..., None])
    return merged.to(q.dtype).transpose(1, 2).reshape(batch, length, heads * dim)


def main() -> None:
    torch.manual_seed(0)
    batch, heads, queries, keys, dim = 2, 32, 32, 768, 128
    q = torch.randn(batch, heads, queries, dim, device="cuda", dtype=torch.bfloat16)
    cache_k, cache_v = (torch.randn(batch, heads, keys, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(batch, heads, queries, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = torch.zeros(batch, 1, 1, keys, device="cuda", dtype=torch.bfloat16)
    bias[:, :, :, 512:544] = torch.finfo(torch.bfloat16).min  # the block's own entries
    bias[1, :, :, :20] = torch.finfo(torch.bfloat16).min  # padding
    expected = ENGINE_ATTENTION(q, cache_k, cache_v, bias, k, v)
    got = torch.compile(flex_version, fullgraph=True)(q, cache_k, cache_v, bias, k, v)
    print("max abs diff", (expected.float() - got.float()).abs().max().item(),
          "ref scale", expected.float().abs().mean().item(), flush=True)
    model = random_model("8b")
    for rows in (1, 32):
        times = {}
        for name, attention in (("engine", ENGINE_ATTENTION), ("flex", flex_version)):
            kv_cache._attend_cache_and_fresh = attention
            torch._dynamo.reset()
            times[name] = step_part(model, 512, 256, 32, rows, None, {"compiled_cuda_graphs"})[
                "compiled_cuda_graphs_step_ms"]
        kv_cache._attend_cache_and_fresh = ENGINE_ATTENTION
        print(f"batch {rows}: current {times['engine']:.2f} ms, flex {times['flex']:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
