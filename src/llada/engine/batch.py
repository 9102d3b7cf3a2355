"""One batch of prompts being decoded by the engine, each row at its own pace: the rows' bookkeeping
and the step loop.

Rows share one KV cache and one forward pass per step, but each row has its own block and its own
step within it: with a confidence threshold a row whose block is decided moves on to its next block
(and refreshes its cache rows) while others are still working on theirs, and a row whose answer is
complete stops. A row can also be dropped between steps (its request was cancelled): it stops at once
and gets no result. Idle rows stay until half the batch is idle; then it shrinks to the smallest of a
few sizes (``row_bucket``) holding the rows still decoding, unless a scheduler holds the slots for
waiting requests (``hold_slots``). An idle slot can take a new prompt (``add``; prefix cache: block 0).

Per step: rows that start a block (or are due a refresh) are refreshed and the other rows take a
cached step (``passes.py``: their block alone, or, with the prefix cache, everything from the block
on: there rows move from block to block together, so that a row's result does not depend on its
batch). The commits are per row (``commits.py``). Greedy block steps of the whole batch run as one
captured graph (``Passes.block_step``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from llada.diffusion.sampling import num_transfer_tokens
from llada.engine.commits import decided_through_end, needed
from llada.engine.layout import BatchLayout, BatchTensors
from llada.engine.passes import Passes
from llada.engine.rows import Rows, row_bucket
from llada.engine.runtime import Runtime
from llada.engine.settings import Generation, GenerationSettings, StepUpdate
from llada.model.kv_cache import KVCache
from llada.model.transformer import left_pad


class BatchRun:
    """One batch of prompts being decoded; ``step()`` advances it by one denoising step."""

    def __init__(self, runtime: Runtime, prompts: Sequence[Sequence[int]] | torch.Tensor,
                 settings: GenerationSettings, generator: torch.Generator | None, prompt_room: int = 0) -> None:
        """``prompt_room``: left-pad prompts to at least this length, so that longer prompts can join later."""
        self.runtime, self.settings, self.generator = runtime, settings, generator
        prompt_ids, prompt_mask = left_pad(prompts, runtime.end_ids[0] if runtime.end_ids else 0, prompt_room)
        batch, prompt_length = prompt_ids.shape
        settings.validate(runtime.model.config.max_sequence_length, prompt_length)
        if settings.early_stop and not runtime.end_ids:
            raise ValueError("early_stop needs eos_token_id (or eot_token_id) in the model config")
        if (settings.logits_eos_inf or settings.confidence_eos_eot_inf) and len(runtime.end_ids) < 2:
            raise ValueError("logits_eos_inf / confidence_eos_eot_inf need eos_token_id and eot_token_id in the config")
        device = runtime.device
        self.layout = layout = BatchLayout(prompt_length, settings.gen_length, settings.block_length, runtime.mask_id,
                                           settings.cfg_scale)
        self.passes = Passes(runtime, layout, settings, generator)
        self.prompt_length, self.gen_length, self.length = prompt_length, settings.gen_length, layout.length
        self.block_length, self.num_blocks = settings.block_length, layout.num_blocks
        x = torch.full((batch, self.length), runtime.mask_id, dtype=torch.long, device=device)
        x[:, :prompt_length] = prompt_ids.to(device)
        undecided = torch.ones(batch, settings.gen_length, dtype=torch.bool, device=device)
        unwritten = torch.zeros(batch, settings.gen_length, dtype=torch.bool, device=device)
        key_mask = None
        if not bool(prompt_mask.all()):
            key_mask = torch.cat([prompt_mask, torch.ones(batch, settings.gen_length, dtype=torch.bool)], 1).to(device)
        self.rows = Rows(batch, settings.gen_length, settings.block_length, runtime.mask_id)
        self.steps_per_block = settings.total_steps // self.num_blocks if settings.policy == "fixed" else None
        # The fixed schedule is the same for every row (each block starts fully masked): host integers.
        self.schedule = None if self.steps_per_block is None else num_transfer_tokens(
            torch.ones(1, self.block_length, dtype=torch.bool), self.steps_per_block)[0].tolist()
        self.steps = 0
        self.max_steps = settings.total_steps if settings.policy == "fixed" else settings.gen_length
        # The threshold and factor policies' numbers as float32 device scalars, as the policies compare
        # float32 confidences with them.
        self._limits = torch.tensor([settings.threshold, settings.factor], dtype=torch.float32, device=device)
        self.t: BatchTensors | None = None
        self._set_rows(x, undecided, unwritten, key_mask)
        self.done = False
        # Keep finished rows' slots instead of shrinking: set by a scheduler whose waiting requests
        # would take them at the next step (shrinking, then growing again, copies the whole cache twice).
        self.hold_slots = False

    # --- the device tensors (None once the batch is done) -----------------------------------------------

    @property
    def cache(self) -> KVCache | None:
        return None if self.t is None else self.t.cache

    @property
    def x(self) -> torch.Tensor | None:
        return None if self.t is None else self.t.x

    @property
    def undecided(self) -> torch.Tensor | None:
        return None if self.t is None else self.t.undecided

    @property
    def unwritten(self) -> torch.Tensor | None:
        return None if self.t is None else self.t.unwritten

    @property
    def guided(self) -> bool:
        return self.layout.guided

    def _set_rows(self, x: torch.Tensor, undecided: torch.Tensor, unwritten: torch.Tensor,
                  key_mask: torch.Tensor | None) -> None:
        """(Re)build what depends on the number of rows: a cache of that size, whose state tensors take
        the tokens ``x`` and the ``undecided`` and ``unwritten`` flags (where captured steps find them),
        and the attention bias."""
        batch = x.shape[0]
        cache = self.runtime.acquire_cache(batch * (2 if self.guided else 1), self.length)
        self.t = BatchTensors(
            cache=cache, x=cache.state_tensor("tokens", x.shape, x.dtype).copy_(x),
            undecided=cache.state_tensor("undecided", undecided.shape, undecided.dtype).copy_(undecided),
            unwritten=cache.state_tensor("unwritten", unwritten.shape, unwritten.dtype).copy_(unwritten),
            offsets=cache.state_tensor("block offsets", (batch, self.block_length), torch.long),
            key_mask=key_mask, key_bias=self.passes.bias(key_mask))
        self._offsets_of: tuple[int, ...] | None = None  # the blocks ``t.offsets`` holds

    def _block_offsets(self) -> torch.Tensor:
        """(B, L) answer positions of each row's current block; idle rows point at the last block,
        which lies within every step's queries (a prefix-cache step queries from the live rows'
        first block on: an idle row left at an earlier block would index before its queries). Rebuilt
        only when a row changes block: a tensor from a host list is a blocking copy."""
        last = self.num_blocks - 1
        blocks = tuple(min(b, last) if active else last for b, active in zip(self.rows.block, self.rows.active))
        if blocks != self._offsets_of:
            self.t.offsets.copy_(torch.tensor(blocks)[:, None] * self.block_length + torch.arange(self.block_length))
            self._offsets_of = blocks
        return self.t.offsets

    def _keeps_prompt(self, row: int) -> bool:
        """Whether row ``row``'s refresh may skip its prompt (``keep_prompt``, and the prompt was encoded:
        every row's first step is a complete refresh)."""
        return self.settings.keep_prompt and (self.rows.block[row] > 0 or self.rows.block_step[row] > 0)

    def _query_start(self, live: list[int]) -> int | None:
        """Prefix cache: the first query position of a block step (the rows' common block); else None."""
        if not self.settings.cache_behaviour.shared_suffix:
            return None
        return self.prompt_length + min(self.rows.block[r] for r in live) * self.block_length

    def _sparse_width(self, live: list[int]) -> int:
        """Queries per row of a ``reuse_decided`` step: the most any live row needs, rounded up to an
        eighth of the block (fewer shapes to capture); the whole block in deterministic mode."""
        if self.runtime.deterministic:
            # The whole block: a row's fresh keys must not depend on how many its batch-mates need
            # (padding queries would shift its real ones within the attention's tiles).
            return self.block_length
        grain = max(1, self.block_length // 8)
        need = max(self.rows.needed[r] for r in live)
        return min(self.block_length, max(grain, -(-need // grain) * grain))

    def _needed_by_schedule(self, live: list[int]) -> list[int]:
        """``reuse_decided`` with the fixed policy: how many positions of each row's block the next step
        must query (those undecided or unwritten), called before ``rows.block_step`` counts this step.

        Every step stores the keys/values of all the positions it had to query and marks the ones it
        commits as unwritten, so the next step needs exactly the positions that were undecided before
        this one — which the fixed schedule tells the host, sparing the step a read-back (the GPU runs
        on while the host prepares the next step)."""
        return [self.block_length - sum(self.schedule[:self.rows.block_step[r]]) if r in live else self.rows.needed[r]
                for r in range(self.t.rows)]

    def _counts(self, live: list[int]) -> int | torch.Tensor:
        """Fixed policy: tokens each row commits this step (an int when all rows agree, as the reference)."""
        if self.schedule is None:
            return 1
        counts = [self.schedule[min(self.rows.block_step[r], len(self.schedule) - 1)] if r in live else 0
                  for r in range(self.t.rows)]
        live_counts = {counts[r] for r in live}  # idle rows have nothing undecided: any count does for them
        return live_counts.pop() if len(live_counts) == 1 else torch.tensor(counts, device=self.runtime.device)

    def _complete(self) -> list[bool]:
        """Per slot, whether its answer is complete (``early_stop``), for steps without ``progress``."""
        if not self.settings.early_stop:
            return [False] * self.t.rows
        return decided_through_end(self.t.x[:, self.prompt_length:], self.t.undecided, self.runtime.end_ids).tolist()

    # --- one step ---------------------------------------------------------------------------------------

    def advance(self) -> bool:
        """Run one denoising step without reporting it; False once every row is finished."""
        if self.done:
            return False
        self._step(report=False)
        return True

    def step(self) -> StepUpdate | None:
        """Run one denoising step and report it (copies the answers to the host); None once finished."""
        return None if self.done else self._step(report=True)

    def _run_passes(self, live: list[int], refresh: list[int], offsets: torch.Tensor, count: int | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's forward pass(es) and commits: ``chosen``, the answer positions it refers to, and
        ``progress`` ((2, B) from a whole captured step; else (1, B), completeness left to ``_complete``)."""
        settings, runtime, passes, t = self.settings, self.runtime, self.passes, self.t
        # Greedy block steps (no random numbers, one count for all rows) run as one CUDA graph from the
        # tokens to the commits: the host only launches it (and, for a threshold, reads ``progress``).
        whole = not refresh and (not runtime.cuda_graphs or (
            runtime.capture_sampling and settings.temperature == 0 and settings.remasking == "low_confidence"
            and isinstance(count, int)))
        unwritten = t.unwritten if settings.reuse_decided else None
        layout = t.graph_key(self.prompt_length)
        if whole:
            # Threshold and factor are inputs of the graph (clients choose them per request); the key
            # holds what the graph bakes in (early_stop too: the step tells which answers are complete).
            baked = replace(settings, threshold=0.0, factor=1.0, steps=None, refresh_every=0, keep_prompt=False)
            key = (*layout, baked, count)
            inputs = [t.key_bias, self._limits]
            if settings.reuse_decided:
                width = self._sparse_width(live)
                step = functools.partial(passes.sparse_block_step, count=count, width=width, cache=t.cache)
                return runtime.replay(("sparse block step", *key, width), t.cache, step, inputs,
                                      state=[t.x, t.undecided, t.unwritten, offsets])
            start = self._query_start(live)
            step = functools.partial(passes.block_step, count=count, start=start, cache=t.cache)
            chosen, progress = runtime.replay(("block step", *key, start), t.cache, step, inputs,
                                              state=[t.x, t.undecided, offsets])
            return chosen, offsets, progress
        if settings.reuse_decided and not refresh:  # sampling apart from the (captured) forward pass
            width = self._sparse_width(live)
            logits, queried, columns = runtime.replay(
                ("sparse block pass", *layout, self.guided, width), t.cache,
                functools.partial(passes.sparse_logits, width=width, cache=t.cache), [t.key_bias],
                state=[t.x, t.undecided, t.unwritten, offsets])
            chosen, pending = passes.commit(self.layout.guide(logits), t.x, t.undecided, queried, self._limits, count,
                                            unwritten, columns)
            return chosen, queried, pending[None]
        logits = passes.logits(t, offsets, live, refresh, [self._keeps_prompt(r) for r in refresh],
                               self._query_start(live))
        chosen, pending = passes.commit(logits, t.x, t.undecided, offsets, self._limits, count, unwritten)
        return chosen, offsets, pending[None]

    @torch.no_grad()
    def _step(self, report: bool) -> StepUpdate | None:
        """One step; the ``StepUpdate`` only when ``report`` (it costs device-to-host copies)."""
        settings = self.settings
        self._shrink_if_idle(self.rows.live())  # rows left idle while their slots were held
        batch = self.t.rows
        live = self.rows.live()
        offsets = self._block_offsets()  # (B, L) answer positions
        refresh = [r for r in live if settings.cache_behaviour.exact or self.rows.block_step[r] == 0
                   or (settings.refresh_every and self.rows.block_step[r] % settings.refresh_every == 0)]
        with self.runtime.numerics():
            chosen, committed_at, progress = self._run_passes(live, refresh, offsets, self._counts(live))
        flags: list[list[int]] | None = None  # ``progress`` read back, when needed
        if settings.reuse_decided and self.schedule is not None:
            self.rows.needed = self._needed_by_schedule(live)  # known on the host: no read-back
        elif settings.reuse_decided:  # one read-back for the policy and for the next step's queries
            wanted = needed(self.t.undecided, self.t.unwritten, offsets).sum(1)
            *flags, self.rows.needed = torch.cat([progress.long(), wanted[None]]).tolist()
        answer = self.t.x[:, self.prompt_length:]
        self.steps += 1
        self.rows.stepped(live)
        decided = None
        if report:
            slots = [r for r in range(batch) if self.rows.ids[r] is not None]
            callers = [self.rows.ids[r] for r in slots]
            decided = torch.zeros(self.rows.answers.shape, dtype=torch.bool)
            decided[callers] = torch.zeros(batch, self.gen_length, dtype=torch.bool).scatter_(
                1, committed_at.cpu(), chosen.cpu())[slots]
            self.rows.answers[callers] = answer.cpu()[slots]
        if self.steps_per_block is not None:
            block_done = [r for r in live if self.rows.block_step[r] == self.steps_per_block]
        else:
            if flags is None:
                flags = progress.tolist()  # the policy's one host synchronisation
            block_done = [r for r in live if not flags[0][r]]
            if settings.cache_behaviour.shared_suffix and len(block_done) < len(live):
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
        return StepUpdate(self.steps, self.rows.blocks_now(self.num_blocks), self.rows.answers.clone(), decided,
                          list(self.rows.finished))

    # --- finishing ---------------------------------------------------------------------------------------

    def _finish_blocks(self, rows: list[int], complete: list[bool]) -> None:
        """Move rows to their next block; rows at the last block's end, or (``early_stop``) whose
        answer is ``complete`` (per slot, from the step's ``progress``), finish."""
        self.rows.next_block(rows)
        done = [r for r in rows if self.rows.block[r] == self.num_blocks or complete[r]]
        if not done:
            return
        # Finished rows: fill what is left with end-of-text, hand them back, and leave them idle
        # (masked writes over the whole batch: a few kernels however many rows finish).
        answer = self.x[:, self.prompt_length:]
        finishing = torch.zeros(self.x.shape[0], 1, dtype=torch.bool)
        finishing[done] = True
        finishing = finishing.to(self.runtime.device)
        if self.runtime.end_ids:
            answer.masked_fill_(self.undecided & finishing, self.runtime.end_ids[0])
        self.undecided.masked_fill_(finishing, False)
        self.unwritten.masked_fill_(finishing, False)
        self.rows.finish(done, answer.cpu()[done])
        self._settle()

    def _settle(self) -> None:
        """After rows went idle: end the batch when none is decoding, else ``_shrink_if_idle``."""
        live = self.rows.live()
        if not live:
            self.done = True
            self._release()
        else:
            self._shrink_if_idle(live)

    def _shrink_if_idle(self, live: list[int]) -> None:
        """Once half of the batch is idle (unless ``hold_slots``; also checked before every step), shrink it
        to the ``live`` rows, and on graph engines idle ones filling it to ``row_bucket`` slots (fewer)."""
        batch = self.x.shape[0]
        if not self.hold_slots and len(live) < batch and len(live) <= math.ceil(batch / 2):
            size = row_bucket(len(live)) if self.runtime.cuda_graphs else len(live)
            self._keep_rows(sorted(live + self.rows.free()[:size - len(live)]))

    def _keep_rows(self, rows: list[int]) -> None:
        keep = torch.tensor(rows, device=self.runtime.device)
        old, model_rows = self.cache, self.layout.model_row_index(keep, self.t.rows)
        key_mask = None if self.t.key_mask is None else self.t.key_mask.index_select(0, keep)
        self.rows.keep(rows)
        self._set_rows(self.x.index_select(0, keep), self.undecided.index_select(0, keep),
                       self.unwritten.index_select(0, keep), key_mask)
        self.cache.copy_rows(old, model_rows)
        self.runtime.release_cache(old)

    # --- joining ----------------------------------------------------------------------------------

    def can_add(self, prompt: Sequence[int], settings: GenerationSettings) -> bool:
        """Whether a new prompt can join this batch: same settings, no private generator, prompt fits,
        and, with the prefix cache, every row still in its first block (prefix-cache steps query from
        the rows' earliest block on: a row joining at block 0 would have the others' decided blocks
        recomputed, changing their answers)."""
        return (not self.done and settings == self.settings and self.generator is None
                and 0 < len(prompt) <= self.prompt_length
                and (not settings.cache_behaviour.shared_suffix or all(self.rows.block[r] == 0 for r in self.rows.live())))

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
        free = self.rows.free()
        if len(free) < len(prompts):
            self._grow(self.x.shape[0] + len(prompts) - len(free))
            free = self.rows.free()
        device, count = self.runtime.device, len(prompts)
        padded, mask = left_pad(list(prompts), self.runtime.end_ids[0] if self.runtime.end_ids else 0,
                                 width=self.prompt_length)
        # The new rows are built on the host and written with one copy per tensor: a server adds
        # requests between steps, and per-slot writes would be a dozen small kernels per request.
        slots = free[:count]
        index = torch.tensor(slots, device=device)
        rows = torch.full((count, self.length), self.runtime.mask_id, dtype=torch.long)
        rows[:, :self.prompt_length] = padded
        self.x.index_copy_(0, index, rows.to(device))
        self.undecided.index_fill_(0, index, True)
        self.unwritten.index_fill_(0, index, False)
        if self.t.key_mask is None and not bool(mask.all()):
            self.t.key_mask = torch.ones(self.x.shape, dtype=torch.bool, device=device)
        if self.t.key_mask is not None:
            keep = torch.ones(count, self.length, dtype=torch.bool)
            keep[:, :self.prompt_length] = mask
            self.t.key_mask.index_copy_(0, index, keep.to(device))
        callers = self.rows.join(slots)
        self.t.key_bias = self.passes.bias(self.t.key_mask)
        return callers

    def _grow(self, rows: int) -> None:
        """Make room for at least ``rows`` rows: the next power of two, new rows empty."""
        old_batch, new_batch = self.x.shape[0], 1 << (rows - 1).bit_length()
        extra = new_batch - old_batch
        device = self.runtime.device
        x = torch.cat([self.x, torch.full((extra, self.length), self.runtime.mask_id, device=device)])
        undecided = torch.cat([self.undecided, torch.zeros(extra, self.gen_length, dtype=torch.bool, device=device)])
        unwritten = torch.cat([self.unwritten, torch.zeros(extra, self.gen_length, dtype=torch.bool, device=device)])
        key_mask = self.t.key_mask
        if key_mask is not None:
            key_mask = torch.cat([key_mask, torch.ones(extra, self.length, dtype=torch.bool, device=device)])
        self.rows.grow(extra)
        old = self.cache
        self._set_rows(x, undecided, unwritten, key_mask)
        halves = 2 if self.guided else 1  # with guidance the unconditional rows follow the conditional ones
        for half in range(halves):
            self.cache.entries[:, :, half * new_batch:half * new_batch + old_batch] = \
                old.entries[:, :, half * old_batch:(half + 1) * old_batch]
        self.runtime.release_cache(old)

    # --- leaving ----------------------------------------------------------------------------------

    def drop(self, row: int) -> None:
        """Stop decoding row ``row`` (caller's order) now, e.g. because its request was cancelled.

        Its slot goes idle like a finished row's: later steps neither refresh it nor commit tokens to
        it, the batch shrinks once half of it is idle (and ends when no row is left decoding), and
        ``add`` may give the slot to a new prompt. The other rows decode exactly as before. The row
        gets no result (``result(row)`` raises). Dropping a finished or an already dropped row, or a
        row of a cancelled batch, changes nothing.
        """
        if not 0 <= row < self.rows.callers:
            raise IndexError(f"row {row} is not in this batch (it has rows 0 to {self.rows.callers - 1})")
        if self.rows.finished[row] or self.rows.dropped[row] or self.done:
            return
        slot = self.rows.drop(row)  # an empty slot, as after ``_grow``
        self.undecided[slot] = False  # idle rows have nothing undecided: no step commits to them
        self.unwritten[slot] = False
        self._settle()

    def cancel(self) -> None:
        """Stop decoding (e.g. the client went away) and give the cache back to the engine."""
        if self.t is not None:
            self._release()
        self.done = True

    def _release(self) -> None:
        """Give the cache back to the engine, with the state tensors that held this batch's tokens (the
        next batch to take the cache overwrites them: nothing here may read them again)."""
        self.runtime.release_cache(self.t.cache)
        self.t = None

    # --- results ----------------------------------------------------------------------------------

    def result(self, row: int) -> Generation:
        """Row ``row``'s result (caller's order) once it has finished; rows may finish before the batch.

        Raises:
            RuntimeError: the row is still decoding, or it was dropped (it has no result).
        """
        return self.rows.result(row, self.runtime.end_ids)

    def results(self) -> list[Generation]:
        """Every row's result, in the caller's order (once ``step()`` has returned None; none may be dropped)."""
        if not self.done:
            raise RuntimeError("the batch is still decoding; call step() until it returns None")
        return [self.result(row) for row in range(self.rows.callers)]
