"""The host-side bookkeeping of a batch: its slots (the rows of its tensors) and its callers' rows.

A caller's row keeps its number for the life of the batch; the slot it occupies changes when the
batch shrinks or grows, and a finished or dropped row's slot can be taken by a new caller's row. All
of it lives in Python lists, so that a step decides what to run without reading the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llada.engine.settings import Generation


def row_bucket(rows: int) -> int:
    """The number of slots a shrinking batch keeps for ``rows`` rows still decoding: the smallest power
    of two, or three times one (1, 2, 3, 4, 6, 8, 12, 16, 24, ...), that holds them.

    Every row count is a new shape, and a new shape costs a CUDA graph capture, far more than a
    replay. Rows end when their answers do, so a batch shrinking to exactly its live rows meets a
    shape it has not seen at almost every shrink (rollouts of 256 short answers captured one or two
    graphs per batch long after warm-up). On these sizes the shapes repeat from batch to batch, at
    the cost of computing idle rows (whose results are not used) while the batch is small: less
    than a third of the slots, at most half again as many rows as are live. So only engines that
    capture graphs keep them; elsewhere the idle rows would cost without saving anything. The same
    sizes hold for deterministic engines: a row's answer there does not depend on its batch, so
    keeping idle rows changes no answer.
    """
    if rows < 1:
        raise ValueError(f"a batch keeps at least one row, got {rows}")
    power = 1 << (rows - 1).bit_length()  # the smallest power of two >= rows
    return power * 3 // 4 if power >= 4 and power * 3 // 4 >= rows else power


class Rows:
    """Per slot: the caller's row in it (None: empty), its block, its step in that block, whether it
    is decoding, and (``reuse_decided``) how many positions of its block the next step must query.
    Per caller's row: finished, dropped, its answer so far (on the host) and the steps it took."""

    def __init__(self, batch: int, gen_length: int, block_length: int, mask_id: int) -> None:
        self.block_length, self.mask_id = block_length, mask_id
        self.ids: list[int | None] = list(range(batch))
        self.block = [0] * batch
        self.block_step = [0] * batch
        self.active = [True] * batch
        self.needed = [block_length] * batch
        self.finished = [False] * batch
        self.dropped = [False] * batch  # stopped before finishing (``BatchRun.drop``): no result
        self.answers = torch.full((batch, gen_length), mask_id, dtype=torch.long)
        self.steps = [0] * batch

    @property
    def slots(self) -> int:
        return len(self.ids)

    @property
    def callers(self) -> int:
        return len(self.finished)

    def live(self) -> list[int]:
        """The slots still decoding (the others are idle)."""
        return [slot for slot in range(self.slots) if self.active[slot]]

    def free(self) -> list[int]:
        """The idle slots, which joining rows may take."""
        return [slot for slot in range(self.slots) if not self.active[slot]]

    def keep(self, slots: Sequence[int]) -> None:
        """The batch shrank to ``slots`` (live or idle), in that order."""
        self.ids = [self.ids[s] for s in slots]
        self.block = [self.block[s] for s in slots]
        self.block_step = [self.block_step[s] for s in slots]
        self.needed = [self.needed[s] for s in slots]
        self.active = [self.active[s] for s in slots]

    def grow(self, extra: int) -> None:
        """The batch grew by ``extra`` empty slots."""
        self.ids += [None] * extra
        self.block += [0] * extra
        self.block_step += [0] * extra
        self.needed += [self.block_length] * extra
        self.active += [False] * extra

    def join(self, slots: Sequence[int]) -> list[int]:
        """New callers' rows take ``slots``, each at its first block; returns their numbers."""
        callers = list(range(self.callers, self.callers + len(slots)))
        self.finished += [False] * len(slots)
        self.dropped += [False] * len(slots)
        self.steps += [0] * len(slots)
        self.answers = torch.cat([self.answers, torch.full((len(slots), self.answers.shape[1]), self.mask_id)])
        for slot, caller in zip(slots, callers, strict=True):
            self.ids[slot], self.block[slot], self.block_step[slot] = caller, 0, 0
            self.needed[slot] = self.block_length
            self.active[slot] = True
        return callers

    def stepped(self, live: Sequence[int]) -> None:
        """The ``live`` slots took one more step."""
        for slot in live:
            self.block_step[slot] += 1
            self.steps[self.ids[slot]] += 1

    def next_block(self, slots: Sequence[int]) -> None:
        """``slots`` decided their block and move to the next one."""
        for slot in slots:
            self.block[slot] += 1
            self.block_step[slot] = 0

    def finish(self, slots: Sequence[int], answers: torch.Tensor) -> None:
        """``slots`` finished with ``answers`` (one host row each); they go idle."""
        callers = [self.ids[s] for s in slots]
        self.answers[callers] = answers
        for slot, caller in zip(slots, callers):
            self.finished[caller] = True
            self.active[slot] = False

    def drop(self, caller: int) -> int:
        """Caller's row ``caller`` stops without a result; returns the slot it left (now empty)."""
        self.dropped[caller] = True
        slot = self.ids.index(caller)
        self.ids[slot] = None
        self.active[slot] = False
        return slot

    def blocks_now(self, num_blocks: int) -> list[int]:
        """Each caller's block being decoded (``num_blocks`` once it is finished or dropped)."""
        blocks = [num_blocks] * self.callers
        for slot, caller in enumerate(self.ids):
            if caller is not None and not self.finished[caller]:
                blocks[caller] = self.block[slot]
        return blocks

    def result(self, caller: int, end_ids: tuple[int, ...]) -> Generation:
        """Caller's row ``caller``'s result once it has finished (see ``BatchRun.result``)."""
        if self.dropped[caller]:
            raise RuntimeError(f"row {caller} was dropped before it finished (BatchRun.drop): it has no result")
        if not self.finished[caller]:
            raise RuntimeError(f"row {caller} is still decoding")
        ids = self.answers[caller].tolist()
        end = next((i for i, token in enumerate(ids) if token in end_ids), None)
        return Generation(answer=self.answers[caller].clone(), tokens=ids if end is None else ids[:end + 1],
                          steps=self.steps[caller], finish_reason="length" if end is None else "stop")
