"""The autoregressive baseline's sampler against a plain argmax loop."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llada.diffusion.ar_sampling import generate_autoregressive


def test_greedy_equals_the_argmax_loop_over_prefixes() -> None:
    """With one layer, the causal logits at the last position equal the bidirectional model run on the
    prefix alone: an independent way to compute each next token."""
    model = tiny_model(n_layers=1, init_std=0.3)
    prompt = torch.randint(0, 500, (5,)).tolist()
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    assert generate_autoregressive(model, prompt, 6) == tokens[5:]


def test_stops_and_errors() -> None:
    model = tiny_model(init_std=0.3)
    prompt = [1, 2, 3]
    free = generate_autoregressive(model, prompt, 8)
    stopped = generate_autoregressive(model, prompt, 8, stop_ids=(free[2],))
    assert stopped == free[:free.index(free[2]) + 1]
    sampled = generate_autoregressive(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(sampled) == 8
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_autoregressive(model, prompt, 0)
    with pytest.raises(ValueError, match="at least one token"):
        generate_autoregressive(model, [], 4)
