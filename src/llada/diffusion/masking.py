"""The forward (noising) process of masked diffusion: how clean tokens become [MASK].

Two schemes appear in the paper and are kept apart here:
- training: every token is masked independently with probability p_mask = (1 - eps)·t + eps, t ~ U(0, 1);
- likelihood evaluation: exactly l of the L answer tokens are masked, l ~ U{1..L} (lower variance).

Pure functions on tensors; every random draw takes an explicit ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EPS = 1e-3


@dataclass
class MaskedBatch:
    """A noised batch: the model input, which positions were masked, and their mask probability."""

    noisy: torch.Tensor  # (B, L) token ids with [MASK] at masked positions
    masked: torch.Tensor  # (B, L) bool
    p_mask: torch.Tensor  # (B, L) probability each position had of being masked (Eq. 3's weight 1/t)


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """p_mask = (1 - eps)·t + eps: keeps the loss weight 1/p_mask finite when t is near 0."""
    return (1 - eps) * t + eps


def mask_tokens(input_ids: torch.Tensor, mask_id: int, eps: float = DEFAULT_EPS,
                maskable: torch.Tensor | None = None, generator: torch.Generator | None = None) -> MaskedBatch:
    """Training forward process: one t per sequence, each maskable token masked independently.

    Args:
        input_ids: (B, L) clean tokens x0.
        mask_id: the [MASK] token id.
        eps: floor of the mask probability.
        maskable: optional (B, L) bool; False positions (an SFT prompt) are never masked.
        generator: source of randomness, for reproducible runs.
    Returns:
        MaskedBatch with p_mask broadcast to (B, L).
    """
    batch, length = input_ids.shape
    t = torch.rand(batch, device=input_ids.device, generator=generator)  # (B,)
    p_mask = mask_probability(t, eps)[:, None].expand(batch, length)  # (B, L)
    masked = torch.rand(batch, length, device=input_ids.device, generator=generator) < p_mask
    if maskable is not None:
        masked &= maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return MaskedBatch(noisy=noisy, masked=masked, p_mask=p_mask)


def stratified_mask_counts(batch: int, length: int, device: torch.device | str = "cpu",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """How many of ``length`` tokens to mask in each of ``batch`` samples, l ∈ {1..length}.

    Stratified like the official evaluation code: evenly spaced counts shifted by one uniform offset
    and wrapped around, so a mini-batch covers the whole range of l instead of clustering. The
    spacing is rounded *before* the offset is added: the official code rounds after, and because
    ``torch.round`` rounds halves to even, its counts are then not exactly uniform (a small bias).
    Here every count is marginally uniform on {1..length}, which keeps the estimator unbiased.
    """
    if length < 1:
        raise ValueError("cannot mask an empty answer (length 0)")
    start = torch.randint(1, length + 1, (), device=device, generator=generator)
    spacing = torch.round(torch.linspace(0, (batch - 1) * (length / batch), batch, device=device)).long()
    return (spacing + start - 1) % length + 1  # (B,)


def mask_exact_count(target: torch.Tensor, counts: torch.Tensor, mask_id: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask exactly ``counts[b]`` uniformly chosen positions of each row of ``target`` (B, T).

    Returns the (B, T) bool mask; the caller applies it (it also needs it for the loss).
    """
    batch, length = target.shape
    scores = torch.rand(batch, length, device=target.device, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per row
    return ranks < counts[:, None].to(target.device)
