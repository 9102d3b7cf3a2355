"""Quantized block weights (int8 weight-only, fp8): the rounding bounds, and generation on a quantized model."""

from __future__ import annotations

import pytest
import torch
from engine_support import model, prompts

from llada.engine.engine import Engine, GenerationSettings
from llada.model.checkpoint import CheckpointError
from llada.model.quantize import (
    BLOCK_PROJECTIONS,
    FP8_MAX,
    UNIT_SCALE_ROWS,
    Fp8Linear,
    Int8Linear,
    quantize_fp8,
    quantize_int8,
)


def test_int8_linear_is_within_half_a_step_of_the_weight() -> None:
    weight = torch.randn(24, 16, dtype=torch.float64) * torch.linspace(0.01, 3, 24, dtype=torch.float64)[:, None]
    layer = Int8Linear(weight)
    assert layer.weight.dtype == torch.int8 and layer.scales.shape == (24,)
    error = (layer.dequantized() - weight).abs()
    assert (error <= layer.scales[:, None] / 2 + 1e-12).all()  # round to nearest: half a step at most
    assert (layer.weight.abs().amax(1) == 127).all()  # each row's largest weight uses the full range
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.dequantized().T)


@pytest.mark.parametrize("rows", [5, UNIT_SCALE_ROWS])  # the unit-scale path and the row-wise scaled one
def test_fp8_linear_equals_the_matmul_of_its_rounded_operands(rows: int) -> None:
    """Independent truth: round the weight per output channel and the input per row to e4m3 by hand,
    multiply in float64; the fp8 layer must give that product."""
    weight = torch.randn(32, 48, dtype=torch.float64) * torch.linspace(0.01, 3, 32, dtype=torch.float64)[:, None]
    layer = Fp8Linear(weight)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scales.shape == (1, 32)
    assert (layer.weight.float().abs().amax(1) == FP8_MAX).all()  # each row uses the full range
    assert ((layer.dequantized().double() - weight).abs() <= weight.abs() / 16 + 1e-12).all()  # 3 mantissa bits
    x = torch.randn(2, rows, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    row_scales = x.abs().amax(-1, keepdim=True).float() / FP8_MAX  # float32 scales, as the layer's
    rounded_x = (x.float() / row_scales).to(torch.float8_e4m3fn).double() * row_scales.double()
    expected = rounded_x @ layer.dequantized().double().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # float32 accumulation
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear(torch.randn(24, 16))


def test_fp8_linear_on_float16_inputs_stays_finite() -> None:
    """Unscaled fp8 products (up to 448² per term) overflow float16; the layer must not write them there."""
    generator = torch.Generator().manual_seed(0)
    layer = Fp8Linear(torch.randn(64, 64, generator=generator).half())
    x = torch.randn(4, 64, generator=generator).half()
    out = layer(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    row_scales = x.float().abs().amax(-1, keepdim=True) / FP8_MAX
    rounded = (x.float() / row_scales).to(torch.float8_e4m3fn).float() * row_scales
    torch.testing.assert_close(out.float(), rounded @ layer.dequantized().T, rtol=2e-3, atol=2e-3)  # float16 output


# fp8 rounds activations too: on this random tiny model, whose confidences are nearly tied, that
# reorders many choices (the trained demo model keeps 99% of its tokens: docs/engine.md).
@pytest.mark.parametrize(("quantize", "layer_type", "tolerance", "min_agreement"),
                         [(quantize_int8, Int8Linear, 0.05, 0.5), (quantize_fp8, Fp8Linear, 0.25, 0.1)])
def test_quantized_model_generates_and_refuses_to_be_saved(tmp_path, quantize, layer_type, tolerance,
                                                          min_agreement) -> None:
    net = model()
    rows = prompts((4, 6))
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", steps=16, early_stop=False)
    before = Engine(net).generate(rows, settings)
    reference_logits = net(torch.tensor([rows[0]])).logits
    quantize(net)
    assert all(isinstance(getattr(b, name), layer_type) for b in net.blocks for name in BLOCK_PROJECTIONS)
    logits = net(torch.tensor([rows[0]])).logits
    assert (logits - reference_logits).norm() / reference_logits.norm() < tolerance  # int8 a few %, fp8 (3-bit mantissas on both sides) ~15%
    after = Engine(net).generate(rows, settings)
    agreement = sum((a.answer == b.answer).float().mean().item() for a, b in zip(after, before)) / len(rows)
    assert agreement > min_agreement
    assert all(r.answer.ne(net.config.mask_token_id).all() for r in after)  # every position decided
    with pytest.raises(CheckpointError, match="quantized"):
        net.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_fp8(net)
