"""Weight-only int8 quantization: the rounding bound, and generation on a quantized model."""

from __future__ import annotations

import pytest
import torch
from test_engine import model, prompts

from llada.checkpoint import CheckpointError
from llada.engine import Engine, GenerationSettings
from llada.quantize import BLOCK_PROJECTIONS, Int8Linear, quantize_int8


def test_int8_linear_is_within_half_a_step_of_the_weight() -> None:
    weight = torch.randn(24, 16, dtype=torch.float64) * torch.linspace(0.01, 3, 24, dtype=torch.float64)[:, None]
    layer = Int8Linear(weight)
    assert layer.weight.dtype == torch.int8 and layer.scales.shape == (24,)
    error = (layer.dequantized() - weight).abs()
    assert (error <= layer.scales[:, None] / 2 + 1e-12).all()  # round to nearest: half a step at most
    assert (layer.weight.abs().amax(1) == 127).all()  # each row's largest weight uses the full range
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.dequantized().T)


def test_quantized_model_generates_and_refuses_to_be_saved(tmp_path) -> None:
    net = model()
    rows = prompts((4, 6))
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", steps=16, early_stop=False)
    before = Engine(net).generate(rows, settings)
    reference_logits = net(torch.tensor([rows[0]])).logits
    quantize_int8(net)
    assert all(isinstance(getattr(b, name), Int8Linear) for b in net.blocks for name in BLOCK_PROJECTIONS)
    logits = net(torch.tensor([rows[0]])).logits
    assert (logits - reference_logits).norm() / reference_logits.norm() < 0.05  # int8: a few % on this tiny model
    after = Engine(net).generate(rows, settings)
    agreement = sum((a.answer == b.answer).float().mean().item() for a, b in zip(after, before)) / len(rows)
    assert agreement > 0.5
    with pytest.raises(CheckpointError, match="quantized"):
        net.save_pretrained(tmp_path / "q")
