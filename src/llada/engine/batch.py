"""One batch of prompts being decoded by the engine, each row at its own pace.

Rows share one KV cache and one forward pass per step, but each row has its own block and its own
step within it: with a confidence threshold a row whose block is decided moves on to its next block
(and refreshes its cache rows) while others are still working on theirs, and a row whose answer is
complete stops. A row can also be dropped between steps (its request was cancelled): it stops at once
and gets no result. Finished and dropped rows stay in the batch, idle, until half of it is idle; then
the batch shrinks to the rows still decoding (a smaller shape, captured once more as a CUDA graph),
unless a scheduler holds the slots for waiting requests (``hold_slots``). Until then a new prompt can
take an idle row's slot (``add``; with the prefix cache only while every row is in its first block).

Per step: rows that start a block (or are due a refresh) are refreshed — all together when they are
all rows, otherwise as a smaller batch (on GPUs padded to a power of two and captured, when short)
whose cache rows are copied in —
and the other rows take a cached step (their block alone, or, with the prefix cache, everything from
the block on: there rows move from block to block together, so that a row's result does not depend
on its batch). The commits are per row: ``decoding.propose`` and ``decoding.select`` over each row's
own block. Greedy block steps of the whole batch run as one captured graph (``_block_step``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from llada.diffusion.sampling import num_transfer_tokens
from llada.engine.decoding import propose, select
from llada.engine.engine import Engine, Generation, GenerationSettings, StepUpdate
from llada.model.kv_cache import KVCache, store_entries
from llada.model.transformer import attention_bias

# Refreshes of some rows of a batch of at most this many matmul FLOPs (after padding) are captured as
# CUDA graphs; larger ones run uncaptured at their own size. 2 TFLOP take about 3 ms on an H100,
# about as long as launching an uncaptured pass's kernels: below it a pass is launch-bound (the demo
# model's: ~0.05 TFLOP for 32 rows), above it the GPU hides the launches and padding would cost real
# work (the 8B model's 768-token row: 12 TFLOP), and its graphs would hold GBs of scratch cache.
CAPTURED_REFRESH_FLOPS = 2e12


class BatchRun:
    """One batch of prompts being decoded; ``step()`` advances it by one denoising step."""

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]] | torch.Tensor,
                 settings: GenerationSettings, generator: torch.Generator | None, prompt_room: int = 0) -> None:
        """``prompt_room``: left-pad prompts to at least this length, so that longer prompts can join later."""
        self.engine, self.settings, self.generator = engine, settings, generator
        prompt_ids, prompt_mask = left_pad(prompts, engine.end_ids[0] if engine.end_ids else 0, prompt_room)
        batch, prompt_length = prompt_ids.shape
        settings.validate(engine.model.config.max_sequence_length, prompt_length)
        if settings.early_stop and not engine.end_ids:
            raise ValueError("early_stop needs eos_token_id (or eot_token_id) in the model config")
        if (settings.logits_eos_inf or settings.confidence_eos_eot_inf) and len(engine.end_ids) < 2:
            raise ValueError("logits_eos_inf / confidence_eos_eot_inf need eos_token_id and eot_token_id in the config")
        device = engine.device
        self.prompt_length, self.gen_length = prompt_length, settings.gen_length
        self.length = prompt_length + settings.gen_length
        self.block_length = settings.block_length
        self.num_blocks = settings.gen_length // settings.block_length
        x = torch.full((batch, self.length), engine.mask_id, dtype=torch.long, device=device)
        x[:, :prompt_length] = prompt_ids.to(device)
        # Decided-ness is tracked apart from the tokens: a model may propose the mask id itself.
        undecided = torch.ones(batch, settings.gen_length, dtype=torch.bool, device=device)
        # reuse_decided: decided positions whose keys/values in the cache were computed before their
        # decision (a block step stores them once more), and per row (host) how many positions of its
        # block the next step must query: the undecided ones and these.
        unwritten = torch.zeros(batch, settings.gen_length, dtype=torch.bool, device=device)
        self._needed = [settings.block_length] * batch
        self.key_mask = None  # (B, T) real tokens, or None when nothing is padded
        if not bool(prompt_mask.all()):
            self.key_mask = torch.cat([prompt_mask, torch.ones(batch, settings.gen_length, dtype=torch.bool)],
                                      1).to(device)
        # Per current row (host lists): caller's row index (None: an empty slot), block, step within the
        # block, still decoding.
        self.row_ids: list[int | None] = list(range(batch))
        self.row_block = [0] * batch
        self.row_block_step = [0] * batch
        self.active = [True] * batch
        # Per caller row.
        self.finished = [False] * batch
        self.dropped = [False] * batch  # stopped before finishing (``drop``): no result
        self.answers = torch.full((batch, settings.gen_length), engine.mask_id, dtype=torch.long)
        self.row_steps = [0] * batch
        self.steps_per_block = settings.total_steps // self.num_blocks if settings.policy == "fixed" else None
        # The fixed schedule is the same for every row (each block starts fully masked): host integers.
        self.schedule = None if self.steps_per_block is None else num_transfer_tokens(
            torch.ones(1, self.block_length, dtype=torch.bool), self.steps_per_block)[0].tolist()
        self.steps = 0
        self.max_steps = settings.total_steps if settings.policy == "fixed" else settings.gen_length
        self.cache: KVCache | None = None
        # Index tensors reused across steps: building one from a host list is a blocking copy (the host
        # would wait for the GPU at every step), so the rows' block offsets are rebuilt only when a row
        # changes block.
        self._everything = torch.arange(self.length, device=device)
        self._block_columns = torch.arange(self.block_length, device=device)
        # The threshold and factor policies' numbers as float32 device scalars, as the policies compare
        # float32 confidences with them.
        self._limits = torch.tensor([settings.threshold, settings.factor], dtype=torch.float32, device=device)
        self._set_rows(x, undecided, unwritten)
        self.done = False
        # Keep finished rows' slots instead of shrinking: set by a scheduler whose waiting requests
        # would take them at the next step (shrinking, then growing again, copies the whole cache twice).
        self.hold_slots = False

    def _block_offsets(self) -> torch.Tensor:
        """(B, L) answer positions of each row's current block; idle rows point at the last block,
        which lies within every step's queries (a prefix-cache step queries from the live rows'
        first block on: an idle row left at an earlier block would index before its queries)."""
        last = self.num_blocks - 1
        blocks = tuple(min(b, last) if active else last for b, active in zip(self.row_block, self.active))
        if blocks != self._offsets_of:
            self._offsets.copy_(torch.tensor(blocks)[:, None] * self.block_length + torch.arange(self.block_length))
            self._offsets_of = blocks
        return self._offsets

    # --- rows -------------------------------------------------------------------------------------

    @property
    def guided(self) -> bool:
        return self.settings.cfg_scale > 0

    def _set_rows(self, x: torch.Tensor, undecided: torch.Tensor, unwritten: torch.Tensor) -> None:
        """(Re)build what depends on the number of rows: cache, attention bias; the tokens ``x`` and the
        ``undecided`` and ``unwritten`` flags move into the cache's state tensors (where captured steps
        find them)."""
        batch = x.shape[0]
        self.cache = self.engine.acquire_cache(batch * (2 if self.guided else 1), self.length)
        self.x = self.cache.state_tensor("tokens", x.shape, x.dtype).copy_(x)
        self.undecided = self.cache.state_tensor("undecided", undecided.shape, undecided.dtype).copy_(undecided)
        self.unwritten = self.cache.state_tensor("unwritten", unwritten.shape, unwritten.dtype).copy_(unwritten)
        self._offsets = self.cache.state_tensor("block offsets", (batch, self.block_length), torch.long)
        self._offsets_of: tuple[int, ...] | None = None  # the blocks ``_offsets`` holds
        self.key_bias = self._bias(self.key_mask)

    def _bias(self, key_mask: torch.Tensor | None) -> torch.Tensor | None:
        if key_mask is not None and self.guided:
            key_mask = torch.cat([key_mask, key_mask])
        return attention_bias(key_mask, self.length, False, self.engine.model.dtype, self.engine.device)

    def _model_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows as the model sees them: with guidance, the unconditional copies (prompt masked) follow."""
        if not self.guided:
            return tokens
        unconditional = tokens.clone()
        if tokens.shape[1] == self.length:
            unconditional[:, :self.prompt_length] = self.engine.mask_id
        return torch.cat([tokens, unconditional])

    def _live(self) -> list[int]:
        """The rows still decoding (the others are idle slots)."""
        return [r for r in range(self.x.shape[0]) if self.active[r]]

    def _model_row_index(self, rows: torch.Tensor) -> torch.Tensor:
        """The model's rows of batch rows ``rows``: with guidance, their unconditional copies follow."""
        return torch.cat([rows, rows + self.x.shape[0]]) if self.guided else rows

    # --- one step ---------------------------------------------------------------------------------

    def _layout(self) -> tuple:
        """What every captured pass of this batch bakes in: its cache, shapes and prompt length."""
        return (id(self.cache), self.x.shape, self.undecided.shape, self.prompt_length,
                None if self.key_bias is None else self.key_bias.shape)

    def _keeps_prompt(self, row: int) -> bool:
        """Whether row ``row``'s refresh may skip its prompt (``keep_prompt``, and the prompt was encoded:
        every row's first step is a complete refresh)."""
        return self.settings.keep_prompt and (self.row_block[row] > 0 or self.row_block_step[row] > 0)

    def _logits(self, offsets: torch.Tensor, live: list[int], refresh: list[int]) -> torch.Tensor:
        """Logits (B, block_length, V) at each row's block (``offsets``: answer positions, (B, L))."""
        engine = self.engine
        batch = self.x.shape[0]
        positions = offsets + self.prompt_length  # (B, L)
        everything = self._everything
        answer_only = [self._keeps_prompt(r) for r in refresh]
        if refresh == live and len(set(answer_only)) == 1:
            # Every decoding row refreshes, all of the same kind: one pass over the whole batch (idle rows too).
            start = self.prompt_length if answer_only[0] else 0
            self.unwritten.zero_()  # every row's keys/values are stored from its tokens now
            tokens = self._model_rows(self.x[:, start:])
            logits = engine.forward(self.cache, tokens, everything[start:].expand(tokens.shape[0], -1),
                                    self._model_rows(positions - start), self.key_bias, write=True,
                                    exact=self.settings.cache == "none")
            return self._guide(logits)
        if refresh == live:  # every decoding row refreshes, of both kinds: no block step is needed
            fresh = self._refresh_rows(refresh, positions)
            logits = fresh.new_zeros(batch, *fresh.shape[1:])  # idle rows: nothing to decide
            logits[refresh] = fresh
            return logits
        if self.settings.reuse_decided:  # the whole block, storing what a reuse_decided step would
            logits, _, _ = self._sparse_logits(self.x, self.undecided, self.unwritten, offsets, self.key_bias,
                                               self.block_length)
            logits = self._guide(logits)
        else:
            query, index = self._block_query(positions, self._query_start(live), self._everything, self._block_columns)
            tokens = self._model_rows(self.x.gather(1, query))
            # Eagerly, writing the queries into the cache and using fused SDPA is fastest; compiled, a
            # read-only step avoids copying the cache (see kv_cache.cached_forward).
            logits = engine.forward(self.cache, tokens, self._model_rows(query), self._model_rows(index),
                                    self.key_bias, write=not engine.compiled)
            logits = self._guide(logits.clone() if refresh else logits)
        if refresh:
            logits[refresh] = self._refresh_rows(refresh, positions)
        return logits

    def _query_start(self, live: list[int]) -> int | None:
        """Prefix cache: the first query position of a block step (the rows' common block); else None."""
        if self.settings.cache != "prefix":
            return None
        return self.prompt_length + min(self.row_block[r] for r in live) * self.block_length

    def _block_query(self, positions: torch.Tensor, start: int | None, everything: torch.Tensor,
                     block_columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A block step's query positions (B, Q) and the columns of the blocks among them (B, L):
        the block alone, or (``start``: prefix cache) everything from ``start`` on."""
        batch = positions.shape[0]
        # Contiguous: compiled passes specialise on strides, and the graph-captured forward pass gets
        # contiguous copies of its inputs; expanded ones here would compile a second variant.
        if start is None:
            return positions, block_columns.expand(batch, -1).contiguous()
        return everything[start:].expand(batch, -1).contiguous(), positions - start

    def _block_step(self, x: torch.Tensor, undecided: torch.Tensor, offsets: torch.Tensor,
                    key_bias: torch.Tensor | None, limits: torch.Tensor, count: int | torch.Tensor,
                    start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole block step of every row, from the tokens to the commits: ``chosen`` (B, N), the
        positions committed, and the rows' ``progress`` (2, B).

        It reads and writes only its arguments, the model and the cache (no tensor of this run), so
        that one CUDA graph of it serves every batch of this shape and settings that holds the cache.
        """
        positions = offsets + self.prompt_length
        everything = torch.arange(self.length, device=x.device)
        query, index = self._block_query(positions, start, everything, everything[:self.block_length])
        tokens = self._model_rows(x.gather(1, query))
        logits = self.engine.plain_forward(self.cache, tokens, self._model_rows(query), self._model_rows(index),
                                           key_bias, write=not self.engine.compiled)
        chosen, pending = self._commit(self._guide(logits), x, undecided, offsets, limits, count)
        return chosen, self._progress(x, undecided, pending)

    def _progress(self, x: torch.Tensor, undecided: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        """(2, B) bool: ``[0]`` the rows with undecided positions left in their block (``pending``),
        ``[1]`` the rows whose answer is complete (``_decided_through_end``; all False without
        ``early_stop``). Captured steps compute both inside their CUDA graph, so that the host reads
        one small tensor per step instead of running a dozen small kernels and a second read-back
        when rows finish their block; other steps leave completeness to ``_complete``."""
        complete = (_decided_through_end(x[:, self.prompt_length:], undecided, self.engine.end_ids)
                    if self.settings.early_stop else torch.zeros_like(pending))
        return torch.stack([pending, complete])

    def _complete(self) -> list[bool]:
        """Per slot, whether its answer is complete (``early_stop``), for steps without ``_progress``."""
        if not self.settings.early_stop:
            return [False] * self.x.shape[0]
        return _decided_through_end(self.x[:, self.prompt_length:], self.undecided, self.engine.end_ids).tolist()

    def _sparse_block_step(self, x: torch.Tensor, undecided: torch.Tensor, unwritten: torch.Tensor,
                           offsets: torch.Tensor, key_bias: torch.Tensor | None, limits: torch.Tensor,
                           count: int | torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_block_step`` of ``reuse_decided``: each row queries ``width`` positions of its block, first
        those still undecided or unwritten, then (padding) others, which keep their cached keys/values.

        Returns ``chosen`` (B, W), the queried answer positions (B, W) and the rows' ``progress`` (2, B).
        """
        logits, queried, columns = self._sparse_logits(x, undecided, unwritten, offsets, key_bias, width)
        chosen, pending = self._commit(self._guide(logits), x, undecided, queried, limits, count, unwritten, columns)
        return chosen, queried, self._progress(x, undecided, pending)

    def _sparse_logits(self, x: torch.Tensor, undecided: torch.Tensor, unwritten: torch.Tensor, offsets: torch.Tensor,
                       key_bias: torch.Tensor | None, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward pass of a ``reuse_decided`` block step over ``width`` positions per row (padded
        as in ``_sparse_block_step``): stores the keys/values of the positions it had to query and
        clears their ``unwritten`` flags. Returns the (unguided) logits, the queried answer positions
        and their columns in the block, (B, W) each."""
        needed = _needed(undecided, unwritten, offsets)  # (B, L)
        columns = torch.argsort((~needed).to(torch.int8), dim=1, stable=True)[:, :width].sort(dim=1).values
        real = needed.gather(1, columns)  # (B, W)
        queried = offsets.gather(1, columns)  # answer positions, in block order
        positions = self._model_rows(queried + self.prompt_length)
        tokens = x.gather(1, positions[:x.shape[0]])
        index = torch.arange(width, device=x.device).expand(positions.shape[0], -1).contiguous()
        mask = self._model_rows(real)
        engine = self.engine
        if engine.compiled:  # a read-only pass; the real queries' keys/values stored after it
            logits, entries = engine.plain_forward(self.cache, self._model_rows(tokens), positions, index,
                                                   key_bias, write=False, query_mask=mask, return_entries=True)
            store_entries(self.cache, positions, entries)
        else:
            logits = engine.plain_forward(self.cache, self._model_rows(tokens), positions, index, key_bias,
                                          write=True, query_mask=mask)
        unwritten.scatter_(1, queried, unwritten.gather(1, queried) & ~real)  # stored now
        return logits, queried, columns

    def _sparse_width(self, live: list[int]) -> int:
        """Queries per row of a ``reuse_decided`` step: the most any live row needs, rounded up to an
        eighth of the block (fewer shapes to capture)."""
        grain = max(1, self.block_length // 8)
        need = max(self._needed[r] for r in live)
        return min(self.block_length, max(grain, -(-need // grain) * grain))

    def _commit(self, logits: torch.Tensor, x: torch.Tensor, undecided: torch.Tensor, offsets: torch.Tensor,
                limits: torch.Tensor, count: int | torch.Tensor, unwritten: torch.Tensor | None = None,
                columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose this step's tokens at ``offsets`` (B, N: each row's block, or, with their ``columns``
        in the block, the part of it a step queried) and write them into ``x`` and ``undecided`` (and
        mark them in ``unwritten``).

        ``limits``: the policy's threshold and factor, as on the device (``_limits``). Returns
        ``chosen`` (B, N), the positions committed, and ``pending`` (B,), rows with undecided
        positions left among ``offsets``."""
        settings, engine = self.settings, self.engine
        answer = x[:, self.prompt_length:]  # a view: scattering into it writes x
        current = answer.gather(1, offsets)
        masked = undecided.gather(1, offsets)  # idle rows have nothing undecided
        forbid = (engine.end_ids[0],) if settings.logits_eos_inf else ()
        demote = engine.end_ids[:2] if settings.confidence_eos_eot_inf else ()
        proposals, confidence = propose(logits, settings.temperature, settings.remasking, self.generator,
                                        exact_confidence=settings.policy == "fixed", forbid=forbid, demote=demote,
                                        never=(engine.mask_id,))
        if columns is None:
            chosen = select(confidence, masked, settings.policy, count, limits[0], limits[1])
        else:  # choose over the whole block, as without reuse_decided: top-k breaks ties by position and width
            block = (masked.shape[0], self.block_length)
            chosen = select(confidence.new_zeros(block).scatter_(1, columns, confidence),
                            masked.new_zeros(block).scatter_(1, columns, masked), settings.policy, count,
                            limits[0], limits[1]).gather(1, columns)
        answer.scatter_(1, offsets, torch.where(chosen, proposals, current))
        still_masked = masked & ~chosen
        undecided.scatter_(1, offsets, still_masked)
        if unwritten is not None:  # their cached keys/values were computed from the mask
            unwritten.scatter_(1, offsets, unwritten.gather(1, offsets) | chosen)
        return chosen, still_masked.any(1)

    def _refresh_rows(self, rows: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Refresh some rows (a smaller batch, ``_refresh_some``) and copy their keys/values into the
        batch's cache.

        Rows that keep their prompt (``keep_prompt``) bring their cached prompt keys/values along and
        query the answer only; the others query everything. Each kind is one pass."""
        subsets = [[i for i, r in enumerate(rows) if self._keeps_prompt(r) == answer_only] for answer_only in (False, True)]
        if not subsets[1]:
            return self._refresh_some(rows, positions, answer_only=False)
        if not subsets[0]:
            return self._refresh_some(rows, positions, answer_only=True)
        complete = self._refresh_some([rows[i] for i in subsets[0]], positions, answer_only=False)
        logits = complete.new_empty(len(rows), *complete.shape[1:])
        logits[subsets[0]] = complete
        logits[subsets[1]] = self._refresh_some([rows[i] for i in subsets[1]], positions, answer_only=True)
        return logits

    def _refresh_some(self, rows: list[int], positions: torch.Tensor, answer_only: bool) -> torch.Tensor:
        """Refresh rows ``rows`` of the batch as a batch of their own; returns their guided logits.

        On graph engines a small pass (rows joining a scheduler's batch, rows moving to their next
        block) is launch-bound: its rows are padded to a power of two with copies of the first row
        and the pass is captured once per padded size (``_captured_refresh_rows``)."""
        start = self.prompt_length if answer_only else 0
        width = self._captured_refresh_rows(len(rows), self.length - start)
        # A copy of a row computes the same bits as the row (rows are independent in every kernel),
        # so writing both into the cache is writing that row once.
        padded = rows + rows[:1] * ((width or len(rows)) - len(rows))
        index = torch.tensor(padded, device=self.engine.device)
        key_mask = None if self.key_mask is None else self.key_mask.index_select(0, index)
        inputs = [index, positions.index_select(0, index) - start, self._bias(key_mask)]
        logits = self.engine.replay(("refresh rows", *self._layout(), len(padded), answer_only,
                                     self.settings.cache == "none"), self.cache,
                                    functools.partial(self._refresh_pass, answer_only=answer_only), inputs,
                                    state=[self.x, self.unwritten], graph=width is not None)
        return self._guide(logits)[:len(rows)]

    def _captured_refresh_rows(self, rows: int, queries: int) -> int | None:
        """Rows of a captured refresh of ``rows`` rows over ``queries`` positions: ``rows`` rounded up
        to a power of two (a few shapes to capture per batch), or None to run it uncaptured at its own
        size — without CUDA graphs, and for passes of more than ``CAPTURED_REFRESH_FLOPS``."""
        if not self.engine.cuda_graphs:
            return None
        width = min(1 << (rows - 1).bit_length(), self.x.shape[0])
        tokens = width * queries * (2 if self.guided else 1)
        flops = tokens * self.engine.model.config.flops_per_token(self.length)
        return width if flops <= CAPTURED_REFRESH_FLOPS else None

    def _refresh_pass(self, x: torch.Tensor, unwritten: torch.Tensor, index: torch.Tensor, logits_index: torch.Tensor,
                      key_bias: torch.Tensor | None, answer_only: bool) -> torch.Tensor:
        """The refresh of rows ``index`` (their logits at ``logits_index``, unguided) in a cache of their
        own, whose entries are then written into the batch's cache. Rows that keep their prompt
        (``answer_only``) bring their cached prompt keys/values along and query the answer only.
        Like ``_block_step`` it touches only its arguments, the model and the cache (capturable)."""
        model_rows = self._model_row_index(index)
        start = self.prompt_length if answer_only else 0
        tokens = self._model_rows(x.index_select(0, index)[:, start:])
        # Every entry of this cache is written before it is read: the prompt's copied (answer_only)
        # or recomputed, the answer's recomputed.
        cache = KVCache.allocate(self.engine.model, tokens.shape[0], self.length, zeroed=False)
        if answer_only:
            cache.copy_rows(self.cache, model_rows)
        unwritten.index_fill_(0, index, False)  # these rows' keys/values are stored from their tokens now
        queries = torch.arange(start, self.length, device=x.device).expand(tokens.shape[0], -1)
        logits = self.engine.plain_forward(cache, tokens, queries, self._model_rows(logits_index), key_bias,
                                           write=True, exact=self.settings.cache == "none")
        self.cache.write_rows(cache, model_rows)
        return logits

    def _guide(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return logits
        conditional, unconditional = logits.chunk(2)
        return unconditional + (self.settings.cfg_scale + 1) * (conditional - unconditional)

    def advance(self) -> bool:
        """Run one denoising step without reporting it; False once every row is finished."""
        if self.done:
            return False
        self._step(report=False)
        return True

    def step(self) -> StepUpdate | None:
        """Run one denoising step and report it (copies the answers to the host); None once finished."""
        return None if self.done else self._step(report=True)

    @torch.no_grad()
    def _step(self, report: bool) -> StepUpdate | None:
        """One step; the ``StepUpdate`` only when ``report`` (it costs device-to-host copies)."""
        settings, engine = self.settings, self.engine
        self._shrink_if_idle(self._live())  # rows left idle while their slots were held
        batch = self.x.shape[0]
        live = self._live()
        offsets = self._block_offsets()  # (B, L) answer positions
        refresh = [r for r in live if settings.cache == "none" or self.row_block_step[r] == 0
                   or (settings.refresh_every and self.row_block_step[r] % settings.refresh_every == 0)]
        count = self._counts(live)
        # Greedy block steps (no random numbers, one count for all rows) run as one CUDA graph from the
        # tokens to the commits: the host only launches it (and, for a threshold, reads ``progress``).
        whole = not refresh and (not engine.cuda_graphs or (
            engine.capture_sampling and settings.temperature == 0 and settings.remasking == "low_confidence"
            and isinstance(count, int)))
        unwritten = self.unwritten if settings.reuse_decided else None
        committed_at = offsets  # the answer positions ``chosen`` refers to
        layout = self._layout()
        if whole:
            # Threshold and factor are inputs of the graph (clients choose them per request); the key
            # holds what the graph bakes in (early_stop too: the step tells which answers are complete).
            baked = replace(settings, threshold=0.0, factor=1.0, steps=None, refresh_every=0, keep_prompt=False)
            key = (*layout, baked, count)
            inputs = [self.key_bias, self._limits]
            if settings.reuse_decided:
                width = self._sparse_width(live)
                step = functools.partial(self._sparse_block_step, count=count, width=width)
                chosen, committed_at, progress = engine.replay(("sparse block step", *key, width), self.cache, step,
                                                               inputs, state=[self.x, self.undecided, self.unwritten,
                                                                              offsets])
            else:
                start = self._query_start(live)
                step = functools.partial(self._block_step, count=count, start=start)
                chosen, progress = engine.replay(("block step", *key, start), self.cache, step, inputs,
                                                 state=[self.x, self.undecided, offsets])
        elif settings.reuse_decided and not refresh:  # sampling apart from the (captured) forward pass
            width = self._sparse_width(live)
            logits, committed_at, columns = engine.replay(
                ("sparse block pass", *layout, self.guided, width), self.cache, functools.partial(self._sparse_logits, width=width), [self.key_bias],
                state=[self.x, self.undecided, self.unwritten, offsets])
            chosen, pending = self._commit(self._guide(logits), self.x, self.undecided, committed_at, self._limits,
                                           count, unwritten, columns)
            progress = pending[None]  # completeness left to ``_complete``
        else:
            chosen, pending = self._commit(self._logits(offsets, live, refresh), self.x, self.undecided, offsets,
                                           self._limits, count, unwritten)
            progress = pending[None]
        flags: list[list[int]] | None = None  # ``progress`` read back, when needed
        if settings.reuse_decided and self.schedule is not None:
            self._needed = self._needed_by_schedule(live)  # known on the host: no read-back
        elif settings.reuse_decided:  # one read-back for the policy and for the next step's queries
            needed = _needed(self.undecided, self.unwritten, offsets).sum(1)
            *flags, self._needed = torch.cat([progress.long(), needed[None]]).tolist()
        answer = self.x[:, self.prompt_length:]
        self.steps += 1
        for r in live:
            self.row_block_step[r] += 1
            self.row_steps[self.row_ids[r]] += 1
        decided = None
        if report:
            slots = [r for r in range(batch) if self.row_ids[r] is not None]
            callers = [self.row_ids[r] for r in slots]
            decided = torch.zeros(self.answers.shape, dtype=torch.bool)
            decided[callers] = torch.zeros(batch, self.gen_length, dtype=torch.bool).scatter_(
                1, committed_at.cpu(), chosen.cpu())[slots]
            self.answers[callers] = answer.cpu()[slots]
        if self.steps_per_block is not None:
            block_done = [r for r in live if self.row_block_step[r] == self.steps_per_block]
        else:
            if flags is None:
                flags = progress.tolist()  # the policy's one host synchronisation
            block_done = [r for r in live if not flags[0][r]]
            if settings.cache == "prefix" and len(block_done) < len(live):
                # The prefix cache keeps rows in step: its query starts at one block for all rows,
                # so a row that moved ahead would see its own blocks recomputed (batch-dependent).
                block_done = []
        if block_done:
            if progress.shape[0] == 1:
                complete = self._complete()
            else:  # the fixed policy reads back only when a block ends
                complete = flags[1] if flags is not None else progress[1].tolist()
            self._finish_blocks(block_done, complete)
        if not report:
            return None
        blocks_now = [self.num_blocks] * len(self.finished)
        for r, caller in enumerate(self.row_ids):
            if caller is not None and not self.finished[caller]:
                blocks_now[caller] = self.row_block[r]
        return StepUpdate(self.steps, blocks_now, self.answers.clone(), decided, list(self.finished))

    def _needed_by_schedule(self, live: list[int]) -> list[int]:
        """``reuse_decided`` with the fixed policy: how many positions of each row's block the next step
        must query (those undecided or unwritten), called before ``row_block_step`` counts this step.

        Every step stores the keys/values of all the positions it had to query and marks the ones it
        commits as unwritten, so the next step needs exactly the positions that were undecided before
        this one — which the fixed schedule tells the host, sparing the step a read-back (the GPU runs
        on while the host prepares the next step)."""
        return [self.block_length - sum(self.schedule[:self.row_block_step[r]]) if r in live else self._needed[r]
                for r in range(self.x.shape[0])]

    def _counts(self, live: list[int]) -> int | torch.Tensor:
        """Fixed policy: tokens each row commits this step (an int when all rows agree, as the reference)."""
        if self.schedule is None:
            return 1
        counts = [self.schedule[min(self.row_block_step[r], len(self.schedule) - 1)] if r in live else 0
                  for r in range(self.x.shape[0])]
        live_counts = {counts[r] for r in live}  # idle rows have nothing undecided: any count does for them
        return live_counts.pop() if len(live_counts) == 1 else torch.tensor(counts, device=self.engine.device)

    def _finish_blocks(self, rows: list[int], complete: list[bool]) -> None:
        """Move rows to their next block; rows at the last block's end, or (``early_stop``) whose
        answer is ``complete`` (per slot, from the step's ``progress``), finish."""
        for r in rows:
            self.row_block[r] += 1
            self.row_block_step[r] = 0
        done = [r for r in rows if self.row_block[r] == self.num_blocks or complete[r]]
        if not done:
            return
        # Finished rows: fill what is left with end-of-text, hand them back, and leave them idle
        # (masked writes over the whole batch: a few kernels however many rows finish).
        answer = self.x[:, self.prompt_length:]
        finishing = torch.zeros(self.x.shape[0], 1, dtype=torch.bool)
        finishing[done] = True
        finishing = finishing.to(self.engine.device)
        if self.engine.end_ids:
            answer.masked_fill_(self.undecided & finishing, self.engine.end_ids[0])
        self.undecided.masked_fill_(finishing, False)
        self.unwritten.masked_fill_(finishing, False)
        callers = [self.row_ids[r] for r in done]
        self.answers[callers] = answer.cpu()[done]
        for r, caller in zip(done, callers):
            self.finished[caller] = True
            self.active[r] = False
        self._settle()

    def _settle(self) -> None:
        """After rows went idle: end the batch when none is decoding, else ``_shrink_if_idle``."""
        live = self._live()
        if not live:
            self.done = True
            self._release()
        else:
            self._shrink_if_idle(live)

    def _shrink_if_idle(self, live: list[int]) -> None:
        """Shrink the batch to its ``live`` rows once half of it is idle, unless ``hold_slots``. Also run
        before every step: rows that went idle while the slots were held are let go once they are not."""
        batch = self.x.shape[0]
        if not self.hold_slots and len(live) < batch and len(live) <= math.ceil(batch / 2):
            self._keep_rows(live)

    def _keep_rows(self, rows: list[int]) -> None:
        keep = torch.tensor(rows, device=self.engine.device)
        old, model_rows = self.cache, self._model_row_index(keep)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, keep)
        self.row_ids = [self.row_ids[r] for r in rows]
        self.row_block = [self.row_block[r] for r in rows]
        self.row_block_step = [self.row_block_step[r] for r in rows]
        self.active = [True] * len(rows)
        self._needed = [self._needed[r] for r in rows]
        self._set_rows(self.x.index_select(0, keep), self.undecided.index_select(0, keep),
                       self.unwritten.index_select(0, keep))
        self.cache.copy_rows(old, model_rows)
        self.engine.release_cache(old)

    # --- joining ----------------------------------------------------------------------------------

    def can_add(self, prompt: Sequence[int], settings: GenerationSettings) -> bool:
        """Whether a new prompt can join this batch: same settings, no private generator, prompt fits,
        and, with the prefix cache, every row still in its first block (prefix-cache steps query from
        the rows' earliest block on: a row joining at block 0 would have the others' decided blocks
        recomputed, changing their answers)."""
        return (not self.done and settings == self.settings and self.generator is None
                and 0 < len(prompt) <= self.prompt_length
                and (settings.cache != "prefix" or all(self.row_block[r] == 0 for r in self._live())))

    @torch.no_grad()
    def add(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """Add prompts to the running batch (continuous batching); returns their row numbers.

        They take empty slots (rows that finished or were dropped) or, if there are too few, the batch
        grows to the next power of two (a new shape, captured once). Each new row starts at its first
        block with a refresh of its own cache rows; nothing changes for the rows already decoding.
        """
        for prompt in prompts:
            if not self.can_add(prompt, self.settings):
                raise ValueError(f"a prompt of {len(prompt)} tokens cannot join this batch (prompt room "
                                 f"{self.prompt_length}; or the batch is done, or its prefix-cache rows have left "
                                 f"their first block)")
        free = [r for r in range(self.x.shape[0]) if not self.active[r]]
        if len(free) < len(prompts):
            self._grow(self.x.shape[0] + len(prompts) - len(free))
            free = [r for r in range(self.x.shape[0]) if not self.active[r]]
        device, count = self.engine.device, len(prompts)
        padded, mask = left_pad(list(prompts), self.engine.end_ids[0] if self.engine.end_ids else 0,
                                 width=self.prompt_length)
        # The new rows are built on the host and written with one copy per tensor: a server adds
        # requests between steps, and per-slot writes would be a dozen small kernels per request.
        slots = free[:count]
        index = torch.tensor(slots, device=device)
        rows = torch.full((count, self.length), self.engine.mask_id, dtype=torch.long)
        rows[:, :self.prompt_length] = padded
        self.x.index_copy_(0, index, rows.to(device))
        self.undecided.index_fill_(0, index, True)
        self.unwritten.index_fill_(0, index, False)
        if self.key_mask is None and not bool(mask.all()):
            self.key_mask = torch.ones(self.x.shape, dtype=torch.bool, device=device)
        if self.key_mask is not None:
            keep = torch.ones(count, self.length, dtype=torch.bool)
            keep[:, :self.prompt_length] = mask
            self.key_mask.index_copy_(0, index, keep.to(device))
        callers = list(range(len(self.finished), len(self.finished) + count))
        self.finished += [False] * count
        self.row_steps += [0] * count
        self.dropped += [False] * count
        self.answers = torch.cat([self.answers, torch.full((count, self.gen_length), self.engine.mask_id)])
        for slot, caller in zip(slots, callers, strict=True):
            self._needed[slot] = self.block_length
            self.row_ids[slot], self.row_block[slot], self.row_block_step[slot] = caller, 0, 0
            self.active[slot] = True
        self.key_bias = self._bias(self.key_mask)
        return callers

    def _grow(self, rows: int) -> None:
        """Make room for at least ``rows`` rows: the next power of two, new rows empty."""
        old_batch, new_batch = self.x.shape[0], 1 << (rows - 1).bit_length()
        extra = new_batch - old_batch
        device = self.engine.device
        x = torch.cat([self.x, torch.full((extra, self.length), self.engine.mask_id, device=device)])
        undecided = torch.cat([self.undecided, torch.zeros(extra, self.gen_length, dtype=torch.bool, device=device)])
        unwritten = torch.cat([self.unwritten, torch.zeros(extra, self.gen_length, dtype=torch.bool, device=device)])
        self._needed += [self.block_length] * extra
        if self.key_mask is not None:
            self.key_mask = torch.cat([self.key_mask, torch.ones(extra, self.length, dtype=torch.bool, device=device)])
        self.row_ids += [None] * extra
        self.row_block += [0] * extra
        self.row_block_step += [0] * extra
        self.active += [False] * extra
        old = self.cache
        self._set_rows(x, undecided, unwritten)
        halves = 2 if self.guided else 1  # with guidance the unconditional rows follow the conditional ones
        for half in range(halves):
            self.cache.entries[:, :, half * new_batch:half * new_batch + old_batch] = \
                old.entries[:, :, half * old_batch:(half + 1) * old_batch]
        self.engine.release_cache(old)

    # --- leaving ----------------------------------------------------------------------------------

    def drop(self, row: int) -> None:
        """Stop decoding row ``row`` (caller's order) now, e.g. because its request was cancelled.

        Its slot goes idle like a finished row's: later steps neither refresh it nor commit tokens to
        it, the batch shrinks once half of it is idle (and ends when no row is left decoding), and
        ``add`` may give the slot to a new prompt. The other rows decode exactly as before. The row
        gets no result (``result(row)`` raises). Dropping a finished or an already dropped row, or a
        row of a cancelled batch, changes nothing.
        """
        if not 0 <= row < len(self.finished):
            raise IndexError(f"row {row} is not in this batch (it has rows 0 to {len(self.finished) - 1})")
        if self.finished[row] or self.dropped[row] or self.done:
            return
        self.dropped[row] = True
        slot = self.row_ids.index(row)
        self.row_ids[slot] = None  # an empty slot, as after ``_grow``
        self.active[slot] = False
        self.undecided[slot] = False  # idle rows have nothing undecided: no step commits to them
        self.unwritten[slot] = False
        self._settle()

    def cancel(self) -> None:
        """Stop decoding (e.g. the client went away) and give the cache back to the engine."""
        if self.cache is not None:
            self._release()
        self.done = True

    def _release(self) -> None:
        """Give the cache back to the engine, with the state tensors that held this batch's tokens (the
        next batch to take the cache overwrites them: nothing here may read them again)."""
        self.engine.release_cache(self.cache)
        self.cache = self.x = self.undecided = self.unwritten = self._offsets = None

    # --- results ----------------------------------------------------------------------------------

    def result(self, row: int) -> Generation:
        """Row ``row``'s result (caller's order) once it has finished; rows may finish before the batch.

        Raises:
            RuntimeError: the row is still decoding, or it was dropped (it has no result).
        """
        if self.dropped[row]:
            raise RuntimeError(f"row {row} was dropped before it finished (BatchRun.drop): it has no result")
        if not self.finished[row]:
            raise RuntimeError(f"row {row} is still decoding")
        ids = self.answers[row].tolist()
        end = next((i for i, token in enumerate(ids) if token in self.engine.end_ids), None)
        return Generation(answer=self.answers[row].clone(), tokens=ids if end is None else ids[:end + 1],
                          steps=self.row_steps[row], finish_reason="length" if end is None else "stop")

    def results(self) -> list[Generation]:
        """Every row's result, in the caller's order (once ``step()`` has returned None; none may be dropped)."""
        if not self.done:
            raise RuntimeError("the batch is still decoding; call step() until it returns None")
        return [self.result(row) for row in range(len(self.finished))]


def _decided_through_end(answer: torch.Tensor, undecided: torch.Tensor, end_ids: tuple[int, ...]) -> torch.Tensor:
    """(B,) rows whose answer holds an end-of-text token with every position before it decided.

    Such an answer is final: decoding ends at the first end-of-text token, and tokens once committed
    are never changed, so nothing left to decode can alter the text before it. ``end_ids`` holds at
    least one id (``early_stop`` is refused for models without one).
    """
    is_end = answer == end_ids[0]
    for token in end_ids[1:]:
        is_end |= answer == token
    settled = undecided.cumsum(1) == 0  # the positions before the first undecided one
    return (is_end & settled).any(1)


def left_pad(prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int,
              width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and the (B, P) bool mask of real tokens; P is at least ``width``."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be (batch, length), got shape {tuple(prompts.shape)}")
        if prompts.shape[1] >= width:
            return prompts.long().cpu(), torch.ones(prompts.shape, dtype=torch.bool)
        prompts = prompts.tolist()
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(width, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = True
    return ids, mask


def _needed(undecided: torch.Tensor, unwritten: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Which answer positions at ``offsets`` (B, L) a ``reuse_decided`` step must query: those still
    undecided, and those decided since their keys/values were last stored (``unwritten``)."""
    return (undecided | unwritten).gather(1, offsets)
