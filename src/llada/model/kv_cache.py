"""Key/value caches for the bidirectional mask predictor, and the forward pass that reads and fills them.

A diffusion LM attends in both directions, so a position's keys and values change whenever any
token changes: a cache is an *approximation* that is refreshed (recomputed by a full forward pass)
at chosen times. Between refreshes, a forward pass over a few query positions (the block being
decoded, or the block and everything after it) recomputes only their keys and values, writes them
into the cache, and attends to the whole cached sequence. A refresh is the same call with every
position as a query, and then equals the plain forward pass exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llada.model import batch_invariant, block_attention
from llada.model.transformer import Block, LLaDAModel

LayerPass = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]
"""``run_layer``'s signature: what ``cached_forward`` runs each layer with (compiled on compiling engines)."""


@dataclass
class KVCache:
    """Keys and values of a batch of sequences for every layer, in one tensor ``entries``
    (2, n_layers, B, K, T, D): keys then values. ``keys[i]`` and ``values[i]`` are its (B, K, T, D)
    views per layer. One tensor lets work over all layers at once (storing a sparse step's entries,
    copying rows between caches) run as one kernel instead of one per layer and kind."""

    entries: torch.Tensor
    # The memory pool of the CUDA graphs an engine captured over this cache: it lives and dies with
    # them (a pool whose graphs were all freed must not be captured into again).
    graph_pool: tuple[int, int] | None = None
    # The decoding state of the batch holding this cache (tokens, undecided flags, block offsets),
    # by name, shape and dtype: step graphs captured over the cache read and write these very
    # tensors, so that a later batch of the same shape replays them without capturing again.
    state: dict[tuple, torch.Tensor] = field(default_factory=dict)
    keys: list[torch.Tensor] = field(init=False)
    values: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        if self.entries.dim() != 6 or self.entries.shape[0] != 2:
            raise ValueError(f"cache entries must be (2, n_layers, B, K, T, D), got {tuple(self.entries.shape)}")
        # Compiled passes see the layers' views with this tensor as their base: its constant
        # dimensions must not share symbols with an equal batch size (a recompile at the next one).
        for dim in (0, 1, 3, 5):
            torch._dynamo.mark_static(self.entries, dim)
        # Indexed one by one: the views of ``unbind`` may not be written in place under autograd.
        layers = range(self.entries.shape[1])
        self.keys = [self.entries[0, layer] for layer in layers]
        self.values = [self.entries[1, layer] for layer in layers]

    @classmethod
    def allocate(cls, model: LLaDAModel, batch: int, length: int, zeroed: bool = True) -> KVCache:
        """A cache for ``batch`` sequences of ``length``; ``zeroed=False`` leaves the memory as it is,
        for a cache whose every entry is written before it is read (a refresh's)."""
        config = model.config
        shape = (2, config.n_layers, batch, config.n_kv_heads, length, config.head_dim)
        make = torch.zeros if zeroed else torch.empty
        return cls(make(shape, dtype=model.dtype, device=model.device))

    def state_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The cache's state tensor ``name`` of this shape and dtype (uninitialised when new)."""
        key = (name, tuple(shape), dtype)
        if key not in self.state:
            self.state[key] = torch.empty(shape, dtype=dtype, device=self.entries.device)
        return self.state[key]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def copy_rows(self, source: KVCache, rows: torch.Tensor) -> None:
        """Fill this cache with ``source``'s rows ``rows`` (in that order), in place."""
        _check_rows(self, source, rows)  # ``out=`` would resize, moving the memory graphs point at
        torch.index_select(source.entries, 2, rows, out=self.entries)

    def write_rows(self, source: KVCache, rows: torch.Tensor) -> None:
        """Write every row of ``source`` into this cache's rows ``rows`` (the inverse of ``copy_rows``)."""
        _check_rows(source, self, rows)
        self.entries.index_copy_(2, rows, source.entries)


def _check_rows(part: KVCache, whole: KVCache, rows: torch.Tensor) -> None:
    """Refuse ``part`` as the rows ``rows`` of ``whole`` unless it has exactly their shape."""
    expected = (*whole.entries.shape[:2], len(rows), *whole.entries.shape[3:])
    if part.entries.shape != expected:
        raise ValueError(f"cache of shape {tuple(part.entries.shape)} cannot take {len(rows)} rows of "
                         f"{tuple(whole.entries.shape)}")


@torch.no_grad()  # a cache is inference state: its in-place writes (into views of one tensor) carry no gradient
def cached_forward(model: LLaDAModel, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   key_bias: torch.Tensor | None = None, logits_index: torch.Tensor | None = None,
                   write: bool = True, fused: bool = False, query_mask: torch.Tensor | None = None,
                   return_entries: bool = False,
                   layer_pass: LayerPass | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``input_ids`` at ``positions`` against the cache.

    Args:
        model: the mask predictor (its weights; its ``forward`` is not used).
        input_ids: (B, Q) the tokens now at the query positions.
        positions: (B, Q) their positions in the sequence (0 ≤ position < cache length).
        cache: keys/values of the whole sequence, (B, K, T, D) per layer.
        key_bias: optional (B, 1, 1, T) additive bias over keys (``model.attention_bias`` of the
            padding mask).
        logits_index: optional (B, N) query columns to compute logits for (the positions being
            decoded); None computes them for all Q. A tensor rather than a slice so that every
            call of one shape is the same graph (CUDA graphs replay it for any block).
        write: store the queries' fresh keys/values into the cache (a refresh). With False the
            cache is only read: the queries attend to its entries at every *other* position and to
            their own fresh keys/values. Block steps use this: the block is recomputed at every
            step anyway, and not writing saves a copy of the cache per layer under ``torch.compile``.
        fused: use the fused projection matrices (``fusion.fuse_projections``), which round differently
            from the model's own matmuls; off, the pass is the model's own arithmetic.
        query_mask: optional (B, Q) bool, the real queries; the others pad a row to Q: their
            positions keep their cached keys/values (seen by every query, never overwritten) and
            their outputs mean nothing. Padding a row with positions it does not need therefore
            changes nothing for its real queries.
        return_entries: also return the queries' entries to store, (2, n_layers, B, K, Q, D) like
            ``KVCache.entries`` (padding queries carry their positions' cached entries), for the
            caller to store after a read-only pass with ``store_entries`` (a store inside a
            compiled pass copies the cache; one outside it is one kernel for all layers).
        layer_pass: what runs each layer (``run_layer`` by default); a compiled engine passes a
            ``torch.compile``d one, compiled once for all the layers (``run_layer`` says why).
    Returns:
        (B, N, V) logits in the model's dtype (N = Q without ``logits_index``); with
        ``return_entries``, (logits, entries).
    """
    if input_ids.shape != positions.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must be equal (B, Q)")
    if input_ids.shape[0] != cache.batch:
        raise ValueError(f"batch of {input_ids.shape[0]} rows does not match the cache's {cache.batch}")
    # Batch-invariant numerics (``batch_invariant.enabled()``): a row must compute what it computes
    # alone, without its left padding, so its rotary positions count from its first real token and
    # its attention starts there (``starts``).
    starts = first_real_keys(key_bias, positions) if batch_invariant.active() else None
    rotary = positions if starts is None else (positions - starts[:, None]).clamp_min(0)  # padding: any angle
    # (B, 1, Q, D), broadcast over heads; gathered apart rather than as views of one (2, B, Q, D)
    # tensor, whose leading 2 a compiled layer (dynamic shapes) would tie to a batch of 2.
    cos, sin = model.rope[0][rotary][:, None], model.rope[1][rotary][:, None]
    lowest = torch.finfo(model.dtype).min
    fresh_bias = None
    if not write:
        stale = torch.zeros(input_ids.shape[0], cache.length, dtype=torch.bool, device=input_ids.device)
        own = True if query_mask is None else query_mask
        stale = stale.scatter_(1, positions, own)[:, None, None, :]  # (B, 1, 1, T): the real queries' own entries
        key_bias = (torch.zeros_like(stale, dtype=model.dtype) if key_bias is None else key_bias).masked_fill(stale, lowest)
        if query_mask is not None:  # padding queries' fresh keys hidden: their cached ones stand
            fresh_bias = torch.zeros(query_mask.shape, dtype=model.dtype, device=query_mask.device).masked_fill(
                ~query_mask, lowest)[:, None, None, :]  # (B, 1, 1, Q)
    layer_pass = run_layer if layer_pass is None else layer_pass
    stored_keys, stored_values = [], []
    x = model.wte(input_ids)  # (B, Q, E)
    for layer, block in enumerate(model.blocks):
        x, entries = layer_pass(block, x, cos, sin, cache.keys[layer], cache.values[layer], positions, key_bias,
                                write, fused, query_mask, fresh_bias, starts, return_entries)
        if entries is not None:
            stored_keys.append(entries[0])
            stored_values.append(entries[1])
    if logits_index is not None:
        x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[2]))  # (B, N, E)
    logits = F.linear(model.ln_f(x), model.output_weight())
    if return_entries:
        return logits, torch.stack([torch.stack(stored_keys), torch.stack(stored_values)])
    return logits


def run_layer(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, positions: torch.Tensor, key_bias: torch.Tensor | None, write: bool, fused: bool,
              query_mask: torch.Tensor | None, fresh_bias: torch.Tensor | None, starts: torch.Tensor | None,
              return_entries: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One block of ``cached_forward`` over its layer's cache ``keys``/``values`` (B, K, T, D): the new
    hidden states, and with ``return_entries`` the (keys, values) entries to store.

    A function of its own, taking the block as an argument, so that a compiled engine compiles
    one layer rather than the unrolled network: every layer has the same code and shapes, so
    ``torch.compile`` traces and lowers once and reuses the result for all of them, which is what
    makes the 8B shape's compile (and a cached start's re-tracing) a matter of seconds.
    """
    stored: tuple[list[torch.Tensor], list[torch.Tensor]] | None = ([], []) if return_entries else None
    attention = functools.partial(_attend_layer, keys=keys, values=values, sdpa=block.sdpa, positions=positions,
                                  key_bias=key_bias, write=write, query_mask=query_mask, fresh_bias=fresh_bias,
                                  starts=starts, stored=stored)
    x = block.run(x, cos, sin, attention, fused)
    return x, None if stored is None else (stored[0][0], stored[1][0])


def _attend_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keys: torch.Tensor, values: torch.Tensor,
                  sdpa: Callable[..., torch.Tensor], positions: torch.Tensor, key_bias: torch.Tensor | None, write: bool,
                  query_mask: torch.Tensor | None, fresh_bias: torch.Tensor | None, starts: torch.Tensor | None,
                  stored: tuple[list[torch.Tensor], list[torch.Tensor]] | None) -> torch.Tensor:
    """One layer's attention in ``cached_forward`` (the ``attention`` of ``Block.run``): the queries'
    fresh keys/values ``k``, ``v`` (B, K, Q, D) stored into the layer's cache ``keys``, ``values``
    (B, K, T, D) and attended through it (``write``), or attended beside it; with ``stored``, the
    entries to store later are appended to its two lists. ``starts``: each row's first real key,
    for batch-invariant attention (``aligned_attention``)."""
    index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, K, Q, D)
    if stored is not None:
        stored[0].append(_entries_to_store(keys, index, k, query_mask))
        stored[1].append(_entries_to_store(values, index, v, query_mask))
    if write:
        keys, values = store_queries(keys, index, k, query_mask), store_queries(values, index, v, query_mask)
        if starts is not None:
            return aligned_attention(q, keys, values, key_bias, None, None, None, starts, positions, sdpa)
        return sdpa(q, keys, values, key_bias)
    if starts is not None:
        return aligned_attention(q, keys, values, key_bias, k, v, fresh_bias, starts, positions, sdpa)
    return _attend_cache_and_fresh(q, keys, values, key_bias, k, v, fresh_bias)


def first_real_keys(key_bias: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """(B,) int32: each row's first key that ``key_bias`` (B or 1, 1, 1, T; 0 where a key is seen)
    leaves visible, the length of its left padding (0 for every row without a bias); B is the
    batch of ``positions`` (B, Q), on whose device it is."""
    batch = positions.shape[0]
    if key_bias is None:
        return torch.zeros(batch, dtype=torch.int32, device=positions.device)
    visible = key_bias[:, 0, 0, :].expand(batch, -1) == 0
    return visible.to(torch.int32).argmax(1).to(torch.int32)  # the first maximum: the first visible key


def aligned_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                      k: torch.Tensor | None, v: torch.Tensor | None, fresh_bias: torch.Tensor | None,
                      starts: torch.Tensor, positions: torch.Tensor, sdpa: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Batch-invariant attention of ``q`` (B, H, Q, D, at ``positions``) over the cache ``keys``/``values``
    (B, K, T, D) under ``bias``, and over the fresh ``k``/``v`` under ``fresh_bias`` if given: row b
    as it is computed alone, over the keys from ``starts[b]`` (its first real one) on; (B, Q, H·D).

    On a GPU the fused kernel does this (``block_attention`` with ``starts``: one part, tiles of one
    shape from the row's first key). Elsewhere each row runs on its own, over its own keys and real
    queries only, so that every operation sees the shapes it sees for the row alone; outputs of
    padding queries are zeros."""
    batch, _, length, _ = keys.shape
    bias = torch.zeros(1, 1, 1, length, dtype=q.dtype, device=q.device) if bias is None else bias
    bias = bias.expand(batch, 1, 1, length)
    if block_attention.available(q, keys):
        return block_attention.block_attention(q, keys, values, bias, k, v, fresh_bias, starts)
    out = q.new_zeros(batch, q.shape[2], q.shape[1] * q.shape[3])
    for b, start in enumerate(starts.tolist()):
        first = int((positions[b] < start).sum())  # padding queries come first
        row, queries = slice(b, b + 1), slice(first, None)
        row_q, row_keys, row_values, row_bias = (q[row, :, queries], keys[row, :, start:], values[row, :, start:],
                                                 bias[row, ..., start:])
        if k is None:
            out[b, first:] = sdpa(row_q, row_keys, row_values, row_bias)[0]
        else:
            row_fresh_bias = None if fresh_bias is None else fresh_bias.expand(batch, -1, -1, -1)[row, ..., queries]
            out[b, first:] = _attend_cache_and_fresh(row_q, row_keys, row_values, row_bias, k[row, :, queries],
                                                     v[row, :, queries], row_fresh_bias)[0]
    return out


def _entries_to_store(cache: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor,
                      query_mask: torch.Tensor | None) -> torch.Tensor:
    """The fresh keys (or values) (B, K, Q, D) of the real queries, and the cached ones of padding
    queries (``query_mask`` False) at their positions (``index``, expanded to (B, K, Q, D)) in a
    layer's cache (B, K, T, D)."""
    if query_mask is None:
        return fresh
    return torch.where(query_mask[:, None, :, None], fresh, cache.gather(2, index))


def store_entries(cache: KVCache, positions: torch.Tensor, entries: torch.Tensor) -> None:
    """Write ``entries`` (2, n_layers, B, K, Q, D), from ``cached_forward(return_entries=True)``, into
    the cache at ``positions`` (B, Q), every layer's keys and values in one scatter."""
    two, layers, _, heads, _, dim = entries.shape
    index = positions[None, None, :, None, :, None].expand(two, layers, -1, heads, -1, dim)
    cache.entries.scatter_(4, index, entries)


def store_queries(cache: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor,
                  query_mask: torch.Tensor | None) -> torch.Tensor:
    """Write the real queries' fresh keys (or values) (B, K, Q, D) into a layer's cache (B, K, T, D)
    at ``index`` (their positions, expanded to (B, K, Q, D)), in place; padding queries (``query_mask``
    False) write their positions' cached entries back unchanged."""
    return cache.scatter_(2, index, _entries_to_store(cache, index, fresh, query_mask))


def _attend_cache_and_fresh(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, bias: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, fresh_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q (B, H, Q, D) over two key sets at once — the cache (B, K, T, D) under
    ``bias`` and the fresh k/v (B, K, Q, D), under ``fresh_bias`` (B, 1, 1, Q) if given — without
    concatenating them (which would copy the cache).

    Scores in (at least) float32; query heads are grouped per key/value head (GQA) by a reshape, not a copy.
    Returns (B, Q, H·D). On a GPU in bf16/fp16 one fused kernel computes the same (``llada.model.block_attention``).
    """
    if block_attention.available(q, cache_k):
        return block_attention.block_attention(q, cache_k, cache_v, bias, k, v, fresh_bias)
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)  # (B, K, G·Q, D)
    scale = dim ** -0.5
    compute = torch.promote_types(q.dtype, torch.float32)
    cached = (grouped @ cache_k.transpose(-1, -2)).to(compute) * scale + bias.to(compute)  # (B, K, G·Q, T)
    fresh = (grouped @ k.transpose(-1, -2)).to(compute) * scale  # (B, K, G·Q, Q)
    if fresh_bias is not None:
        fresh = fresh + fresh_bias.to(compute)
    peak = torch.maximum(cached.amax(-1, keepdim=True), fresh.amax(-1, keepdim=True))
    cached, fresh = (cached - peak).exp(), (fresh - peak).exp()
    total = cached.sum(-1, keepdim=True) + fresh.sum(-1, keepdim=True)
    out = (cached.to(q.dtype) @ cache_v + fresh.to(q.dtype) @ v).to(compute) / total  # (B, K, G·Q, D)
    return out.to(q.dtype).reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, heads * dim)
