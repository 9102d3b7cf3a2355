"""Weight-only int8 quantization of the Transformer blocks: the 8B model in 9 GB instead of 16 GB.

The block projections are stored as int8 with one scale per output channel; activations stay in
the model's dtype and each projection computes ``(x @ W_int8.T) · scale``.

Measured (docs/engine.md): it saves memory but does not yet save time. A cached block step of the
8B model reads all its weights to process 32 tokens, so halving their size could nearly halve the
step; but with torch 2.11 on an H100, ``torch.compile``'s fused int8-to-bf16 matmul takes 100 µs
where the bf16 one takes 43 µs (32 × 4096 × 12288), and the compiled int8 step took 511 ms against
8.15 ms. A dedicated mixed-precision kernel is what would turn the saving into speed.
Accuracy on the demo model: 95% of answers identical to the unquantized model's in exact mode.

The embedding, norms and output projection are left as they are (the output projection is 6% of the
8B model's weights and the most sensitive to rounding). A quantized model is for inference: it can
no longer be saved in the official checkpoint layout.

FP8 (``quantize_fp8``): weights in float8 e4m3 with one scale per output channel, and each
projection's input cast to e4m3 at run time with one scale per token (dynamic scaling), so that the
product is a single fp8 tensor-core matmul (``torch._scaled_mm``) that reads half the bytes of bf16:
the block step of a memory-bound batch could approach half its bf16 time. Unlike int8 it needs no
dequantizing kernel, but both operands are rounded to 3 mantissa bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llada.model.fusion import bump_weights_version, unfuse_projections
from llada.model.transformer import LLaDAModel

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448, the largest e4m3 value
# Below this many rows Fp8Linear runs the plain (unit-scale) fp8 matmul and scales its output; from it
# on, PyTorch's row-wise scaled kernel, faster for compute-bound shapes (84 against 100 µs at 1,024
# rows; the four projections of a layer take about as long either way at 256 rows):
# benchmarks/results/engine/fp8_matmul_h200.json.
UNIT_SCALE_ROWS = 256
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


class Int8Linear(nn.Module):
    """``y = (x @ W_int8.T) · scale`` with symmetric per-output-channel scales (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach()
        absmax = weight.abs().amax(dim=1).float().clamp(min=1e-12)  # (out,)
        scales = absmax / 127.0
        quantized = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized)
        self.register_buffer("scales", scales.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in its scales' dtype."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]


class Fp8Linear(nn.Module):
    """``y = (fp8(x / s_x) @ W_fp8.T) · s_x · s_w``: e4m3 weights with per-output-channel scales ``s_w``,
    inputs scaled per token (``s_x``) and cast at run time; one ``torch._scaled_mm`` (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach()
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise ValueError(f"fp8 matmuls need both weight dimensions divisible by 16, got {tuple(weight.shape)}")
        scales = weight.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX  # (out,)
        self.register_buffer("weight", (weight.float() / scales[:, None]).to(torch.float8_e4m3fn))
        self.register_buffer("scales", scales[None, :].contiguous())  # (1, out) float32, as _scaled_mm wants
        self.register_buffer("unit", torch.ones((), device=weight.device), persistent=False)

    @classmethod
    def stacked(cls, layers: list[Fp8Linear]) -> Fp8Linear:
        """One layer computing ``layers``' outputs side by side (for fused q/k/v and gate/up matmuls);
        the layers' buffers become views of its own. Scales are per output channel, so the stacked
        layer rounds exactly as the separate ones do."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.register_buffer("weight", torch.cat([layer.weight for layer in layers]))
        fused.register_buffer("scales", torch.cat([layer.scales for layer in layers], dim=1))
        fused.register_buffer("unit", layers[0].unit, persistent=False)
        start = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight = fused.weight[start:start + rows]
            layer.scales = fused.scales[:, start:start + rows]
            start += rows
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        row_scales = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (M, 1)
        quantized = (rows.float() / row_scales).to(torch.float8_e4m3fn)
        # CUDA's scaled matmuls write bfloat16 here; the CPU ones write any float dtype.
        out_dtype = x.dtype if x.device.type == "cpu" else torch.bfloat16
        if rows.shape[0] < UNIT_SCALE_ROWS:
            # Few rows (the engine's block steps): the plain fp8 matmul, scaled afterwards, is faster than
            # the row-wise scaled kernel (18 µs against 26 µs for 32 × 4096 → 12288 on an H200). The
            # raw product rounds to bfloat16 once more before scaling: 0.2% next to fp8's few %. Unscaled
            # products reach 448² per term, beyond float16: on the CPU they are written in float32 (or 64).
            raw_dtype = torch.promote_types(out_dtype, torch.float32) if x.device.type == "cpu" else out_dtype
            raw = torch._scaled_mm(quantized, self.weight.t(), scale_a=self.unit, scale_b=self.unit,
                                   out_dtype=raw_dtype)
            out = raw.to(torch.promote_types(raw.dtype, torch.float32)) * row_scales * self.scales
        else:
            out = torch._scaled_mm(quantized, self.weight.t(), scale_a=row_scales, scale_b=self.scales,
                                   out_dtype=out_dtype)
        return out.view(*x.shape[:-1], -1).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32."""
        return self.weight.float() * self.scales.T


@torch.no_grad()
def _replace_projections(model: LLaDAModel, layer_type: type[nn.Module], kind: str) -> LLaDAModel:
    if getattr(model, "quantized", None):
        raise ValueError(f"the model is already quantized ({model.quantized})")
    if layer_type is Fp8Linear and model.device.type == "cuda" and torch.cuda.get_device_capability(model.device) < (8, 9):
        raise ValueError(f"fp8 matmuls need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(model.device)} has {torch.cuda.get_device_capability(model.device)}")
    unfuse_projections(model)  # an engine's fused bf16 matrices would bypass the quantized layers
    bump_weights_version(model)  # the layers below are replaced: engines made before refuse to run
    for block in model.blocks:
        for name in BLOCK_PROJECTIONS:
            layer = getattr(block, name)
            if isinstance(layer, nn.Linear):
                setattr(block, name, layer_type(layer.weight))
    model.quantized = kind
    return model


def quantize_int8(model: LLaDAModel) -> LLaDAModel:
    """Replace every block projection of ``model`` (in place) with an ``Int8Linear``; returns the model."""
    return _replace_projections(model, Int8Linear, "int8")


def quantize_fp8(model: LLaDAModel) -> LLaDAModel:
    """Replace every block projection of ``model`` (in place) with an ``Fp8Linear``; returns the model."""
    return _replace_projections(model, Fp8Linear, "fp8")


QUANTIZERS = {"int8": quantize_int8, "fp8": quantize_fp8}  # by name, for command lines
