"""The LLaDA mask predictor: a bidirectional LLaMA-style Transformer on one device.

Pre-norm blocks (RMSNorm -> attention with RoPE -> residual; RMSNorm -> SwiGLU -> residual), a final
RMSNorm and an output projection, no biases. There is no causal mask unless ``causal=True`` is asked
for, which turns the same weights into the autoregressive baseline.

This module is only the network. File formats live in ``checkpoint.py``; caches, compilation and
sharding wrap the model from outside.

Shape glossary: B batch, L sequence length, E model width (d_model), H query heads, K key/value
heads, D head dimension (E / H), F SwiGLU width, V embedding rows (vocabulary).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llada.model.config import ModelConfig
from llada.model.fused_loss import linear_cross_entropy


@dataclass
class ModelOutput:
    """What a forward pass returns; ``.logits`` mirrors the official model's output object.

    With ``targets`` given, the forward pass returns ``weighted_nll`` instead of logits (see
    ``LLaDAModel.forward``).
    """

    logits: torch.Tensor | None = None  # (B, L, V)
    weighted_nll: torch.Tensor | None = None  # scalar, or the sums per group with target_groups


# Attention over keys and values: (q (B, H, L, D), k, v (B, K, T, D)) -> (B, L, H·D).
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the gain, as the official model does.

    Matching the order of the casts matters for bf16 parity: the official code normalises in float32,
    casts to the input dtype, then multiplies by the weight in that dtype.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """cos/sin tables for rotary embeddings, stacked as (2, length, head_dim), in float32.

    Uses the "rotate half" layout (the two halves of each head form the complex pairs), like the
    official LLaDA/OLMo code, and full float32 precision (``rope_full_precision``).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (length, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (length, D)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, L, D) by the angles of its positions; computed in (at least) float32."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    """One pre-norm Transformer block, with the official module names.

    The projections are kept as separate matrices (not fused into one q/k/v or gate/up matmul) so
    that every operation matches the official model's: fused matmuls round differently, and at
    temperature 0 a one-ulp difference in a bf16 confidence can reorder the sampler's choices.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        kv_width = config.n_kv_heads * config.head_dim
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_width, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_width, bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)  # SwiGLU gate
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, L, D) and keys/values (B, K, L, D), with RoPE applied at the given angles.

        ``fused``: one matmul through the stacked q/k/v matrix that ``fusion.fuse_projections`` left
        on the block (it rounds differently from three), when there is one.
        """
        stacked = getattr(self, "fused_qkv", None) if fused else None
        if stacked is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = _linear(stacked, x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        batch, length, _ = q.shape
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
             causal: bool = False) -> torch.Tensor:
        """Attention of queries (B, H, Lq, D) over keys/values (B, K, Lk, D), heads joined: (B, Lq, H·D)."""
        batch, _, length, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, Lq, D)
        return out.transpose(1, 2).reshape(batch, length, -1)

    def mlp(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """SwiGLU (B, L, E) -> (B, L, E); ``fused``: gate and up as one matmul, as in ``project_qkv``."""
        stacked = getattr(self, "fused_gate_up", None) if fused else None
        gate, up = (self.ff_proj(x), self.up_proj(x)) if stacked is None else _linear(stacked, x).chunk(2, dim=-1)
        return self.ff_out(F.silu(gate) * up)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention,
            fused: bool = False) -> torch.Tensor:
        """The block with the attention over keys and values left to ``attention`` (q, k, v) -> (B, L, H·D).

        The plain forward pass gives it SDPA over the same positions; the cached forward pass
        (``kv_cache.cached_forward``) attention over a cache. Both run this one definition of the
        block, so a change to the block changes both.
        """
        q, k, v = self.project_qkv(self.attn_norm(x), cos, sin, fused)
        x = x + self.attn_out(attention(q, k, v))  # (B, L, E)
        return x + self.mlp(self.ff_norm(x), fused)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        return self.run(x, rope[0], rope[1], functools.partial(self.sdpa, attn_mask=attn_mask, causal=causal))


def _linear(stacked: torch.Tensor | nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through a stacked weight matrix, or through a stacked quantized layer."""
    return F.linear(x, stacked) if isinstance(stacked, torch.Tensor) else stacked(x)


def attention_bias(attention_mask: torch.Tensor | None, length: int, causal: bool, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor | None:
    """Additive SDPA mask from a (B, L) padding mask of 1/0 and the causal flag; None if neither applies.

    Like the official model: padding hides *keys* only (a padded query still gets an ignored output),
    and the bias is 0 where attention is allowed and the dtype's lowest finite value elsewhere, in the
    model's dtype. None keeps SDPA on its fastest (flash) path, so pass no mask when nothing is padded.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=device).tril()  # (B, 1, L, L)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


def left_pad(prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int,
             width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and the (B, P) bool mask of real tokens; P is at least ``width``."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be (batch, length), got shape {tuple(prompts.shape)}")
        if prompts.shape[1] >= width:
            return prompts.long().cpu(), torch.ones(prompts.shape, dtype=torch.bool)
        prompts = prompts.tolist()
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(width, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = True
    return ids, mask


class LLaDAModel(nn.Module):
    """The mask predictor. ``model(input_ids, attention_mask=None).logits`` is (B, L, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = None if config.weight_tying else nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.register_buffer("rope", self._rope_tables(), persistent=False)  # (2, max_len, D)
        self.reset_parameters()

    def _rope_tables(self) -> torch.Tensor:
        # Always computed on the CPU and then moved, as the official model does: GPU sin/cos can
        # differ from the CPU's in the last bit, which would break bit-identical logits.
        tables = rope_tables(self.config.head_dim, self.config.max_sequence_length, self.config.rope_theta)
        return tables.to(self.wte.weight.device)

    def reset_rope(self) -> None:
        """Recompute the RoPE tables, e.g. after weights were loaded into a meta-initialised model."""
        self.rope = self._rope_tables()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights and unit norm gains; residual outputs scaled by 1/sqrt(2·layers)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or name == "ln_f.weight":
                param.fill_(1.0)
            elif name.endswith(("attn_out.weight", "ff_out.weight")) and name.startswith("blocks."):
                param.normal_(0.0, std / (2 * self.config.n_layers) ** 0.5)
            else:
                param.normal_(0.0, std)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.ff_out is None else self.ff_out.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal: bool = False, targets: torch.Tensor | None = None,
                target_weights: torch.Tensor | None = None, target_groups: torch.Tensor | None = None,
                target_group_count: int = 0) -> ModelOutput:
        """Logits for every position, or the training loss computed without them.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: optional (B, L) of 1 (real token) / 0 (padding). Padded keys are hidden,
                so a left-padded row gives the same logits at its real positions as the unpadded row.
            causal: attend only to earlier positions (the autoregressive baseline).
            targets: optional (B, L) token ids to score at each position; with ``target_weights``
                (B, L), the output is ``weighted_nll = Σ weight · cross-entropy`` computed by
                ``fused_loss.linear_cross_entropy`` (only positions with a non-zero weight go
                through the output projection, and no full logits tensor is made). Inside the
                forward pass so that wrappers that gather weights around ``forward`` (FSDP) see it.
            target_groups: optional (B, L) group index in [0, ``target_group_count``) per position:
                ``weighted_nll`` is then the (target_group_count,) sums per group (a sum per
                sequence, per answer or per token), for scoring without gradients.
        Returns:
            ModelOutput with ``logits`` (B, L, V) in the model's dtype, or with ``weighted_nll``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.max_sequence_length:
            raise ValueError(f"sequence length {length} exceeds max_sequence_length "
                             f"{self.config.max_sequence_length}; raise it in the config")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}")
        mask = attention_bias(attention_mask, length, causal, self.dtype, input_ids.device)
        rope = self.rope[:, :length]
        x = self.wte(input_ids)  # (B, L, E)
        for block in self.blocks:
            x = block(x, rope, mask, causal)
        x = self.ln_f(x)
        if targets is None:
            return ModelOutput(logits=F.linear(x, self.output_weight()))  # (B, L, V)
        if target_weights is None or targets.shape != input_ids.shape or target_weights.shape != input_ids.shape:
            raise ValueError("targets and target_weights must both be given with the shape of input_ids")
        if target_groups is not None and target_groups.shape != input_ids.shape:
            raise ValueError(f"target_groups must have the shape of input_ids, got {tuple(target_groups.shape)}")
        return ModelOutput(weighted_nll=linear_cross_entropy(
            x.flatten(0, 1), self.output_weight(), targets.flatten(), target_weights.flatten(),
            row_groups=None if target_groups is None else target_groups.flatten(), groups=target_group_count))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LLaDAModel:
        """Load a checkpoint directory in the official Hugging Face layout (see ``checkpoint.load_model``)."""
        from llada.model.checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | None = None) -> None:
        """Write the official layout atomically (see ``checkpoint.save_model``)."""
        from llada.model.checkpoint import save_model

        save_model(self, path, max_shard_size=max_shard_size, dtype=dtype)
