"""The reference sampler against a plain re-statement of the paper's algorithm, batching, options and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from llada.diffusion.sampling import _guided_logits, add_gumbel_noise, generate, num_transfer_tokens, validate_schedule

MASK = 511


def spec_generate(model, prompt: list[int], steps: int, gen_length: int, block_length: int) -> list[int]:
    """Greedy low-confidence decoding of one prompt, written from the paper's description.

    Blocks left to right; steps split evenly over blocks; step s of a block with m masks commits
    m // steps (+1 for the first m % steps steps) masked positions *of that block* with the highest
    probability of their argmax token.
    """
    x = prompt + [MASK] * gen_length
    per_block = steps // (gen_length // block_length)
    for block in range(gen_length // block_length):
        start = len(prompt) + block * block_length
        block_positions = range(start, start + block_length)
        m = sum(x[i] == MASK for i in block_positions)
        schedule = [m // per_block + (1 if s < m % per_block else 0) for s in range(per_block)]
        for k in schedule:
            with torch.no_grad():
                probs = torch.softmax(model(torch.tensor([x])).logits[0], dim=-1)
            candidates = []
            for i in block_positions:
                if x[i] == MASK:
                    token = int(probs[i].argmax())
                    candidates.append((float(probs[i, token]), i, token))
            for _, i, token in sorted(candidates, reverse=True)[:k]:
                x[i] = token
    return x


@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 8), (4, 8, 4), (6, 12, 4), (3, 8, 8)])
def test_greedy_matches_the_algorithm_statement(steps: int, gen_length: int, block_length: int) -> None:
    model = tiny_model()
    prompt = torch.randint(0, 500, (5,), generator=torch.Generator().manual_seed(steps))
    out = generate(model, prompt[None], steps=steps, gen_length=gen_length, block_length=block_length)
    assert out[0].tolist() == spec_generate(model, prompt.tolist(), steps, gen_length, block_length)


def test_left_padded_batch_equals_single_prompts() -> None:
    model = tiny_model()
    short, long = torch.randint(0, 500, (3,)), torch.randint(0, 500, (7,))
    pad = model.config.pad_token_id
    batch = torch.stack([torch.cat([torch.full((4,), pad), short]), long])
    mask = torch.tensor([[0] * 4 + [1] * 3, [1] * 7])
    settings = {"steps": 8, "gen_length": 16, "block_length": 8}
    out = generate(model, batch, attention_mask=mask, **settings)
    assert torch.equal(out[0, 4:], generate(model, short[None], **settings)[0])
    assert torch.equal(out[1], generate(model, long[None], **settings)[0])


def test_output_keeps_prompt_and_fills_every_mask() -> None:
    model = Steered(tiny_model(), MASK, slice(None), bonus=-100.0)  # an untrained model may predict [MASK]
    prompt = torch.randint(0, 500, (2, 4))
    for remasking in ("low_confidence", "random"):
        out = generate(model, prompt, steps=4, gen_length=8, block_length=4, remasking=remasking,
                       temperature=0.7, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 12) and torch.equal(out[:, :4], prompt) and not (out == MASK).any()


def test_sampling_is_reproducible_and_random() -> None:
    model = tiny_model()
    prompt = torch.randint(0, 500, (1, 4))

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, steps=8, gen_length=8, temperature=1.0, remasking="random",
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_gumbel_max_samples_from_the_softmax() -> None:
    """argmax of the perturbed logits has the distribution softmax(logits / T)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(40000, -1)
    temperature = 0.8
    draws = add_gumbel_noise(logits, temperature, torch.Generator().manual_seed(0)).argmax(-1)
    frequencies = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(logits[0].double() / temperature, dim=0)
    assert (frequencies - expected).abs().max() < 0.01
    assert add_gumbel_noise(logits, 0.0) is logits


def test_transfer_schedule() -> None:
    mask = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    schedule = num_transfer_tokens(mask, 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


class Steered(nn.Module):
    """Wraps a model and adds a large bonus to one token's logit at chosen positions; records inputs."""

    def __init__(self, model, token: int, positions: slice, bonus: float = 50.0) -> None:
        super().__init__()
        self.inner, self.token, self.positions, self.bonus = model, token, positions, bonus
        self.config = model.config
        self.inputs: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, x, attention_mask=None):
        self.inputs.append(x.clone())
        out = self.inner(x, attention_mask=attention_mask)
        out.logits[:, self.positions, self.token] += self.bonus
        return out


def test_logits_eos_inf_forbids_eos() -> None:
    model = tiny_model()
    eos = model.config.eos_token_id
    steered = Steered(model, eos, slice(None))
    prompt = torch.randint(0, 500, (1, 4))
    assert (generate(steered, prompt, steps=8, gen_length=8)[0, 4:] == eos).all()
    assert not (generate(steered, prompt, steps=8, gen_length=8, logits_eos_inf=True)[0, 4:] == eos).any()


def test_confidence_eos_eot_inf_commits_eos_last() -> None:
    """A position whose prediction is EOS (even a confident one) is decided at the block's last step."""
    model = tiny_model()
    eos = model.config.eos_token_id
    prompt = torch.randint(0, 500, (1, 4))
    steered = Steered(model, eos, slice(4, 5))  # answer position 0 confidently predicts EOS
    generate(steered, prompt, steps=8, gen_length=8)
    assert steered.inputs[1][0, 4] == eos  # normally it is committed first
    steered.inputs.clear()
    out = generate(steered, prompt, steps=8, gen_length=8, confidence_eos_eot_inf=True)
    assert out[0, 4] == eos
    assert all(x[0, 4] == MASK for x in steered.inputs)  # still masked in every forward pass


def test_cfg_formula_and_padding() -> None:
    model = tiny_model()
    x = torch.randint(0, 500, (2, 6))
    x[:, 3:] = MASK
    prompt_index = x != MASK
    guided = _guided_logits(model, x, None, prompt_index, 1.5, MASK)
    unconditional = torch.where(prompt_index, MASK, x)
    cond, un = model(x).logits, model(unconditional).logits
    torch.testing.assert_close(guided, un + 2.5 * (cond - un))
    out = generate(model, x[:, :3], attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), steps=4, gen_length=4,
                   cfg_scale=1.0)
    assert not (out == MASK).any()


def test_on_block_streams_each_block() -> None:
    model = tiny_model()
    seen = []
    generate(model, torch.randint(0, 500, (1, 3)), steps=6, gen_length=12, block_length=4,
             on_block=lambda x, block: seen.append((block, int((x[0, 3:] == MASK).sum()))))
    assert seen == [(0, 8), (1, 4), (2, 0)]


@pytest.mark.parametrize("kwargs,message", [
    ({"gen_length": 10, "block_length": 4}, "multiple of block_length"),
    ({"gen_length": 8, "block_length": 4, "steps": 3}, "multiple of the number of blocks"),
    ({"gen_length": 8, "block_length": 8, "steps": 16}, "cannot exceed gen_length"),
    ({"remasking": "top_p"}, "unknown remasking"),
    ({"temperature": -1.0}, "temperature"),
    ({"cfg_scale": -0.5}, "cfg_scale"),
    ({"gen_length": 0}, "gen_length must be positive"),
])
def test_invalid_settings_explain_the_fix(kwargs: dict, message: str) -> None:
    settings = {"steps": 8, "gen_length": 8, "block_length": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), torch.zeros(1, 2, dtype=torch.long), **settings)


def test_invalid_shapes() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4), steps=4, gen_length=4)
    with pytest.raises(ValueError, match="batch, length"):
        generate(model, torch.zeros(1, 2, 3, dtype=torch.long), steps=4, gen_length=4)


def test_validate_schedule_suggests_values() -> None:
    with pytest.raises(ValueError, match="block_length=2"):
        validate_schedule(10, 4, 2)
    with pytest.raises(ValueError, match="block_length=10"):
        validate_schedule(10, 16, 2)
    assert validate_schedule(256, 32, 64) == 8
