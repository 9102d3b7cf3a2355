"""A step's commits: which proposed tokens a batch's rows take, written into their tokens and flags.

Pure tensor functions of a batch's state (no host synchronisation), so that a greedy block step can
be captured whole as one CUDA graph: ``decoding.propose`` and ``decoding.select`` over each row's own
block, then the writes, then what the host needs to know (``progress``).
"""

from __future__ import annotations

import torch

from llada.engine.decoding import propose, select
from llada.engine.settings import GenerationSettings


def commit(logits: torch.Tensor, x: torch.Tensor, undecided: torch.Tensor, offsets: torch.Tensor,
           limits: torch.Tensor, count: int | torch.Tensor, *, settings: GenerationSettings, prompt_length: int,
           block_length: int, mask_id: int, end_ids: tuple[int, ...], generator: torch.Generator | None,
           unwritten: torch.Tensor | None = None, columns: torch.Tensor | None = None, stable_ties: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose this step's tokens at ``offsets`` (B, N: each row's block, or, with their ``columns`` in
    the block, the part of it a step queried) and write them into ``x`` and ``undecided`` (and mark
    them in ``unwritten``).

    ``logits`` (B, N, V) are guided. ``limits``: the policy's threshold and factor, as float32 device
    scalars (the policies compare float32 confidences with them). ``stable_ties``: as in
    ``decoding.select`` (deterministic engines). Returns ``chosen`` (B, N), the positions committed,
    and ``pending`` (B,), rows with undecided positions left among ``offsets``.
    """
    answer = x[:, prompt_length:]  # a view: scattering into it writes x
    current = answer.gather(1, offsets)
    masked = undecided.gather(1, offsets)  # idle rows have nothing undecided
    forbid = (end_ids[0],) if settings.logits_eos_inf else ()
    demote = end_ids[:2] if settings.confidence_eos_eot_inf else ()
    proposals, confidence = propose(logits, settings.temperature, settings.remasking, generator,
                                    exact_confidence=settings.policy == "fixed", forbid=forbid, demote=demote,
                                    never=(mask_id,))
    if columns is None:
        chosen = select(confidence, masked, settings.policy, count, limits[0], limits[1], stable_ties)
    else:  # choose over the whole block, as without reuse_decided: top-k breaks ties by position and width
        block = (masked.shape[0], block_length)
        chosen = select(confidence.new_zeros(block).scatter_(1, columns, confidence),
                        masked.new_zeros(block).scatter_(1, columns, masked), settings.policy, count,
                        limits[0], limits[1], stable_ties).gather(1, columns)
    answer.scatter_(1, offsets, torch.where(chosen, proposals, current))
    still_masked = masked & ~chosen
    undecided.scatter_(1, offsets, still_masked)
    if unwritten is not None:  # their cached keys/values were computed from the mask
        unwritten.scatter_(1, offsets, unwritten.gather(1, offsets) | chosen)
    return chosen, still_masked.any(1)


def progress(answer: torch.Tensor, undecided: torch.Tensor, pending: torch.Tensor, end_ids: tuple[int, ...],
             early_stop: bool) -> torch.Tensor:
    """(2, B) bool: ``[0]`` the rows with undecided positions left in their block (``pending``), ``[1]``
    the rows whose answer (B, G) is complete (``decided_through_end``; all False without
    ``early_stop``). Captured steps compute both inside their CUDA graph, so that the host reads one
    small tensor per step instead of running a dozen small kernels and a second read-back when rows
    finish their block."""
    complete = decided_through_end(answer, undecided, end_ids) if early_stop else torch.zeros_like(pending)
    return torch.stack([pending, complete])


def decided_through_end(answer: torch.Tensor, undecided: torch.Tensor, end_ids: tuple[int, ...]) -> torch.Tensor:
    """(B,) rows whose answer holds an end-of-text token with every position before it decided.

    Such an answer is final: decoding ends at the first end-of-text token, and tokens once committed
    are never changed, so nothing left to decode can alter the text before it. ``end_ids`` holds at
    least one id (``early_stop`` is refused for models without one).
    """
    is_end = answer == end_ids[0]
    for token in end_ids[1:]:
        is_end |= answer == token
    settled = undecided.cumsum(1) == 0  # the positions before the first undecided one
    return (is_end & settled).any(1)


def needed(undecided: torch.Tensor, unwritten: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Which answer positions at ``offsets`` (B, L) a ``reuse_decided`` step must query: those still
    undecided, and those decided since their keys/values were last stored (``unwritten``)."""
    return (undecided | unwritten).gather(1, offsets)
