"""Training objectives against brute-force expectations over every mask set on a tiny model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from llada.diffusion.losses import autoregressive_loss, pretrain_loss, random_truncation, sft_loss

MASK = 511
EPS = 1e-3


def subset_losses(model, ids: torch.Tensor, positions: list[int]) -> dict[tuple[int, ...], float]:
    """Σ_{i∈S} -log p(x_i | x with S masked) for every non-empty subset S of ``positions``."""
    out = {}
    for size in range(1, len(positions) + 1):
        for subset in itertools.combinations(positions, size):
            noisy = ids.clone()
            noisy[list(subset)] = MASK
            log_probs = F.log_softmax(model(noisy[None]).logits[0].double(), dim=-1)
            out[subset] = -sum(log_probs[i, ids[i]].item() for i in subset)
    return out


def weight_integral(size: int, total: int, points: int = 4001) -> float:
    """∫_0^1 p^(k-1) (1-p)^(n-k) dt with p = (1-eps)t + eps (Simpson's rule; the integrand is a polynomial)."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    p = (1 - EPS) * t + EPS
    values = p ** (size - 1) * (1 - p) ** (total - size)
    weights = torch.ones(points, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return float((values * weights).sum() / (3 * (points - 1)))


def exact_expected_loss(model, ids: torch.Tensor, maskable: list[int], normaliser: float) -> float:
    """E_t E_mask[Σ_masked CE / p_mask] / normaliser, by enumerating all mask sets."""
    total = len(maskable)
    return sum(value * weight_integral(len(subset), total)
               for subset, value in subset_losses(model, ids, maskable).items()) / normaliser


def monte_carlo(loss_fn, draws: int = 40) -> tuple[float, float]:
    values = torch.tensor([loss_fn(torch.Generator().manual_seed(seed)).value.item() for seed in range(draws)])
    return values.mean().item(), values.std().item() / math.sqrt(draws)


@torch.no_grad()
def test_pretrain_loss_is_unbiased_for_its_expectation() -> None:
    """Mean of the pretraining loss over many draws equals the exact expectation (Eq. 3)."""
    model = tiny_model()
    ids = torch.randint(0, 500, (4,))
    exact = exact_expected_loss(model, ids, list(range(4)), normaliser=4)
    rows = ids[None].expand(500, -1)
    mean, stderr = monte_carlo(lambda g: pretrain_loss(model, rows, MASK, eps=EPS, generator=g))
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    assert stderr < 0.05 * exact  # the test has power


@torch.no_grad()
def test_sft_loss_is_unbiased_and_never_masks_the_prompt() -> None:
    """Prompt untouched; expectation = exact sum over answer mask sets / answer length."""
    model = tiny_model()
    ids = torch.randint(0, 500, (6,))
    prompt_length = 2
    seen = []

    def recording_model(noisy, **kwargs):
        seen.append(noisy)
        return model(noisy, **kwargs)

    exact = exact_expected_loss(model, ids, list(range(prompt_length, 6)), normaliser=4)
    rows = ids[None].expand(500, -1)
    prompts = torch.full((500,), prompt_length)
    mean, stderr = monte_carlo(lambda g: sft_loss(recording_model, rows, prompts, MASK, eps=EPS, generator=g))
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    noisy = torch.cat(seen)
    assert (noisy[:, :prompt_length] == ids[:prompt_length]).all()
    assert (noisy[:, prompt_length:] == MASK).any()


def test_sft_normalises_each_sample_by_its_answer_length() -> None:
    """Two samples with different prompt lengths: the batch loss is the mean of per-sample losses."""
    model = tiny_model()
    ids = torch.randint(0, 500, (2, 8))
    prompts = torch.tensor([2, 5])
    together = sft_loss(model, ids, prompts, MASK, generator=torch.Generator().manual_seed(3))
    # Replaying the same random draws row by row needs the same generator stream: draw t then the mask.
    generator = torch.Generator().manual_seed(3)
    t = torch.rand(2, generator=generator)
    u = torch.rand(2, 8, generator=generator)
    manual = 0.0
    for row in range(2):
        p = (1 - 1e-3) * t[row] + 1e-3
        masked = (u[row] < p) & (torch.arange(8) >= prompts[row])
        noisy = torch.where(masked, MASK, ids[row])
        log_probs = F.log_softmax(model(noisy[None]).logits[0], dim=-1)
        ce = -log_probs[torch.arange(8), ids[row]][masked].sum() / p
        manual += ce / (8 - prompts[row])
    assert together.value.item() == pytest.approx(manual.item() / 2, rel=1e-9)


def test_sft_rejects_wrong_prompt_lengths() -> None:
    with pytest.raises(ValueError, match="prompt_lengths"):
        sft_loss(tiny_model(), torch.zeros(2, 4, dtype=torch.long), torch.tensor([1]), MASK)


def test_autoregressive_loss_equals_prefix_by_prefix_scoring() -> None:
    """With one layer, causal logits at position i equal the bidirectional model run on the prefix x[:i+1]."""
    model = tiny_model(n_layers=1)
    ids = torch.randint(0, 500, (1, 7))
    loss = autoregressive_loss(model, ids)
    manual = 0.0
    for i in range(6):
        log_probs = F.log_softmax(model(ids[:, :i + 1]).logits[0, -1], dim=-1)
        manual -= log_probs[ids[0, i + 1]].item()
    assert loss.value.item() == pytest.approx(manual / 6, rel=1e-9)
    masked = autoregressive_loss(model, ids, loss_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1]]).bool())
    assert masked.n_masked.item() == 4


def test_random_truncation() -> None:
    ids = torch.zeros(2, 30, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    lengths = {random_truncation(ids, probability=1.0, generator=generator).shape[1] for _ in range(200)}
    assert min(lengths) >= 1 and max(lengths) <= 30 and len(lengths) > 15
    assert random_truncation(ids, probability=0.0, generator=generator).shape == (2, 30)


def test_loss_decreases_when_training() -> None:
    """A few AdamW steps on one batch lower the pretraining loss (the gradients are right)."""
    model = tiny_model(torch.float32)
    model.train()
    ids = torch.randint(0, 500, (8, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def evaluate() -> float:
        with torch.no_grad():
            return sum(pretrain_loss(model, ids, MASK, generator=torch.Generator().manual_seed(s)).value.item()
                       for s in range(5)) / 5

    before = evaluate()
    for step in range(30):
        optimizer.zero_grad()
        pretrain_loss(model, ids, MASK, generator=torch.Generator().manual_seed(100 + step)).value.backward()
        optimizer.step()
    assert evaluate() < 0.7 * before
