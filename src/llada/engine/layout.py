"""A batch's fixed geometry and its device tensors: what the forward passes and commits of one batch
read. ``BatchLayout`` never changes during a batch; ``BatchTensors`` is rebuilt when the batch's
number of rows changes (the tensors live in its cache's state, where captured steps find them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llada.model.kv_cache import KVCache


@dataclass(frozen=True)
class BatchLayout:
    """Every row's sequence: ``prompt_length`` (left-padded) prompt positions, then the answer's
    ``gen_length`` positions in blocks of ``block_length``. With classifier-free guidance
    (``cfg_scale`` > 0) the model sees each row twice: the rows, then their unconditional copies
    (prompt masked)."""

    prompt_length: int
    gen_length: int
    block_length: int
    mask_id: int
    cfg_scale: float

    @property
    def length(self) -> int:
        return self.prompt_length + self.gen_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 0

    def model_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows as the model sees them: with guidance, the unconditional copies (prompt masked) follow."""
        if not self.guided:
            return tokens
        unconditional = tokens.clone()
        if tokens.shape[1] == self.length:
            unconditional[:, :self.prompt_length] = self.mask_id
        return torch.cat([tokens, unconditional])

    def model_row_index(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """The model's rows of rows ``rows`` of a batch of ``batch``: with guidance, their unconditional copies follow."""
        return torch.cat([rows, rows + batch]) if self.guided else rows

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Unsupervised classifier-free guidance over the model's rows: u + (w + 1)(c - u)."""
        if not self.guided:
            return logits
        conditional, unconditional = logits.chunk(2)
        return unconditional + (self.cfg_scale + 1) * (conditional - unconditional)


@dataclass
class BatchTensors:
    """The device state of a batch of B rows (T = prompt + answer length, G = answer length,
    L = block length); every tensor but ``key_mask`` and ``key_bias`` is a state tensor of ``cache``."""

    cache: KVCache
    x: torch.Tensor  # (B, T) tokens; undecided answer positions hold the mask id
    # (B, G) bool. Decided-ness is tracked apart from the tokens: a model may propose the mask id itself.
    undecided: torch.Tensor
    # (B, G) bool, reuse_decided: decided positions whose keys/values in the cache were computed before
    # their decision (a block step stores them once more).
    unwritten: torch.Tensor
    offsets: torch.Tensor  # (B, L) answer positions of each row's current block
    key_mask: torch.Tensor | None  # (B, T) real tokens, or None when nothing is padded
    key_bias: torch.Tensor | None  # the model's additive bias from key_mask (its rows doubled with guidance)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def graph_key(self, prompt_length: int) -> tuple:
        """What every captured pass of this batch bakes in: its cache, shapes and prompt length."""
        return (id(self.cache), self.x.shape, self.undecided.shape, prompt_length,
                None if self.key_bias is None else self.key_bias.shape)
