"""The forward process: mask rates, never-maskable positions, stratified and exact-count masking."""

from __future__ import annotations

import pytest
import torch

from llada.diffusion.masking import mask_exact_count, mask_probability, mask_tokens, stratified_mask_counts


def test_mask_tokens_marks_and_rates() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4000, 50), generator=generator)
    batch = mask_tokens(ids, mask_id=999, generator=generator)
    assert torch.equal(batch.noisy == 999, batch.masked)
    assert torch.equal(batch.noisy[~batch.masked], ids[~batch.masked])
    assert batch.p_mask.min() >= 1e-3 and batch.p_mask.max() <= 1
    assert (batch.p_mask == batch.p_mask[:, :1]).all()  # one t per sequence
    # Marginal masking probability is E[(1-eps)t + eps] = 0.5005; per-row rate tracks its own p_mask.
    assert abs(batch.masked.float().mean().item() - 0.5005) < 0.01
    per_row_error = batch.masked.float().mean(1) - batch.p_mask[:, 0]
    assert per_row_error.abs().mean() < 0.08


def test_unmaskable_positions_are_never_masked() -> None:
    ids = torch.arange(20).repeat(500, 1)
    maskable = torch.arange(20)[None, :].expand(500, -1) >= 7
    batch = mask_tokens(ids, mask_id=-1, maskable=maskable, generator=torch.Generator().manual_seed(1))
    assert not batch.masked[:, :7].any() and batch.masked[:, 7:].any()


def test_mask_probability_floor() -> None:
    assert mask_probability(torch.tensor(0.0)).item() == pytest.approx(1e-3)
    assert mask_probability(torch.tensor(1.0)).item() == 1.0


def test_stratified_counts_cover_range_and_are_uniform() -> None:
    generator = torch.Generator().manual_seed(0)
    length = 7
    counts = torch.cat([stratified_mask_counts(16, length, generator=generator) for _ in range(3000)])
    assert counts.min() == 1 and counts.max() == length
    frequencies = torch.bincount(counts, minlength=length + 1)[1:].float() / counts.numel()
    assert (frequencies - 1 / length).abs().max() < 0.01
    # A batch as large as the answer covers every count exactly once.
    assert sorted(stratified_mask_counts(length, length, generator=generator).tolist()) == list(range(1, length + 1))


def test_exact_count_masks_exactly_and_uniformly() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([1, 3, 6] * 2000)
    masked = mask_exact_count(torch.zeros(6000, 6, dtype=torch.long), counts, mask_id=9, generator=generator)
    assert torch.equal(masked.sum(1), counts)
    position_rate = masked[counts == 3].float().mean(0)
    assert (position_rate - 0.5).abs().max() < 0.05
