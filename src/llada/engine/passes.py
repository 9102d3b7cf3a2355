"""The forward passes of a batch's step, one per cache mode, and the whole greedy block steps that
the runtime captures as one CUDA graph each.

- *refresh*: every position is a query; fills the cache and equals the full forward pass exactly.
  With ``keep_prompt`` a row's later refreshes query its answer only and read its prompt's
  keys/values from the cache. When only some rows refresh, they run as a smaller batch of their own
  (on GPUs padded to a power of two and captured, when short) whose cache rows are copied in.
- *dual* block step: only each row's block is queried; everything else is read from the cache.
- *prefix* block step: the rows' common block and everything after it are queried.
- *sparse* (``reuse_decided``) block step: of each row's block, only the positions still undecided or
  decided since their keys/values were stored.

Every pass here reads and writes only its arguments, the model and the cache (no tensor kept from an
earlier call), so that a graph captured for one batch serves every batch of the same shape.
"""

from __future__ import annotations

import functools

import torch

from llada.engine.commits import commit, needed, progress
from llada.engine.layout import BatchLayout, BatchTensors
from llada.engine.runtime import Runtime
from llada.engine.settings import GenerationSettings
from llada.model.kv_cache import KVCache, store_entries
from llada.model.transformer import attention_bias

# Refreshes of some rows of a batch of at most this many matmul FLOPs (after padding) are captured as
# CUDA graphs; larger ones run uncaptured at their own size. 2 TFLOP take about 3 ms on an H100,
# about as long as launching an uncaptured pass's kernels: below it a pass is launch-bound (the demo
# model's: ~0.05 TFLOP for 32 rows), above it the GPU hides the launches and padding would cost real
# work (the 8B model's 768-token row: 12 TFLOP), and its graphs would hold GBs of scratch cache.
CAPTURED_REFRESH_FLOPS = 2e12


class Passes:
    """The passes of one batch: its runtime, layout, settings and random generator."""

    def __init__(self, runtime: Runtime, layout: BatchLayout, settings: GenerationSettings,
                 generator: torch.Generator | None) -> None:
        self.runtime, self.layout, self.settings, self.generator = runtime, layout, settings, generator
        device = runtime.device
        # Index tensors reused across steps (building one from a host list is a blocking copy).
        self.everything = torch.arange(layout.length, device=device)
        self.block_columns = torch.arange(layout.block_length, device=device)

    @property
    def exact(self) -> bool:
        """The exact mode (``cache="none"``): the model's own arithmetic, eagerly."""
        return self.settings.cache_behaviour.exact

    def bias(self, key_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The model's key bias for ``key_mask`` (B, T), its rows doubled with guidance."""
        if key_mask is not None and self.layout.guided:
            key_mask = torch.cat([key_mask, key_mask])
        return attention_bias(key_mask, self.layout.length, False, self.runtime.model.dtype, self.runtime.device)

    def commit(self, logits: torch.Tensor, x: torch.Tensor, undecided: torch.Tensor, offsets: torch.Tensor,
               limits: torch.Tensor, count: int | torch.Tensor, unwritten: torch.Tensor | None = None,
               columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``commits.commit`` with this batch's settings (``logits`` guided)."""
        layout = self.layout
        return commit(logits, x, undecided, offsets, limits, count, settings=self.settings,
                      prompt_length=layout.prompt_length, block_length=layout.block_length, mask_id=layout.mask_id,
                      end_ids=self.runtime.end_ids, generator=self.generator, unwritten=unwritten, columns=columns,
                      stable_ties=self.runtime.deterministic)

    def progress(self, x: torch.Tensor, undecided: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        return progress(x[:, self.layout.prompt_length:], undecided, pending, self.runtime.end_ids,
                        self.settings.early_stop)

    # --- a step's logits, outside a captured whole step -----------------------------------------------

    def logits(self, t: BatchTensors, offsets: torch.Tensor, live: list[int], refresh: list[int],
               answer_only: list[bool], start: int | None) -> torch.Tensor:
        """Guided logits (B, L, V) at each row's block (``offsets``: answer positions, (B, L)).

        ``refresh``: the rows that refresh this step (``answer_only``: each keeps its prompt);
        ``start``: the prefix cache's first query position (else None)."""
        runtime, layout = self.runtime, self.layout
        positions = offsets + layout.prompt_length  # (B, L)
        if refresh == live and len(set(answer_only)) == 1:
            # Every decoding row refreshes, all of the same kind: one pass over the whole batch (idle rows too).
            first = layout.prompt_length if answer_only[0] else 0
            t.unwritten.zero_()  # every row's keys/values are stored from its tokens now
            tokens = layout.model_rows(t.x[:, first:])
            logits = runtime.forward(t.cache, tokens, self.everything[first:].expand(tokens.shape[0], -1),
                                     layout.model_rows(positions - first), t.key_bias, write=True, exact=self.exact)
            return layout.guide(logits)
        if refresh == live:  # every decoding row refreshes, of both kinds: no block step is needed
            fresh = self.refresh_rows(t, refresh, answer_only, positions)
            logits = fresh.new_zeros(t.rows, *fresh.shape[1:])  # idle rows: nothing to decide
            logits[refresh] = fresh
            return logits
        if self.settings.reuse_decided:  # the whole block, storing what a reuse_decided step would
            logits, _, _ = self.sparse_logits(t.x, t.undecided, t.unwritten, offsets, t.key_bias,
                                              width=layout.block_length, cache=t.cache)
            logits = layout.guide(logits)
        else:
            query, index = self.block_query(positions, start, self.everything, self.block_columns)
            tokens = layout.model_rows(t.x.gather(1, query))
            # Eagerly, writing the queries into the cache and using fused SDPA is fastest; compiled, a
            # read-only step avoids copying the cache (see kv_cache.cached_forward).
            logits = runtime.forward(t.cache, tokens, layout.model_rows(query), layout.model_rows(index),
                                     t.key_bias, write=not runtime.compiled)
            logits = layout.guide(logits.clone() if refresh else logits)
        if refresh:
            logits[refresh] = self.refresh_rows(t, refresh, answer_only, positions)
        return logits

    @staticmethod
    def block_query(positions: torch.Tensor, start: int | None, everything: torch.Tensor,
                    block_columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A block step's query positions (B, Q) and the columns of the blocks among them (B, L):
        the block alone, or (``start``: prefix cache) everything from ``start`` on."""
        batch = positions.shape[0]
        # Contiguous: compiled passes specialise on strides, and the graph-captured forward pass gets
        # contiguous copies of its inputs; expanded ones here would compile a second variant.
        if start is None:
            return positions, block_columns.expand(batch, -1).contiguous()
        return everything[start:].expand(batch, -1).contiguous(), positions - start

    # --- whole block steps (captured as one graph each) -------------------------------------------------

    def block_step(self, x: torch.Tensor, undecided: torch.Tensor, offsets: torch.Tensor,
                   key_bias: torch.Tensor | None, limits: torch.Tensor, *, count: int | torch.Tensor,
                   start: int | None, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole block step of every row, from the tokens to the commits: ``chosen`` (B, N), the
        positions committed, and the rows' ``progress`` (2, B)."""
        layout, runtime = self.layout, self.runtime
        positions = offsets + layout.prompt_length
        everything = torch.arange(layout.length, device=x.device)
        query, index = self.block_query(positions, start, everything, everything[:layout.block_length])
        tokens = layout.model_rows(x.gather(1, query))
        logits = runtime.plain_forward(cache, tokens, layout.model_rows(query), layout.model_rows(index),
                                       key_bias, write=not runtime.compiled)
        chosen, pending = self.commit(layout.guide(logits), x, undecided, offsets, limits, count)
        return chosen, self.progress(x, undecided, pending)

    def sparse_block_step(self, x: torch.Tensor, undecided: torch.Tensor, unwritten: torch.Tensor,
                          offsets: torch.Tensor, key_bias: torch.Tensor | None, limits: torch.Tensor, *,
                          count: int | torch.Tensor, width: int, cache: KVCache
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``block_step`` of ``reuse_decided``: each row queries ``width`` positions of its block, first
        those still undecided or unwritten, then (padding) others, which keep their cached keys/values.

        Returns ``chosen`` (B, W), the queried answer positions (B, W) and the rows' ``progress`` (2, B).
        """
        logits, queried, columns = self.sparse_logits(x, undecided, unwritten, offsets, key_bias, width=width,
                                                      cache=cache)
        chosen, pending = self.commit(self.layout.guide(logits), x, undecided, queried, limits, count, unwritten,
                                      columns)
        return chosen, queried, self.progress(x, undecided, pending)

    def sparse_logits(self, x: torch.Tensor, undecided: torch.Tensor, unwritten: torch.Tensor, offsets: torch.Tensor,
                      key_bias: torch.Tensor | None, *, width: int, cache: KVCache
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward pass of a ``reuse_decided`` block step over ``width`` positions per row (padded
        as in ``sparse_block_step``): stores the keys/values of the positions it had to query and
        clears their ``unwritten`` flags. Returns the (unguided) logits, the queried answer positions
        and their columns in the block, (B, W) each."""
        layout, runtime = self.layout, self.runtime
        wanted = needed(undecided, unwritten, offsets)  # (B, L)
        columns = torch.argsort((~wanted).to(torch.int8), dim=1, stable=True)[:, :width].sort(dim=1).values
        real = wanted.gather(1, columns)  # (B, W)
        queried = offsets.gather(1, columns)  # answer positions, in block order
        positions = layout.model_rows(queried + layout.prompt_length)
        tokens = x.gather(1, positions[:x.shape[0]])
        index = torch.arange(width, device=x.device).expand(positions.shape[0], -1).contiguous()
        mask = layout.model_rows(real)
        if runtime.compiled:  # a read-only pass; the real queries' keys/values stored after it
            logits, entries = runtime.plain_forward(cache, layout.model_rows(tokens), positions, index,
                                                    key_bias, write=False, query_mask=mask, return_entries=True)
            store_entries(cache, positions, entries)
        else:
            logits = runtime.plain_forward(cache, layout.model_rows(tokens), positions, index, key_bias,
                                           write=True, query_mask=mask)
        unwritten.scatter_(1, queried, unwritten.gather(1, queried) & ~real)  # stored now
        return logits, queried, columns

    # --- refreshes of some rows -------------------------------------------------------------------------

    def refresh_rows(self, t: BatchTensors, rows: list[int], answer_only: list[bool],
                     positions: torch.Tensor) -> torch.Tensor:
        """Refresh some rows (a smaller batch, ``refresh_some``) and copy their keys/values into the
        batch's cache; returns their guided logits.

        Rows that keep their prompt (``answer_only``) bring their cached prompt keys/values along and
        query the answer only; the others query everything. Each kind is one pass."""
        subsets = [[i for i, keeps in enumerate(answer_only) if keeps == kind] for kind in (False, True)]
        if not subsets[1]:
            return self.refresh_some(t, rows, positions, answer_only=False)
        if not subsets[0]:
            return self.refresh_some(t, rows, positions, answer_only=True)
        complete = self.refresh_some(t, [rows[i] for i in subsets[0]], positions, answer_only=False)
        logits = complete.new_empty(len(rows), *complete.shape[1:])
        logits[subsets[0]] = complete
        logits[subsets[1]] = self.refresh_some(t, [rows[i] for i in subsets[1]], positions, answer_only=True)
        return logits

    def refresh_some(self, t: BatchTensors, rows: list[int], positions: torch.Tensor,
                     answer_only: bool) -> torch.Tensor:
        """Refresh rows ``rows`` of the batch as a batch of their own; returns their guided logits.

        On graph engines a small pass (rows joining a scheduler's batch, rows moving to their next
        block) is launch-bound: its rows are padded to a power of two with copies of the first row
        and the pass is captured once per padded size (``captured_refresh_rows``)."""
        layout = self.layout
        first = layout.prompt_length if answer_only else 0
        width = self.captured_refresh_rows(len(rows), layout.length - first, t.rows)
        # A copy of a row computes the same bits as the row (rows are independent in every kernel),
        # so writing both into the cache is writing that row once.
        padded = rows + rows[:1] * ((width or len(rows)) - len(rows))
        index = torch.tensor(padded, device=self.runtime.device)
        key_mask = None if t.key_mask is None else t.key_mask.index_select(0, index)
        inputs = [index, positions.index_select(0, index) - first, self.bias(key_mask)]
        logits = self.runtime.replay(("refresh rows", *t.graph_key(layout.prompt_length), len(padded), answer_only,
                                      self.exact), t.cache,
                                     functools.partial(self.refresh_pass, answer_only=answer_only, cache=t.cache),
                                     inputs, state=[t.x, t.unwritten], graph=width is not None)
        return layout.guide(logits)[:len(rows)]

    def captured_refresh_rows(self, rows: int, queries: int, batch: int) -> int | None:
        """Rows of a captured refresh of ``rows`` rows (of a batch of ``batch``) over ``queries``
        positions: ``rows`` rounded up to a power of two (a few shapes to capture per batch), or None
        to run it uncaptured at its own size — without CUDA graphs, and for passes of more than
        ``CAPTURED_REFRESH_FLOPS``."""
        if not self.runtime.cuda_graphs:
            return None
        width = min(1 << (rows - 1).bit_length(), batch)
        tokens = width * queries * (2 if self.layout.guided else 1)
        flops = tokens * self.runtime.model.config.flops_per_token(self.layout.length)
        return width if flops <= CAPTURED_REFRESH_FLOPS else None

    def refresh_pass(self, x: torch.Tensor, unwritten: torch.Tensor, index: torch.Tensor, logits_index: torch.Tensor,
                     key_bias: torch.Tensor | None, *, answer_only: bool, cache: KVCache) -> torch.Tensor:
        """The refresh of rows ``index`` (their logits at ``logits_index``, unguided) in a cache of their
        own, whose entries are then written into the batch's ``cache``. Rows that keep their prompt
        (``answer_only``) bring their cached prompt keys/values along and query the answer only."""
        layout, runtime = self.layout, self.runtime
        model_rows = layout.model_row_index(index, x.shape[0])
        first = layout.prompt_length if answer_only else 0
        tokens = layout.model_rows(x.index_select(0, index)[:, first:])
        # Every entry of this cache is written before it is read: the prompt's copied (answer_only)
        # or recomputed, the answer's recomputed.
        own = KVCache.allocate(runtime.model, tokens.shape[0], layout.length, zeroed=False)
        if answer_only:
            own.copy_rows(cache, model_rows)
        unwritten.index_fill_(0, index, False)  # these rows' keys/values are stored from their tokens now
        queries = torch.arange(first, layout.length, device=x.device).expand(tokens.shape[0], -1)
        logits = runtime.plain_forward(own, tokens, queries, layout.model_rows(logits_index), key_bias,
                                       write=True, exact=self.exact)
        cache.write_rows(own, model_rows)
        return logits
