"""A batch's host bookkeeping against a plain model of it: slots and callers' rows through joins,
growth, shrinking, drops and finishes, and the results read back."""

from __future__ import annotations

import pytest
import torch

from llada.engine.rows import Rows, row_bucket

MASK, END = 99, 7


def test_rows_follow_their_callers_through_slot_changes() -> None:
    rows = Rows(batch=3, gen_length=4, block_length=2, mask_id=MASK)
    assert rows.live() == [0, 1, 2] and rows.free() == [] and rows.callers == 3
    rows.stepped([0, 1, 2])
    rows.next_block([1])
    rows.finish([1], torch.tensor([[5, END, MASK, MASK]]))
    slot = rows.drop(2)
    assert (slot, rows.ids, rows.live(), rows.free()) == (2, [0, 1, None], [0], [1, 2])
    rows.grow(1)  # a fourth, empty slot
    assert rows.ids == [0, 1, None, None] and rows.needed == [2, 2, 2, 2]
    callers = rows.join([1, 2, 3])
    assert callers == [3, 4, 5] and rows.ids == [0, 3, 4, 5] and rows.block == [0, 0, 0, 0]
    rows.stepped([0, 1])
    rows.keep([1, 0])  # shrink, in that order
    assert rows.ids == [3, 0] and rows.block_step == [1, 2] and rows.active == [True, True]
    assert rows.blocks_now(num_blocks=2) == [0, 2, 2, 0, 2, 2]  # finished and dropped rows count as done
    result = rows.result(1, end_ids=(END,))
    assert result.tokens == [5, END] and result.finish_reason == "stop" and result.steps == 1
    with pytest.raises(RuntimeError, match="dropped"):
        rows.result(2, end_ids=(END,))
    with pytest.raises(RuntimeError, match="still decoding"):
        rows.result(0, end_ids=(END,))
    assert rows.steps == [2, 1, 1, 1, 0, 0]


def test_a_shrink_keeps_idle_slots_idle_and_free_to_join() -> None:
    """A batch shrinking to a bucket keeps some idle slots beside the live ones: they stay idle (not
    stepped, not decoding) and free for a joining row, and their finished rows keep their results."""
    rows = Rows(batch=4, gen_length=4, block_length=2, mask_id=MASK)
    rows.finish([1, 3], torch.tensor([[5, END, MASK, MASK], [6, END, MASK, MASK]]))
    rows.keep([0, 1, 2])
    assert rows.ids == [0, 1, 2] and rows.live() == [0, 2] and rows.free() == [1]
    assert rows.result(1, end_ids=(END,)).tokens == [5, END]
    assert rows.join(rows.free()) == [4] and rows.ids == [0, 4, 2] and rows.live() == [0, 1, 2]


def test_row_buckets_are_the_smallest_power_of_two_or_three_times_one_that_holds_the_rows() -> None:
    sizes = sorted({m << k for m in (1, 3) for k in range(12)})
    for rows in range(1, 1025):
        assert row_bucket(rows) == min(size for size in sizes if size >= rows)
        assert row_bucket(rows) < 1.5 * rows or rows == 1  # at most half as many idle rows again
    with pytest.raises(ValueError, match="at least one row"):
        row_bucket(0)
