"""ELBO-based DPO and VRPO's variance reductions against exact enumeration on a tiny model: the
estimated reward difference B̂_π - B̂_ref is unbiased under every reduction, and antithetic sampling
and a larger budget lower its variance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import exact_elbo, tiny_model

from llada.diffusion.preference import (
    PLAIN_DPO,
    VarianceReduction,
    draw,
    elbo_estimate,
    preference_loss,
    reward_difference,
)

PROMPT = torch.tensor([5, 17, 42, 9])
ANSWER = torch.tensor([33, 2, 71])


@pytest.fixture(scope="module")
def models():
    reference = tiny_model(init_std=0.3)
    policy = tiny_model(init_std=0.3)
    with torch.no_grad():  # a policy near its reference, as after a few preference steps
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return policy, reference


def _samples(policy, reference, reduction: VarianceReduction, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mask_id = reference.config.mask_token_id
    with torch.no_grad():
        return torch.stack([reward_difference(policy, reference, PROMPT, ANSWER, reduction, mask_id, generator)
                            for _ in range(n)])


@pytest.mark.parametrize("reduction", [PLAIN_DPO, VarianceReduction(budget=4, masks_per_count=1, antithetic=True),
                                       VarianceReduction(budget=4, masks_per_count=2, antithetic=False)],
                         ids=["plain", "vrpo", "two-masks-per-count"])
def test_reward_difference_is_unbiased(models, reduction: VarianceReduction) -> None:
    policy, reference = models
    exact = exact_elbo(policy, PROMPT, ANSWER) - exact_elbo(reference, PROMPT, ANSWER)
    samples = _samples(policy, reference, reduction, 1500)
    stderr = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - exact) < 4 * stderr + 1e-9, (samples.mean().item(), exact, stderr)


def test_antithetic_sampling_and_budget_lower_the_variance(models) -> None:
    policy, reference = models
    independent = _samples(policy, reference, PLAIN_DPO, 800).var().item()
    antithetic = _samples(policy, reference, VarianceReduction(budget=1, antithetic=True), 800).var().item()
    vrpo = _samples(policy, reference, VarianceReduction(budget=4, antithetic=True), 800).var().item()
    print(f"variance of B̂_π - B̂_ref: independent {independent:.4g}, antithetic {antithetic:.4g} "
          f"({independent / antithetic:.1f}x lower), antithetic + budget 4 {vrpo:.4g} ({independent / vrpo:.1f}x)")
    assert antithetic < independent / 4
    assert vrpo < antithetic / 2


def test_draws_are_exact_counts_spread_over_timesteps() -> None:
    draws = draw(10, VarianceReduction(budget=8, masks_per_count=2), torch.Generator().manual_seed(3))
    assert draws.masked.sum(1).tolist() == draws.counts.tolist()
    assert len(set(draws.counts.tolist())) == 4  # four distinct counts, two masks each
    assert draws.counts.tolist() == [c for c in draws.counts.tolist()[::2] for _ in range(2)]
    with pytest.raises(ValueError, match="multiple"):
        draw(10, VarianceReduction(budget=6, masks_per_count=4))


def test_loss_is_dpo_of_the_margins_and_trains_only_the_policy(models) -> None:
    policy, reference = models
    mask_id = reference.config.mask_token_id
    pairs = [(PROMPT, ANSWER, torch.tensor([8, 8, 8])), (PROMPT[:2], torch.tensor([4, 5]), torch.tensor([6, 7]))]
    policy.zero_grad()
    loss = preference_loss(policy, reference, pairs, beta=0.1, reduction=VarianceReduction(budget=2), mask_id=mask_id,
                           generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loss.value, -torch.nn.functional.logsigmoid(0.1 * loss.margins).mean())
    loss.value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())
    with pytest.raises(ValueError, match="tokens"):
        elbo_estimate(policy, PROMPT, ANSWER, draw(4, PLAIN_DPO), mask_id)


@pytest.mark.parametrize("reduction", [VarianceReduction(budget=4, masks_per_count=2, antithetic=True), PLAIN_DPO],
                         ids=["antithetic", "independent"])
def test_packed_loss_equals_the_answer_by_answer_definition(models, reduction: VarianceReduction) -> None:
    """One padded pass per model (and a second policy pass for the gradient) gives the value and the
    gradient of DPO written out answer by answer with autograd, on the same draws."""
    policy, reference = models
    mask_id = reference.config.mask_token_id
    pairs = [(PROMPT, ANSWER, torch.tensor([8, 8, 8, 9, 10])), (PROMPT[:2], torch.tensor([4, 5]), torch.tensor([6]))]
    policy.zero_grad()
    packed = preference_loss(policy, reference, pairs, beta=0.7, reduction=reduction, mask_id=mask_id,
                             generator=torch.Generator().manual_seed(4))
    packed.value.backward()
    packed_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    generator = torch.Generator().manual_seed(4)
    margins = torch.stack([reward_difference(policy, reference, prompt, chosen, reduction, mask_id, generator)
                           - reward_difference(policy, reference, prompt, rejected, reduction, mask_id, generator)
                           for prompt, chosen, rejected in pairs])
    direct = -torch.nn.functional.logsigmoid(0.7 * margins).mean()
    direct.backward()
    torch.testing.assert_close(packed.margins, margins.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.value.double(), direct.double(), rtol=1e-6, atol=1e-6)
    for got, want in zip(packed_grads, (p.grad for p in policy.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # evaluation: the value alone, no second pass
        assert preference_loss(policy, reference, pairs, 0.7, reduction, mask_id,
                               torch.Generator().manual_seed(4)).value.item() == pytest.approx(direct.item())
