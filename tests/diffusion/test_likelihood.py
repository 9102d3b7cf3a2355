"""The Monte-Carlo ELBO against its exact value, enumerated over every mask set on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_elbo, tiny_model

from llada.diffusion.likelihood import log_likelihood, packed_elbo_samples

MASK = 511


def test_estimate_agrees_with_exact_elbo() -> None:
    model = tiny_model()
    prompt, answer = torch.randint(0, 500, (3,)), torch.randint(0, 500, (4,))
    exact = exact_elbo(model, prompt, answer)
    estimate = log_likelihood(model, prompt, answer, mc_num=1024, batch_size=16,
                              generator=torch.Generator().manual_seed(0))
    assert estimate.num_samples == 1024
    assert 0 < estimate.stderr < 0.02 * abs(exact)
    assert abs(estimate.log_likelihood - exact) < 4 * estimate.stderr, (estimate, exact)


def test_single_token_answer_is_exact() -> None:
    """One answer token: the only mask set is {it}, so one pass gives log p exactly (stderr 0)."""
    model = tiny_model()
    prompt, answer = torch.randint(0, 500, (5,)), torch.randint(0, 500, (1,))
    estimate = log_likelihood(model, prompt, answer, mc_num=128)
    noisy = torch.cat([prompt, torch.tensor([MASK])])[None]
    expected = F.log_softmax(model(noisy).logits[0, -1], dim=-1)[answer[0]].item()
    assert estimate.log_likelihood == pytest.approx(expected, rel=1e-12)
    assert estimate.stderr == 0.0 and estimate.num_samples == 1


def test_cfg_combines_conditional_and_unconditional_logits() -> None:
    model = tiny_model()
    prompt, answer = torch.randint(0, 500, (3,)), torch.randint(0, 500, (1,))
    cond = model(torch.cat([prompt, torch.tensor([MASK])])[None]).logits[0, -1]
    un = model(torch.full((1, 4), MASK)).logits[0, -1]
    expected = F.log_softmax(un + 3.0 * (cond - un), dim=-1)[answer[0]].item()
    assert log_likelihood(model, prompt, answer, cfg_scale=2.0).log_likelihood == pytest.approx(expected, rel=1e-12)


def test_reproducible_and_uneven_batches() -> None:
    model = tiny_model()
    prompt, answer = torch.randint(0, 500, (2,)), torch.randint(0, 500, (5,))

    def run(seed: int, mc_num: int = 40, batch_size: int = 16):
        return log_likelihood(model, prompt, answer, mc_num=mc_num, batch_size=batch_size,
                              generator=torch.Generator().manual_seed(seed))

    assert run(3) == run(3)
    assert run(3).log_likelihood != run(4).log_likelihood
    single_batch = run(0, mc_num=8, batch_size=8)
    assert single_batch.num_samples == 8 and math.isfinite(single_batch.stderr)


@pytest.mark.parametrize("kwargs,message", [
    ({"answer": torch.tensor([], dtype=torch.long)}, "empty"),
    ({"answer": torch.zeros(1, 3, dtype=torch.long)}, "1-D"),
    ({"mc_num": 0}, "mc_num"),
    ({"cfg_scale": -1.0}, "cfg_scale"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"prompt": torch.zeros(2, dtype=torch.long), "answer": torch.zeros(3, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match=message):
        log_likelihood(tiny_model(), **arguments)


def test_packed_samples_equal_one_item_at_a_time() -> None:
    """Items of different prompt and answer lengths (one of one token) in one left-padded pass give
    the estimates that ``log_likelihood`` gives item by item with the same generator."""
    model = tiny_model()
    items = [(torch.randint(0, 500, (p,)), torch.randint(0, 500, (a,))) for p, a in ((5, 3), (2, 6), (7, 1), (1, 4))]
    packed = packed_elbo_samples(model, items, num_samples=6, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    for (prompt, answer), samples in zip(items, packed):
        alone = log_likelihood(model, prompt, answer, mc_num=6, batch_size=6, generator=generator)
        assert samples.numel() == (1 if answer.numel() == 1 else 6)
        assert float(samples.double().mean()) == pytest.approx(alone.log_likelihood, rel=1e-9, abs=1e-9)
