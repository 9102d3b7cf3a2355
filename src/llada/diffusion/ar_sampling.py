"""Left-to-right generation with the same network run causally: the autoregressive baseline's sampler.

The paper compares LLaDA with an autoregressive model of the same architecture; ``llada train`` with
``objective: autoregressive`` / ``autoregressive_sft`` trains it, and this generates from it (greedy
or with temperature), one token per forward pass over the whole prefix — simple and exact, meant for
the small baselines of the experiments, not for serving.
"""

from __future__ import annotations

import torch

from llada.model.transformer import LLaDAModel


@torch.no_grad()
def generate_autoregressive(model: LLaDAModel, prompt: list[int], max_new_tokens: int,
                            stop_ids: tuple[int, ...] = (), temperature: float = 0.0,
                            generator: torch.Generator | None = None) -> list[int]:
    """The generated ids (without the prompt), ending at the first stop id (included) or after
    ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens = list(prompt)
    limit = model.config.max_sequence_length
    for _ in range(max_new_tokens):
        if len(tokens) >= limit:
            break
        logits = model(torch.tensor([tokens], device=model.device), causal=True).logits[0, -1].double()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probabilities = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probabilities, 1, generator=generator))
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens[len(prompt):]
