"""RL with verifiable rewards for masked diffusion models: diffu-GRPO (d1, Zhao et al. 2025).

GRPO samples a group of G completions per prompt, scores each with a reward, and pushes up the
log-probability of completions that beat their group's mean. An autoregressive model has exact
per-token log-probabilities; a diffusion model does not, so diffu-GRPO estimates them in one forward
pass: the whole completion masked, and each prompt token masked with probability p (0.15 in d1). The
log-probability of completion token k is the log-softmax at position k of the token sampled there.
The random prompt mask acts as a regulariser; a fresh one is drawn for each of the μ inner updates
per batch of rollouts. The current, old (rollout-time) and reference policies are all scored under
the same mask.

Per completion token, with ratio ρ = π / π_old and advantage A of its completion:

    loss = -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A) + β KL,
    KL = π_ref / π - log(π_ref / π) - 1   (the k3 estimator, ≥ 0, unbiased for KL(π || π_ref)),

averaged over the completion's tokens, then over completions. ``ratio="sequence"`` uses one ratio
per completion instead, exp(mean_k log ρ_k) (the sequence-level variant of GSPO), clipped as a whole.
``scale_rewards=False`` leaves advantages unscaled by the group's standard deviation (as Dr. GRPO
argues, scaling favours groups whose rewards barely differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llada.diffusion.scored_rows import ScoredRows

RatioLevel = Literal["token", "sequence"]


@dataclass(frozen=True)
class GrpoSettings:
    """The knobs of the diffu-GRPO loss."""

    prompt_mask: float = 0.15  # p: share of prompt tokens masked in the log-probability pass
    clip: float = 0.2  # ε of the clipped ratio
    kl: float = 0.04  # β of the KL penalty toward the reference
    scale_rewards: bool = True  # divide advantages by the group's reward standard deviation
    ratio: RatioLevel = "token"

    def validate(self) -> None:
        if not 0 <= self.prompt_mask < 1:
            raise ValueError(f"prompt_mask must be in [0, 1), got {self.prompt_mask}")
        if self.clip <= 0 or self.kl < 0:
            raise ValueError(f"clip must be positive and kl non-negative, got {self.clip} and {self.kl}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(N,) advantages of N = groups × group_size rewards, grouped consecutively: each reward minus
    its group's mean, divided by the group's standard deviation (+ eps) when ``scale``. A group whose
    rewards are all equal gets zero advantages (it teaches nothing)."""
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"need a 1-D tensor of groups of {group_size} >= 2 rewards, got shape {tuple(rewards.shape)}")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


@dataclass(frozen=True)
class Rollouts:
    """A batch of completions to learn from: left-padded prompts, completions of equal length."""

    prompts: torch.Tensor  # (N, P) ids, left-padded
    prompt_real: torch.Tensor  # (N, P) bool: real prompt tokens
    completions: torch.Tensor  # (N, C) sampled ids
    completion_real: torch.Tensor  # (N, C) bool: the tokens that count (up to and including the first end token)


def completion_mask(completions: torch.Tensor, end_ids: tuple[int, ...]) -> torch.Tensor:
    """(N, C) bool: each completion's tokens up to and including its first end token (all if none)."""
    ends = torch.isin(completions, torch.tensor(end_ids, device=completions.device))
    after_end = (ends.long().cumsum(1) - ends.long()) > 0  # strictly after the first end token
    return ~after_end


def draw_prompt_mask(prompt_real: torch.Tensor, probability: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, P) bool: each real prompt token hidden with ``probability`` (padding never)."""
    draws = torch.rand(prompt_real.shape, device=prompt_real.device, generator=generator)
    return (draws < probability) & prompt_real


def log_prob_rows(rollouts: Rollouts, hidden: torch.Tensor, mask_id: int) -> ScoredRows:
    """The diffu-GRPO log-probability pass as rows to score: every completion token masked, the
    prompt tokens of ``hidden`` (``draw_prompt_mask``) masked; group n·C + k is completion n's token
    k (weight 1 where it counts, 0 elsewhere)."""
    prompts, completions = rollouts.prompts, rollouts.completions
    count, width = completions.shape
    device = completions.device
    ids = torch.cat([prompts.masked_fill(hidden, mask_id), torch.full_like(completions, mask_id)], dim=1)
    targets = torch.cat([prompts, completions], dim=1)
    weights = torch.cat([torch.zeros(prompts.shape, dtype=torch.float64, device=device),
                         rollouts.completion_real.double()], dim=1)
    token_groups = torch.arange(count * width, device=device).view(count, width)
    groups = torch.cat([torch.zeros_like(prompts), token_groups], dim=1)
    attention = torch.cat([rollouts.prompt_real, torch.ones_like(rollouts.completion_real)], dim=1)
    return ScoredRows(ids, targets, weights, groups, count * width, None if bool(attention.all()) else attention)


@dataclass
class GrpoLoss:
    """The loss of one update and what to log about it."""

    value: torch.Tensor  # scalar, with the policy's gradient
    log_probs: torch.Tensor  # (N, C) the policy's per-token log-probabilities, detached
    kl: float  # mean per-token KL estimate toward the reference
    clip_fraction: float  # share of counted tokens whose ratio was clipped (where clipping mattered)


def grpo_objective(log_probs: torch.Tensor, old_log_probs: torch.Tensor, reference_log_probs: torch.Tensor,
                   advantages: torch.Tensor, real: torch.Tensor, settings: GrpoSettings
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss (scalar), the per-token KL and the clipped-token mask, all (N, C) but the loss, from
    per-token log-probabilities; differentiable in ``log_probs``."""
    log_ratio = log_probs - old_log_probs
    if settings.ratio == "sequence":
        counts = real.sum(1, keepdim=True).clamp(min=1)
        log_ratio = ((log_ratio * real).sum(1, keepdim=True) / counts).expand_as(log_probs)
    ratio = log_ratio.exp()
    gains = advantages[:, None] * ratio
    clipped_gains = advantages[:, None] * ratio.clamp(1 - settings.clip, 1 + settings.clip)
    delta = reference_log_probs - log_probs
    kl = delta.exp() - delta - 1
    per_token = -(torch.minimum(gains, clipped_gains) - settings.kl * kl)
    per_completion = (per_token * real).sum(1) / real.sum(1).clamp(min=1)
    return per_completion.mean(), kl.detach(), (clipped_gains < gains).detach()


def grpo_loss(policy: torch.nn.Module, rows: ScoredRows, old_log_probs: torch.Tensor | None,
              reference_log_probs: torch.Tensor, advantages: torch.Tensor, real: torch.Tensor,
              settings: GrpoSettings) -> GrpoLoss:
    """The diffu-GRPO loss of the policy on ``rows`` (from ``log_prob_rows``), whose old and reference
    log-probabilities were scored on the same rows; ``old_log_probs`` None means the policy is still
    the one that made the rollouts (every ratio 1, as at the first update of a batch). Two policy
    passes, no logits kept (``ScoredRows``)."""
    shape = real.shape

    def objective(scores: torch.Tensor) -> torch.Tensor:
        log_probs = scores.view(shape)
        old = log_probs.detach() if old_log_probs is None else old_log_probs
        return grpo_objective(log_probs, old, reference_log_probs, advantages, real, settings)[0]

    value, scores = rows.loss(policy, objective)
    log_probs = scores.view(shape)
    old = log_probs if old_log_probs is None else old_log_probs
    _, kl, clipped = grpo_objective(log_probs, old, reference_log_probs, advantages, real, settings)
    tokens = real.sum().clamp(min=1)
    return GrpoLoss(value, log_probs, float((kl * real).sum() / tokens), float((clipped & real).sum() / tokens))
