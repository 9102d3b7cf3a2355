"""A compiled block forward pass that writes the block into the cache in place and attends with SDPA,
against the engine's read-only pass (LLaDA-8B shape, random bf16 weights, fused projections).

Times each, compiled and replayed from a CUDA graph, at batch 1 and 32, and prints how often their
argmax tokens agree (random weights: near-ties everywhere, so bf16 rounding flips many). Result
(H200): docs/engine.md, "Tried and dropped" (the batch-32 part did not finish within the run's limit).

    PYTHONPATH=src:benchmarks:benchmarks/experiments python benchmarks/experiments/write_and_sdpa.py
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from engine import random_model
from skinny_matmul import graph_ms

from llada.model import kv_cache
from llada.model.fusion import fuse_projections
from llada.model.kv_cache import KVCache


def write_forward(model, input_ids, positions, cache, key_bias, logits_index, write, fused):
    """``cached_forward`` with the queries' keys/values put into the cache by index (in place)."""
    angles = model.rope[:, positions]
    cos, sin = angles[0][:, None], angles[1][:, None]
    x = model.wte(input_ids)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    for layer, block in enumerate(model.blocks):

        def attention(q, k, v, layer=layer, block=block):
            cache.keys[layer][rows, :, positions] = k.transpose(1, 2)
            cache.values[layer][rows, :, positions] = v.transpose(1, 2)
            return block.sdpa(q, cache.keys[layer], cache.values[layer], key_bias)

        x = block.run(x, cos, sin, attention, fused)
    x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[2]))
    return F.linear(model.ln_f(x), model.output_weight())


def main() -> None:
    model = random_model("8b")
    fuse_projections(model)
    read_only = torch.compile(kv_cache.cached_forward, fullgraph=True)
    writing = torch.compile(write_forward, fullgraph=True)
    for batch in (1, 32):
        cache = KVCache.allocate(model, batch, 768)
        tokens = torch.randint(0, 1000, (batch, 32), device="cuda")
        positions = torch.arange(512, 544, device="cuda").expand(batch, -1).contiguous()
        index = torch.arange(32, device="cuda").expand(batch, -1).contiguous()
        bias = torch.zeros(batch, 1, 1, 768, device="cuda", dtype=torch.bfloat16)
        a = read_only(model, tokens, positions, cache, bias, index, False, True)
        b = writing(model, tokens, positions, cache, bias, index, True, True)
        print("agree", (a.argmax(-1) == b.argmax(-1)).float().mean().item(), flush=True)
        read_ms = graph_ms(functools.partial(read_only, model, tokens, positions, cache, bias, index, False, True))
        write_ms = graph_ms(functools.partial(writing, model, tokens, positions, cache, bias, index, True, True))
        print(f"batch {batch}: read-only {read_ms:.3f} ms, write+SDPA {write_ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
