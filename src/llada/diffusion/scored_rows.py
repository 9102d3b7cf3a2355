"""Losses that are functions of sums of token log-probabilities, trained without logits.

DPO over ELBO estimates is a function of per-answer sums, and diffu-GRPO a function of per-token
log-probabilities. Neither is a plain weighted sum of cross-entropies, so the fused output projection
(``fused_loss``, which computes a sum's gradient in its forward pass and never keeps a logits tensor)
cannot give its gradient directly. It can in two passes:

1. score every group under ``torch.no_grad`` (``weighted_nll`` per group, chunked, no logits kept);
2. with the scores s known, the loss f(s) and its slopes ∂f/∂s follow by autograd on s alone, and
   the model's gradient is that of the plain weighted sum Σ_g (∂f/∂s_g) · s_g, which the fused
   projection computes in a second, differentiable pass over the same rows.

The value returned is f(s) exactly and its gradient is ∇f; the price is one extra forward pass.
The two passes must see the same function: with dropout in the model they see different masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoredRows:
    """Rows to score, and how their positions add up into groups.

    The score of group g is Σ weights[r, t] · log p(targets[r, t] | ids[r]) over the positions with
    ``groups[r, t] == g`` (positions with weight 0 are skipped, whatever their group).
    """

    ids: torch.Tensor  # (R, T) model input
    targets: torch.Tensor  # (R, T) tokens to score
    weights: torch.Tensor  # (R, T) float64
    groups: torch.Tensor  # (R, T) long, in [0, count)
    count: int  # number of groups
    attention: torch.Tensor | None = None  # (R, T) real-token mask, None when no row is padded

    def _weighted_nll(self, model: torch.nn.Module, weights: torch.Tensor, grouped: bool) -> torch.Tensor:
        return model(self.ids, attention_mask=self.attention, targets=self.targets, target_weights=weights,
                     target_groups=self.groups if grouped else None, target_group_count=self.count).weighted_nll

    @torch.no_grad()
    def scores(self, model: torch.nn.Module) -> torch.Tensor:
        """(count,) group scores (weighted log-probability sums), without gradients."""
        return -self._weighted_nll(model, self.weights, grouped=True)

    def loss(self, model: torch.nn.Module, function: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``function(scores)`` (a scalar) with the model's gradient when gradients are on, and the
        scores (detached)."""
        scores = self.scores(model)
        if not torch.is_grad_enabled():
            return function(scores), scores
        leaf = scores.detach().requires_grad_()
        value = function(leaf)
        (slopes,) = torch.autograd.grad(value, leaf)
        # Σ_g slope_g · score_g = -Σ_positions slope_group · weight · CE: a plain sum, fused.
        surrogate = self._weighted_nll(model, -slopes.double()[self.groups] * self.weights, grouped=False)
        return value.detach() + (surrogate - surrogate.detach()).to(value.dtype), scores
