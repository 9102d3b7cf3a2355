"""Preference optimization for masked diffusion models: DPO with ELBO log-likelihoods, and VRPO's
variance reductions (LLaDA 1.5, Zhu et al. 2025).

DPO needs log π(y | x) - log π_ref(y | x) for a chosen and a rejected answer. A diffusion model
has no exact log-likelihood, so each is replaced by its ELBO B(y | x), estimated by Monte Carlo:
mask exactly l ~ U{1..L} of the L answer tokens and score the masked ones weighted by L / l
(``likelihood.py``'s estimator). The loss is

    -log σ(β [(B̂_π(y_w) - B̂_ref(y_w)) - (B̂_π(y_l) - B̂_ref(y_l))]),

and its noise comes from the four estimates. VRPO reduces it without bias, each way switchable:

- *budget*: average ``budget`` draws per estimate instead of one;
- *allocation*: spend the budget on distinct mask counts (timesteps), one mask each
  (``masks_per_count=1``, the optimal allocation), rather than several masks of one count;
- *antithetic sampling*: the policy and the reference score each answer on the same counts and
  masks, so the noise they share cancels in B̂_π - B̂_ref.

Plain ELBO-DPO is budget 1, independent draws for policy and reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llada.diffusion.masking import mask_exact_count, stratified_mask_counts


@dataclass(frozen=True)
class VarianceReduction:
    """How the four ELBO estimates of a preference pair are drawn."""

    budget: int = 8  # Monte-Carlo draws per ELBO estimate (n = counts × masks_per_count)
    masks_per_count: int = 1  # masks drawn per mask count; 1 spends the budget on distinct counts
    antithetic: bool = True  # policy and reference share counts and masks per answer

    def validate(self) -> None:
        if self.budget < 1 or self.masks_per_count < 1:
            raise ValueError(f"budget and masks_per_count must be >= 1, got {self.budget} and {self.masks_per_count}")
        if self.budget % self.masks_per_count:
            raise ValueError(f"budget ({self.budget}) must be a multiple of masks_per_count ({self.masks_per_count})")


PLAIN_DPO = VarianceReduction(budget=1, masks_per_count=1, antithetic=False)


@dataclass(frozen=True)
class ElboDraws:
    """The randomness of one ELBO estimate of an answer of L tokens: n draws, each a count l of
    masked tokens and which ones."""

    counts: torch.Tensor  # (n,) long, each in {1..L}
    masked: torch.Tensor  # (n, L) bool, exactly counts[i] True in row i


def draw(length: int, reduction: VarianceReduction, generator: torch.Generator | None = None,
         device: torch.device | str = "cpu") -> ElboDraws:
    """``reduction.budget`` draws for an answer of ``length`` tokens: budget / masks_per_count mask
    counts, stratified over {1..length} (each marginally uniform), each with masks_per_count masks."""
    reduction.validate()
    distinct = reduction.budget // reduction.masks_per_count
    counts = stratified_mask_counts(distinct, length, device=device, generator=generator)
    counts = counts.repeat_interleave(reduction.masks_per_count)  # (n,)
    template = torch.zeros(counts.numel(), length, dtype=torch.long, device=device)
    return ElboDraws(counts, mask_exact_count(template, counts, mask_id=0, generator=generator))


def elbo_estimate(model: torch.nn.Module, prompt: torch.Tensor, answer: torch.Tensor, draws: ElboDraws,
                  mask_id: int) -> torch.Tensor:
    """The ELBO estimate of log p(answer | prompt) from ``draws``: the mean over draws of
    (L / l) · Σ over the masked answer tokens of log p(token | masked sequence). A 0-d tensor that
    carries gradients when the model does.

    One forward pass over n rows, scored through the model's ``targets=`` path, so that only the
    masked positions go through the output projection (no (n, L, V) logits: at LLaDA's 126k-token
    vocabulary they would dwarf the rest of a preference step's memory).
    """
    n, length = draws.masked.shape
    if answer.numel() != length:
        raise ValueError(f"draws are for answers of {length} tokens, the answer has {answer.numel()}")
    answer = answer.to(draws.masked.device)
    prompt = prompt.to(draws.masked.device)
    noisy = torch.where(draws.masked, torch.full_like(answer, mask_id)[None], answer[None])  # (n, L)
    sequence = torch.cat([prompt[None].expand(n, -1), noisy], dim=1)  # (n, P + L)
    targets = torch.cat([prompt, answer])[None].expand(n, -1)
    weights = draws.masked.double() * (length / draws.counts.double())[:, None] / n  # (n, L)
    weights = torch.cat([weights.new_zeros(n, prompt.numel()), weights], dim=1)
    return -model(sequence, targets=targets, target_weights=weights).weighted_nll


@dataclass
class PreferenceLoss:
    """The DPO loss of a batch of pairs and what to log about it."""

    value: torch.Tensor  # scalar: mean over pairs of -log σ(β · margin), with the policy's gradient
    margins: torch.Tensor  # (B,) the estimated reward margins (B̂_π - B̂_ref)(y_w) - (B̂_π - B̂_ref)(y_l), detached
    accuracy: float  # share of pairs whose margin is positive


def reward_difference(policy: torch.nn.Module, reference: torch.nn.Module, prompt: torch.Tensor, answer: torch.Tensor,
                      reduction: VarianceReduction, mask_id: int, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """B̂_π(answer) - B̂_ref(answer): the reference scored without gradients, on the policy's draws
    when ``reduction.antithetic``, else on draws of its own. (One answer at a time, two forward
    passes: the definition ``preference_loss`` computes packed, and what the estimator tests use.)"""
    device = prompt.device
    draws = draw(answer.numel(), reduction, generator, device)
    mine = elbo_estimate(policy, prompt, answer, draws, mask_id)
    with torch.no_grad():
        theirs = draws if reduction.antithetic else draw(answer.numel(), reduction, generator, device)
        base = elbo_estimate(reference, prompt, answer, theirs, mask_id)
    return mine - base


@dataclass(frozen=True)
class _Rows:
    """Every draw of every answer as one padded batch: row r is a draw of answer ``answers[r]``."""

    ids: torch.Tensor  # (R, T) prompt + noised answer, right-padded
    targets: torch.Tensor  # (R, T) prompt + clean answer
    weights: torch.Tensor  # (R, T) float64: (L / l) / n at the masked answer positions, 0 elsewhere
    answers: torch.Tensor  # (R,) long
    attention: torch.Tensor | None  # (R, T) real-token mask, None when no row is padded

    def estimates(self, model: torch.nn.Module, count: int) -> torch.Tensor:
        """(count,) ELBO estimates of the answers (no gradients): one forward pass, no logits kept."""
        sums = model(self.ids, attention_mask=self.attention, targets=self.targets, target_weights=self.weights,
                     per_sequence=True).weighted_nll  # (R,)
        return -torch.zeros(count, dtype=sums.dtype, device=sums.device).index_add_(0, self.answers, sums)


def _pack(items: list[tuple[torch.Tensor, torch.Tensor, ElboDraws]], mask_id: int) -> _Rows:
    """The rows of (prompt, answer, draws) items, in item order."""
    total = sum(d.counts.numel() for _, _, d in items)
    width = max(p.numel() + a.numel() for p, a, _ in items)
    device = items[0][2].masked.device
    ids = torch.zeros(total, width, dtype=torch.long, device=device)
    targets = torch.zeros_like(ids)
    weights = torch.zeros(total, width, dtype=torch.float64, device=device)
    attention = torch.zeros(total, width, dtype=torch.bool, device=device)
    answers = torch.empty(total, dtype=torch.long, device=device)
    row = 0
    for index, (prompt, answer, draws) in enumerate(items):
        n, length = draws.masked.shape
        end, stop = row + n, prompt.numel() + length
        clean = torch.cat([prompt.to(device), answer.to(device)])
        targets[row:end, :stop] = clean
        ids[row:end, :stop] = clean
        ids[row:end, prompt.numel():stop].masked_fill_(draws.masked, mask_id)
        weights[row:end, prompt.numel():stop] = draws.masked.double() * (length / draws.counts.double())[:, None] / n
        attention[row:end, :stop] = True
        answers[row:end] = index
        row = end
    return _Rows(ids, targets, weights, answers, None if bool(attention.all()) else attention)


def preference_loss(policy: torch.nn.Module, reference: torch.nn.Module,
                    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], beta: float,
                    reduction: VarianceReduction, mask_id: int, generator: torch.Generator | None = None
                    ) -> PreferenceLoss:
    """DPO over ELBO estimates for ``pairs`` of (prompt, chosen answer, rejected answer) 1-D id tensors.

    Packed: all draws of all answers go through the policy and the reference in one forward pass
    each (rows padded, padding hidden from attention), instead of two passes per answer. The loss is
    not a plain sum over tokens, so its gradient takes a second policy pass: with the margins m_p
    known, ∂L/∂B̂_π(y) = ∓β σ(-β m_p) / P, and the policy's gradient is that of the weighted sum
    Σ_y (∂L/∂B̂_π(y)) · B̂_π(y) over the same rows, which the fused loss computes without logits.
    The value is the exact loss; the draws, and so the estimates, are those of ``reward_difference``
    called answer by answer with the same generator (chosen, then rejected, pair by pair).
    With dropout in the policy (LoRA dropout) the two passes see different dropout masks.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not pairs:
        raise ValueError("no preference pairs")
    mine, theirs = [], []
    for prompt, chosen, rejected in pairs:
        for answer in (chosen, rejected):
            drawn = draw(answer.numel(), reduction, generator, prompt.device)
            mine.append((prompt, answer, drawn))
            theirs.append((prompt, answer, drawn if reduction.antithetic
                           else draw(answer.numel(), reduction, generator, prompt.device)))
    policy_rows, reference_rows = _pack(mine, mask_id), _pack(theirs, mask_id)
    count = len(mine)
    with torch.no_grad():
        rewards = policy_rows.estimates(policy, count) - reference_rows.estimates(reference, count)  # (2P,)
    margins = rewards[0::2] - rewards[1::2]  # (P,), in the estimates' dtype (at least float32)
    value = -F.logsigmoid(beta * margins).mean()
    if torch.is_grad_enabled():
        slope = -beta * torch.sigmoid(-beta * margins) / len(pairs)  # ∂L/∂B̂_π(chosen); its negative for rejected
        per_answer = torch.stack([slope, -slope], dim=1).flatten().double()  # (2P,)
        # Σ_y slope_y · B̂_π(y) = -Σ_rows slope · Σ weight · CE
        weights = -per_answer[policy_rows.answers][:, None] * policy_rows.weights
        surrogate = policy(policy_rows.ids, attention_mask=policy_rows.attention, targets=policy_rows.targets,
                           target_weights=weights).weighted_nll
        value = value + (surrogate - surrogate.detach()).to(value.dtype)
    return PreferenceLoss(value, margins, float((margins > 0).float().mean()))
