"""diffu-GRPO: group advantages, which tokens count, the one-pass log-probabilities (random prompt
mask, completion fully masked), and the clipped loss with its KL penalty, whose value and gradient
are checked against autograd through full logits on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llada.diffusion.policy_gradient import (
    GrpoSettings,
    Rollouts,
    completion_mask,
    draw_prompt_mask,
    group_advantages,
    grpo_loss,
    grpo_objective,
    log_prob_rows,
)

END = 99


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    scaled = group_advantages(rewards, 4)
    first = rewards[:4] - 0.5
    torch.testing.assert_close(scaled[:4], first / (first.std() + 1e-4))
    assert scaled[4:].abs().max() == 0  # equal rewards teach nothing
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], first)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_completion_mask_counts_tokens_up_to_the_first_end() -> None:
    completions = torch.tensor([[5, END, 7, END], [5, 6, 7, 8], [END, 1, 2, 3]])
    assert completion_mask(completions, (END,)).tolist() == [[True, True, False, False], [True] * 4,
                                                             [True, False, False, False]]


def _rollouts(generator: torch.Generator) -> Rollouts:
    prompts = torch.randint(0, 200, (4, 6), generator=generator)
    prompt_real = torch.ones(4, 6, dtype=torch.bool)
    prompt_real[1, :2] = False  # a left-padded prompt
    completions = torch.randint(0, 200, (4, 5), generator=generator)
    completions[2, 3] = END
    return Rollouts(prompts, prompt_real, completions, completion_mask(completions, (END,)))


def test_rows_mask_the_whole_completion_and_a_share_of_the_real_prompt() -> None:
    model = tiny_model()
    mask_id = model.config.mask_token_id
    rollouts = _rollouts(torch.Generator().manual_seed(0))
    rows = log_prob_rows(rollouts, draw_prompt_mask(rollouts.prompt_real, 0.3, torch.Generator().manual_seed(1)),
                         mask_id)
    assert (rows.ids[:, 6:] == mask_id).all()
    assert rows.attention is not None and not rows.attention[1, :2].any()
    assert not (rows.ids[1, :2] == mask_id).any()  # padding is never masked
    assert rows.weights[2].tolist() == [0.0] * 6 + [1.0] * 4 + [0.0]
    many = Rollouts(torch.randint(0, 200, (200, 50)), torch.ones(200, 50, dtype=torch.bool),
                    torch.randint(0, 200, (200, 2)), torch.ones(200, 2, dtype=torch.bool))
    hidden = draw_prompt_mask(many.prompt_real, 0.15, torch.Generator().manual_seed(2))
    share = (log_prob_rows(many, hidden, mask_id).ids[:, :50] == mask_id).float().mean()
    assert abs(share.item() - 0.15) < 0.01


def _brute_force_log_probs(model, rows, shape) -> torch.Tensor:
    logits = model(rows.ids, attention_mask=rows.attention).logits[:, -shape[1]:]
    return logits.log_softmax(-1).gather(-1, rows.targets[:, -shape[1]:, None]).squeeze(-1)


@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_loss_and_gradient_equal_autograd_through_full_logits(ratio: str) -> None:
    policy, reference = tiny_model(init_std=0.1), tiny_model(seed=1, init_std=0.1)
    rollouts = _rollouts(torch.Generator().manual_seed(3))
    hidden = draw_prompt_mask(rollouts.prompt_real, 0.15, torch.Generator().manual_seed(4))
    rows = log_prob_rows(rollouts, hidden, policy.config.mask_token_id)
    shape, real = rollouts.completions.shape, rollouts.completion_real
    with torch.no_grad():
        current = _brute_force_log_probs(policy, rows, shape)
        reference_log_probs = _brute_force_log_probs(reference, rows, shape)
    old = current - 0.4 + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=current.dtype)
    advantages = torch.tensor([1.0, -0.5, 2.0, -2.5], dtype=current.dtype)
    settings = GrpoSettings(clip=0.2, kl=0.1, ratio=ratio)
    policy.zero_grad()
    loss = grpo_loss(policy, rows, old, reference_log_probs, advantages, real, settings)
    loss.value.backward()
    fused = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    direct, _, clipped = grpo_objective(_brute_force_log_probs(policy, rows, shape), old, reference_log_probs,
                                        advantages, real, settings)
    direct.backward()
    torch.testing.assert_close(loss.log_probs * real, current * real)
    torch.testing.assert_close(loss.value, direct.detach())
    for got, want in zip(fused, (p.grad for p in policy.parameters())):
        torch.testing.assert_close(got, want)
    assert 0 < loss.clip_fraction < 1 and (clipped & real).any()  # the test exercises clipping
    assert loss.kl > 0


def test_first_update_is_the_plain_policy_gradient() -> None:
    """old = current and no KL: every ratio is 1, nothing is clipped, the loss is -mean(A)."""
    policy = tiny_model(init_std=0.1)
    rollouts = _rollouts(torch.Generator().manual_seed(6))
    hidden = draw_prompt_mask(rollouts.prompt_real, 0.15, torch.Generator().manual_seed(7))
    rows = log_prob_rows(rollouts, hidden, policy.config.mask_token_id)
    current = rows.scores(policy).view(rollouts.completions.shape)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=current.dtype)
    loss = grpo_loss(policy, rows, current, current, advantages, rollouts.completion_real, GrpoSettings(kl=0.0))
    assert loss.value.item() == pytest.approx(-advantages.mean().item(), abs=1e-12)
    assert loss.clip_fraction == 0 and loss.kl == 0
    with pytest.raises(ValueError, match="prompt_mask"):
        GrpoSettings(prompt_mask=1.0).validate()


def test_kl_penalty_estimates_the_kl_divergence_to_the_reference() -> None:
    """With zero advantages the loss is β times the mean k3 estimate, whose mean over tokens drawn
    from π is KL(π || π_ref), computed here exactly for two categorical distributions."""
    generator = torch.Generator().manual_seed(8)
    policy = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    reference = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    tokens = torch.multinomial(policy, 200_000, replacement=True, generator=generator).view(1000, 200)
    log_probs, reference_log_probs = policy.log()[tokens], reference.log()[tokens]
    loss, kl, _ = grpo_objective(log_probs, log_probs, reference_log_probs, torch.zeros(1000, dtype=torch.float64),
                                 torch.ones_like(tokens, dtype=torch.bool), GrpoSettings(kl=0.5))
    exact = (policy * (policy / reference).log()).sum().item()
    assert (kl >= 0).all()
    assert loss.item() == pytest.approx(0.5 * exact, rel=0.02)
