"""Conditional likelihood of an answer under a masked diffusion model: the Monte-Carlo ELBO.

A diffusion model has no exact left-to-right factorisation, so log p(answer | prompt) is bounded from
below by the ELBO and estimated by sampling (paper, Eq. 6 / Appendix B.5): mask exactly l of the L
answer tokens with l ~ U{1..L}, and score the masked tokens weighted by L / l. This is lower-variance
than masking each token independently, and is what the paper uses for likelihood-based benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llada.diffusion.masking import mask_exact_count, stratified_mask_counts
from llada.model.transformer import LLaDAModel, left_pad


@dataclass
class LikelihoodEstimate:
    """A Monte-Carlo ELBO estimate of log p(answer | prompt), in nats."""

    log_likelihood: float  # estimate of the ELBO, a lower bound on log p(answer | prompt)
    stderr: float  # standard error of the estimate (0 when it is exact)
    num_samples: int  # Monte-Carlo samples used


def _validate(prompt: torch.Tensor, answer: torch.Tensor, mc_num: int, batch_size: int, cfg_scale: float) -> None:
    if prompt.dim() != 1 or answer.dim() != 1:
        raise ValueError(f"prompt and answer must be 1-D token sequences, got shapes {tuple(prompt.shape)} "
                         f"and {tuple(answer.shape)}")
    if answer.numel() == 0:
        raise ValueError("answer is empty: there is nothing to score")
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1, got {mc_num} and {batch_size}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")


def _masked_answers(answer: torch.Tensor, counts: torch.Tensor, mask_id: int,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets, masked, noisy answers), each (n, T): ``counts[i]`` answer tokens masked in sample i."""
    targets = answer[None, :].expand(counts.numel(), -1)
    masked = mask_exact_count(targets, counts.to(answer.device), mask_id, generator=generator)
    return targets, masked, torch.where(masked, torch.full_like(targets, mask_id), targets)


def _weighted_sums(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """(n,) samples (L / l) · Σ over masked tokens of log p(token), from answer logits (n, T, V)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="none").view(targets.shape)  # (n, T); rows, for the fast kernel
    weights = targets.shape[1] / counts.to(device=log_probs.device, dtype=log_probs.dtype)
    return (log_probs * masked).sum(dim=1) * weights


@torch.no_grad()
def elbo_samples(model: LLaDAModel, prompt: torch.Tensor, answer: torch.Tensor, counts: torch.Tensor,
                 cfg_scale: float = 0.0, mask_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One ELBO sample per entry of ``counts`` (number of answer tokens to mask): (len(counts),) in float32.

    Each sample is (L / l) · Σ over the l masked answer tokens of log p(token | masked sequence).
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    batch = counts.numel()
    prompt, answer = prompt.to(model.device), answer.to(model.device)
    targets, masked, noisy_answer = _masked_answers(answer, counts, mask_id, generator)
    sequence = torch.cat([prompt[None, :].expand(batch, -1), noisy_answer], dim=1)  # (n, P+T)
    logits = model(sequence).logits[:, prompt.numel():]  # (n, T, V)
    if cfg_scale > 0:
        unconditional = torch.cat([torch.full_like(prompt, mask_id)[None, :].expand(batch, -1), noisy_answer], dim=1)
        un_logits = model(unconditional).logits[:, prompt.numel():]
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    return _weighted_sums(logits, targets, masked, counts)


@torch.no_grad()
def padded_logits(model: LLaDAModel, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, W, V) logits of token rows of different lengths, left-padded to the longest (W) with the
    padding hidden from attention: each row's real positions get the logits of the row run alone,
    at its last ``len(row)`` columns. Several short requests then share one forward pass."""
    ids, keep = left_pad(rows, model.config.mask_token_id)  # the pad id is never attended to
    ids, keep = ids.to(model.device), keep.to(model.device)
    return model(ids, attention_mask=None if bool(keep.all()) else keep).logits


@torch.no_grad()
def suffix_greedy(model: LLaDAModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], cfg_scale: float = 0.0,
                  mask_id: int | None = None) -> list[bool]:
    """Whether each continuation is what greedy decoding of it produces, as the official lm-eval
    wrapper defines ``is_greedy`` (``suffix_greedy_prediction``): the continuation starts fully
    masked; each step predicts every masked position (argmax, with guidance when ``cfg_scale`` > 0)
    and commits only the single most confident prediction (its float32 softmax probability); after
    as many steps as the continuation has tokens, the decoded suffix must equal it.

    Rows of different lengths share each forward pass, left-padded with the padding hidden from
    attention (each row's logits are those of the row run alone); a row leaves once decoded.
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    rows = [list(context) + [mask_id] * len(continuation) for context, continuation in pairs]
    contexts = [len(context) for context, _ in pairs]
    active = [i for i, (_, continuation) in enumerate(pairs) if continuation]
    while active:
        conditional = [rows[i] for i in active]
        if cfg_scale > 0:  # the unconditional input hides the whole context (the official get_logits)
            unconditional = [[mask_id] * contexts[i] + rows[i][contexts[i]:] for i in active]
            both = padded_logits(model, conditional + unconditional)
            logits, un_logits = both[:len(active)], both[len(active):]
            logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
        else:
            logits = padded_logits(model, conditional)
        width = logits.shape[1]
        still = []
        for slot, i in enumerate(active):
            row = torch.tensor(rows[i], device=logits.device)
            masked = (row == mask_id).nonzero().squeeze(1)  # positions in the row
            masked = masked[masked >= contexts[i]]
            scores = logits[slot, width - len(rows[i]) + masked]  # (M, V)
            proposal = scores.argmax(-1)
            confidence = torch.softmax(scores.float(), dim=-1).gather(1, proposal[:, None]).squeeze(1)
            best = int(confidence.argmax())
            rows[i][int(masked[best])] = int(proposal[best])
            if len(masked) > 1:
                still.append(i)
        active = still
    return [rows[i][contexts[i]:] == list(continuation) for i, (_, continuation) in enumerate(pairs)]


@torch.no_grad()
def packed_elbo_samples(model: LLaDAModel, items: Sequence[tuple[torch.Tensor, torch.Tensor]], num_samples: int,
                        mask_id: int | None = None,
                        generator: torch.Generator | Sequence[torch.Generator] | None = None) -> list[torch.Tensor]:
    """ELBO samples of several (prompt, answer) items in one forward pass: ``num_samples`` stratified
    samples per item (one for a one-token answer, whose single sample is exact).

    The rows of all items are left-padded to one length, the padding hidden from attention (the
    model is then position-shift invariant, see ``LLaDAModel.forward``). Randomness is drawn item
    by item in the order ``log_likelihood`` draws it, so with the same generator the estimates equal
    those of ``log_likelihood(..., mc_num=num_samples, batch_size=num_samples)`` called on each item
    in turn, up to the rounding of a differently shaped forward pass (1e-11 relative in float64,
    ~1e-4 in bf16): packing changes the cost, not the estimator. (No guidance: it needs a second pass.)
    ``generator`` may be one generator per item, so that an item's samples do not depend on the
    items packed with it.
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    generators = list(generator) if isinstance(generator, Sequence) else [generator] * len(items)
    if len(generators) != len(items):
        raise ValueError(f"{len(generators)} generators for {len(items)} items")
    drawn, rows = [], []
    for (prompt, answer), item_generator in zip(items, generators):
        prompt, answer = prompt.to(model.device), answer.to(model.device)
        if answer.numel() == 1:
            counts = torch.ones(1, dtype=torch.long, device=model.device)
        else:
            counts = stratified_mask_counts(num_samples, answer.numel(), device=model.device,
                                            generator=item_generator)
        targets, masked, noisy = _masked_answers(answer, counts, mask_id, item_generator)
        drawn.append((targets, masked, counts))
        rows += torch.cat([prompt[None, :].expand(counts.numel(), -1), noisy], dim=1).tolist()
    logits = padded_logits(model, rows)
    samples, row = [], 0
    for targets, masked, counts in drawn:
        n, length = targets.shape
        samples.append(_weighted_sums(logits[row:row + n, -length:], targets, masked, counts))
        row += n
    return samples


@torch.no_grad()
def log_likelihood(model: LLaDAModel, prompt: torch.Tensor, answer: torch.Tensor, mc_num: int = 128,
                   batch_size: int = 16, cfg_scale: float = 0.0, mask_id: int | None = None,
                   generator: torch.Generator | None = None, progress: bool = False) -> LikelihoodEstimate:
    """Monte-Carlo ELBO estimate of log p(answer | prompt).

    Args:
        model: the mask predictor.
        prompt: (P,) prompt ids (never masked).
        answer: (T,) answer ids to score.
        mc_num: Monte-Carlo samples; a one-token answer needs only one (its estimate is exact).
        batch_size: samples per forward pass. Mask counts are stratified within each batch.
        cfg_scale: unsupervised classifier-free guidance on the scores (0 = off).
        mask_id: the [MASK] id; None takes the model config's.
        generator: randomness of the mask counts and positions, on the model's device.
        progress: show a progress bar over the batches.
    Returns:
        LikelihoodEstimate with the mean and its standard error (from the spread between batches,
        which respects the stratification inside a batch; from single samples if there is one batch).
    """
    _validate(prompt, answer, mc_num, batch_size, cfg_scale)
    answer_length = answer.numel()
    if answer_length == 1:  # the only mask set is {the token}: one forward pass is exact
        one = torch.ones(1, dtype=torch.long, device=model.device)
        value = elbo_samples(model, prompt, answer, one, cfg_scale, mask_id, generator)
        return LikelihoodEstimate(log_likelihood=float(value[0]), stderr=0.0, num_samples=1)
    sizes = [batch_size] * (mc_num // batch_size) + ([mc_num % batch_size] if mc_num % batch_size else [])
    batch_means, samples = [], []
    for size in tqdm(sizes, desc="ELBO", unit="batch", disable=not progress, leave=False):
        counts = stratified_mask_counts(size, answer_length, device=model.device, generator=generator)
        values = elbo_samples(model, prompt, answer, counts, cfg_scale, mask_id, generator).double().cpu()
        batch_means.append(values.mean())
        samples.append(values)
    all_samples = torch.cat(samples)
    if len(batch_means) > 1:
        spread = torch.stack(batch_means)
        stderr = float(spread.std(unbiased=True)) / math.sqrt(len(batch_means))
    else:
        stderr = float(all_samples.std(unbiased=True)) / math.sqrt(all_samples.numel()) if mc_num > 1 else math.nan
    return LikelihoodEstimate(log_likelihood=float(all_samples.mean()), stderr=stderr, num_samples=mc_num)
