"""What one denoising step commits: proposals from logits, and the policies that choose among them.

All functions work on a batch of blocks — (B, Q) positions with (B, Q, V) logits — without moving
data to the host, so an engine can run them back to back with the model's forward passes.

Policies:
- ``fixed``: commit a scheduled number of tokens per step, most confident (or random) first — the
  reference sampler's rule (``sampling.generate``).
- ``threshold``: commit every masked position whose confidence is at least τ, and at least the most
  confident one (confidence-aware parallel decoding, Fast-dLLM, Wu et al. 2025). Fast-dLLM's code
  computes the confidence with a float64 softmax, this one in float32: a confidence within float32
  rounding of τ (about 1e-7) can fall on the other side of it.
- ``factor``: with confidences sorted c_1 ≥ c_2 ≥ …, commit the longest prefix with
  c_n ≥ 1 − f / (n + 1), at least one (the same paper's factor rule: more tokens at once the more
  confident they all are).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F

from llada.diffusion.sampling import add_gumbel_noise

Policy = Literal["fixed", "threshold", "factor"]
POLICIES: tuple[str, ...] = typing.get_args(Policy)


def propose(logits: torch.Tensor, temperature: float, remasking: str, generator: torch.Generator | None = None,
            exact_confidence: bool = True, forbid: tuple[int, ...] = (), demote: tuple[int, ...] = (),
            never: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's proposed token and its confidence, as the reference sampler computes them.

    Args:
        logits: (B, Q, V).
        temperature: 0 = argmax; otherwise Gumbel-max sampling in float64.
        remasking: ``low_confidence`` (confidence = probability of the proposal) or ``random``.
        exact_confidence: softmax in the logits' dtype, exactly as the reference sampler (its ties
            and rounding included); False uses float32, as threshold rules need.
        forbid: token ids whose logits are set to -inf before choosing (``logits_eos_inf``).
        demote: token ids that may be proposed but get confidence 0 (``confidence_eos_eot_inf``).
        never: token ids never proposed, leaving every confidence as it was (the mask id: the
            reference sampler commits a predicted [MASK] and then treats the position as masked
            again; here it is simply not a candidate).
    Returns:
        tokens (B, Q) int64 and confidence (B, Q) float.
    """
    if forbid:
        logits = _without(logits.clone(), forbid)
    scores = add_gumbel_noise(logits, temperature, generator)
    if never:
        scores = _without(scores.clone() if scores is logits else scores, never)
    tokens = torch.argmax(scores, dim=-1)
    if demote:
        logits = _without(logits.clone(), demote)
    if remasking == "random":
        confidence = torch.rand(tokens.shape, device=logits.device, generator=generator)
    else:
        probabilities = F.softmax(logits if exact_confidence else logits.float(), dim=-1)
        confidence = probabilities.gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, confidence


def _without(scores: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """``scores`` with the columns ``ids`` set to -inf, in place. One id at a time: indexing with a
    host list would copy an index tensor to the GPU, a blocking copy at every step."""
    for token in ids:
        scores[..., token] = -torch.inf
    return scores


def _top_count(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, Q) bool marking each row's ``counts[row]`` highest confidences."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                             .expand_as(order))
    return ranks < counts[:, None]


def select(confidence: torch.Tensor, masked: torch.Tensor, policy: Policy, count: int | torch.Tensor = 1,
           threshold: float | torch.Tensor = 0.9, factor: float | torch.Tensor = 1.0,
           stable_ties: bool = False) -> torch.Tensor:
    """Which masked positions to commit this step: (B, Q) bool.

    Args:
        confidence: (B, Q) confidence of each proposal.
        masked: (B, Q) positions still masked (the only ones that may be chosen).
        policy: ``fixed``, ``threshold`` or ``factor`` (module docstring).
        count: ``fixed`` only: tokens per row this step (int, or (B,) tensor).
        threshold: τ of the ``threshold`` policy, in [0, 1] (a number, or a 0-d tensor, which a
            CUDA graph can take as an input).
        factor: f of the ``factor`` policy, > 0 (a number or a 0-d tensor).
        stable_ties: ``fixed``: break ties by position whether ``count`` is an int or a tensor (the
            deterministic engine: a row alone gets an int, in a batch whose rows are at different
            steps of their schedules a tensor, and ``topk``'s ties may fall elsewhere).
    Rows without masked positions commit nothing; every other row commits at least one position.
    """
    confidence = confidence.masked_fill(~masked, -torch.inf)
    if policy == "fixed":
        if isinstance(count, int) and stable_ties:
            count = torch.full((confidence.shape[0],), count, dtype=torch.long, device=confidence.device)
        if isinstance(count, int):  # the reference's topk, same ties
            chosen = torch.zeros_like(masked)
            if count > 0:
                chosen.scatter_(-1, confidence.topk(count, dim=-1).indices, True)
            return chosen & masked
        return _top_count(confidence, count.to(confidence.device)) & masked
    if policy == "threshold":
        chosen = confidence >= threshold
    elif policy == "factor":
        ordered = confidence.sort(dim=-1, descending=True).values  # (B, Q)
        n = torch.arange(1, ordered.shape[-1] + 1, device=ordered.device, dtype=ordered.dtype)
        passes = (ordered >= 1 - factor / (n + 1)).to(torch.int64).cumprod(dim=-1)  # prefix that passes
        chosen = _top_count(confidence, passes.sum(dim=-1))
    else:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    best = torch.zeros_like(masked).scatter_(-1, confidence.argmax(dim=-1, keepdim=True), True)
    return (chosen | best) & masked
