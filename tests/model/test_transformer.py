"""The mask predictor against a naive second implementation, padding invariance, causal switch and errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from llada.model.checkpoint import to_official
from llada.model.transformer import LLaDAModel

P = "model.transformer."


def naive_forward(weights: dict[str, torch.Tensor], config, ids: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Logits for one sequence (L,) from official-named weights, written with loops and complex RoPE.

    Independent of the package: per-head attention by explicit softmax, RoPE as multiplication of
    (first half, second half) pairs by e^{i·pos·freq}, SwiGLU = silu(ff_proj x) * up_proj x.
    """
    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.rms_norm_eps))

    def rope(x):  # (L, D) -> rotated
        half = x.shape[-1] // 2
        freqs = config.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
        angle = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * freqs[None, :]
        z = torch.complex(x[:, :half], x[:, half:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    length, d = ids.shape[0], config.head_dim
    x = weights[P + "wte.weight"][ids]
    group = config.n_heads // config.n_kv_heads
    for i in range(config.n_layers):
        w = {k[len(f"{P}blocks.{i}."):]: v for k, v in weights.items() if k.startswith(f"{P}blocks.{i}.")}
        h = rms(x, w["attn_norm.weight"])
        q, k, v = h @ w["q_proj.weight"].T, h @ w["k_proj.weight"].T, h @ w["v_proj.weight"].T
        heads = []
        for head in range(config.n_heads):
            kv = head // group
            qh = rope(q[:, head * d:(head + 1) * d])
            kh = rope(k[:, kv * d:(kv + 1) * d])
            scores = qh @ kh.T / math.sqrt(d)
            if causal:
                scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), -math.inf)
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv * d:(kv + 1) * d])
        x = x + torch.cat(heads, dim=-1) @ w["attn_out.weight"].T
        h = rms(x, w["ff_norm.weight"])
        gate, up = h @ w["ff_proj.weight"].T, h @ w["up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w["ff_out.weight"].T
    x = rms(x, weights[P + "ln_f.weight"])
    out = weights[P + "wte.weight"] if config.weight_tying else weights[P + "ff_out.weight"]
    return x @ out.T


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "weight_tying": True}])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_implementation(overrides: dict, causal: bool) -> None:
    """Same logits as an independent loop implementation on the official weight names (MHA, GQA, MQA, tied)."""
    model = tiny_model(**overrides)
    with torch.no_grad():  # random norm gains so that the gain is exercised too
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
    weights = {k: v.detach() for k, v in to_official(model.state_dict()).items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    logits = model(ids, causal=causal).logits
    for row in range(2):
        expected = naive_forward(weights, model.config, ids[row], causal=causal)
        torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-6)  # RoPE tables are float32


def test_bidirectional_and_causal() -> None:
    """Without the causal flag a later token changes earlier logits; with it, it cannot."""
    model = tiny_model()
    ids = torch.randint(0, 500, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 500
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])
    torch.testing.assert_close(model(ids, causal=True).logits[0, :-1], model(changed, causal=True).logits[0, :-1])


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_with_attention_mask_matches_unpadded(causal: bool) -> None:
    """Rows of a left-padded batch give the logits of the same rows run alone (RoPE is relative)."""
    model = tiny_model()
    short, long = torch.randint(0, 500, (5,)), torch.randint(0, 500, (9,))
    pad = model.config.pad_token_id
    batch = torch.stack([torch.cat([torch.full((4,), pad), short]), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    logits = model(batch, attention_mask=mask, causal=causal).logits
    torch.testing.assert_close(logits[0, 4:], model(short[None], causal=causal).logits[0])
    torch.testing.assert_close(logits[1], model(long[None], causal=causal).logits[0])


def test_all_ones_mask_equals_no_mask() -> None:
    model = tiny_model()
    ids = torch.randint(0, 500, (3, 7))
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)


def test_output_and_properties() -> None:
    model = tiny_model(torch.float32)
    out = model(torch.zeros(2, 3, dtype=torch.long))
    assert out.logits.shape == (2, 3, model.config.embedding_size)
    assert out.logits.dtype == torch.float32 and model.device.type == "cpu"


def test_bf16_forward_close_to_fp32() -> None:
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 500, (2, 16))
    reference = model(ids).logits
    low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_gradients_flow() -> None:
    model = tiny_model(torch.float32)
    model.train()
    model(torch.randint(0, 500, (2, 6))).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_are_explained() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="batch, length"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(torch.zeros(1, model.config.max_sequence_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_meta_construction_allocates_nothing() -> None:
    """The 8B architecture can be instantiated on the meta device (how checkpoints are loaded)."""
    from llada.model.config import preset

    with torch.device("meta"):
        model = LLaDAModel(preset("8b"))
    assert all(p.is_meta for p in model.parameters())
