"""Training objectives as pure functions of (model, batch): pretraining, SFT and the autoregressive baseline.

Each follows the paper (Nie et al. 2025, Sec. 2.2 / 2.3 and Algorithms 1-2) and returns a ``Loss``
with the scalar to back-propagate and counts for logging. Optimisers, schedules and data loading live
in the trainer, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llada.diffusion.masking import DEFAULT_EPS, mask_tokens

# Anything called like the model: (input_ids, causal=..., targets=..., target_weights=...) -> output with
# .weighted_nll (see LLaDAModel.forward).
MaskPredictor = Callable[..., object]

RANDOM_LENGTH_PROBABILITY = 0.01  # share of pretraining batches cut to a random length (paper, Sec. 2.2)


@dataclass
class Loss:
    """A loss value with what it was computed from."""

    value: torch.Tensor  # scalar, differentiable
    n_masked: torch.Tensor  # scalar: number of positions that contributed
    n_tokens: int  # positions in the batch (B·L after any truncation)
    metrics: dict[str, float] = field(default_factory=dict)  # what else to log (a preference loss's accuracy)


def _weighted_nll(model: MaskPredictor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  causal: bool = False) -> torch.Tensor:
    """Σ weights · cross-entropy(model(inputs) logits, targets), in (at least) float32.

    The model computes it (``targets=`` / ``target_weights=``) so that only weighted positions go
    through the output projection and no (B, L, V) logits tensor is ever built.
    """
    return model(inputs, causal=causal, targets=targets, target_weights=weights).weighted_nll


def random_truncation(input_ids: torch.Tensor, probability: float = RANDOM_LENGTH_PROBABILITY,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """With ``probability``, cut the batch to a length drawn uniformly from {1..L} (paper: 1% of batches)

    so that the model also sees sequences shorter than the training context.
    """
    length = input_ids.shape[1]
    device = generator.device if generator is not None else None
    draw = torch.rand((), generator=generator, device=device)
    new_length = int(torch.randint(1, length + 1, (), generator=generator, device=device))
    return input_ids[:, :new_length] if float(draw) < probability else input_ids


def pretrain_loss(model: MaskPredictor, input_ids: torch.Tensor, mask_id: int, eps: float = DEFAULT_EPS,
                  generator: torch.Generator | None = None) -> Loss:
    """Masked diffusion pretraining loss (Eq. 3): -1/(B·L) Σ_masked log p(x0_i | x_t) / p_mask.

    Args:
        model: the mask predictor.
        input_ids: (B, L) clean tokens; apply ``random_truncation`` beforehand if wanted.
        mask_id: the [MASK] token id.
        eps: floor of the mask probability.
        generator: randomness of t and the masks (on ``input_ids``' device).
    """
    batch = mask_tokens(input_ids, mask_id, eps=eps, generator=generator)
    weights = batch.masked / batch.p_mask.double()  # float64: exact 1/p for float64 models
    total = _weighted_nll(model, batch.noisy, input_ids, weights)
    return Loss(value=total / input_ids.numel(), n_masked=batch.masked.sum(), n_tokens=input_ids.numel())


def answer_positions(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions after each row's prompt (its answer and EOS padding)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    return positions >= prompt_lengths.to(input_ids.device)[:, None]


def sft_loss(model: MaskPredictor, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, mask_id: int,
             eps: float = DEFAULT_EPS, generator: torch.Generator | None = None) -> Loss:
    """Supervised fine-tuning loss (Eq. 5): the prompt is never masked; the answer (with its EOS
    padding, which the model must learn to emit) is masked as in pretraining, and each sample's loss
    is divided by its answer length before averaging over the batch.

    Multi-turn dialogues are turned into one (history, reply) sample per assistant turn by the data
    pipeline (``chat.dialogue_to_pairs``), as the paper does.

    Args:
        input_ids: (B, L) prompt followed by answer and EOS padding.
        prompt_lengths: (B,) number of prompt tokens at the start of each row.
    """
    batch_size = input_ids.shape[0]
    if prompt_lengths.shape != (batch_size,):
        raise ValueError(f"prompt_lengths must have shape ({batch_size},), got {tuple(prompt_lengths.shape)}")
    answer = answer_positions(input_ids, prompt_lengths)  # (B, L)
    answer_lengths = answer.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    batch = mask_tokens(input_ids, mask_id, eps=eps, maskable=answer, generator=generator)
    weights = batch.masked / (batch.p_mask.double() * answer_lengths)
    value = _weighted_nll(model, batch.noisy, input_ids, weights) / batch_size
    return Loss(value=value, n_masked=batch.masked.sum(), n_tokens=input_ids.numel())


def autoregressive_loss(model: MaskPredictor, input_ids: torch.Tensor,
                        loss_mask: torch.Tensor | None = None) -> Loss:
    """Next-token cross-entropy with the same network run causally: the paper's AR baseline.

    Args:
        input_ids: (B, L) tokens.
        loss_mask: optional (B, L) bool marking the tokens to predict (e.g. SFT answers); position
            i is predicted from positions < i.
    """
    # Position i predicts token i+1; the last position predicts nothing (weight 0).
    targets = torch.roll(input_ids, -1, dims=1)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else torch.roll(loss_mask.bool(), -1, 1)
    keep[:, -1] = False
    total = _weighted_nll(model, input_ids, targets, keep.float(), causal=True)
    n_predicted = keep.sum()
    return Loss(value=total / n_predicted.clamp(min=1), n_masked=n_predicted, n_tokens=input_ids.numel())
