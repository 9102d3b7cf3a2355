"""What callers of the engine import: how to decode (``GenerationSettings``) and what comes back
(``Generation`` per prompt, ``StepUpdate`` per step). Plain data with no engine behind it, so that the
scheduler, the server, the command line and evaluation depend on these and not on the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llada.diffusion.sampling import REMASKING_CHOICES, Remasking
from llada.engine.decoding import POLICIES, Policy

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES: tuple[str, ...] = ("none", "prefix", "dual")


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Defaults: dual cache, confidence threshold 0.9, blocks of 32 (Fast-dLLM's)."""

    gen_length: int = 128
    block_length: int = 32
    policy: Policy = "threshold"
    steps: int | None = None  # fixed policy: total steps (None = gen_length, one token per step)
    threshold: float = 0.9
    factor: float = 1.0
    cache: CacheMode = "dual"
    refresh_every: int = 0  # also refresh the cache every N steps inside a block (0 = block starts only)
    # Approximate modes: after a row's first refresh, later refreshes recompute the answer's keys/values
    # only and keep the prompt's from that first pass (the prompt is encoded once, as in an
    # autoregressive model): a refresh over gen_length positions instead of prompt + gen_length.
    keep_prompt: bool = False
    # Dual cache: block steps recompute only the block's undecided positions and those decided since
    # their keys/values were last stored; the other decided positions are read from the cache (each is
    # computed once more after it is decided). Fewer queries per step: for large, compute-bound batches.
    reuse_decided: bool = False
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: Remasking = "low_confidence"
    early_stop: bool = True  # stop a row once its answer up to an end-of-text token is decided
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def validate(self, max_length: int | None = None, prompt_length: int = 0) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {self.gen_length}")
        if not 0 < self.block_length <= self.gen_length:
            raise ValueError(f"block_length must be between 1 and gen_length ({self.gen_length}), got {self.block_length}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {CACHE_MODES}")
        if self.remasking not in REMASKING_CHOICES:
            raise ValueError(f"unknown remasking {self.remasking!r}; choose one of {REMASKING_CHOICES}")
        if self.policy == "fixed":
            steps = self.total_steps
            blocks = self.gen_length // self.block_length
            if not blocks <= steps <= self.gen_length or steps % blocks:
                raise ValueError(f"steps must be a multiple of the number of blocks ({blocks}) between {blocks} and "
                                 f"gen_length ({self.gen_length}), got {steps}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")
        if self.reuse_decided and self.cache != "dual":
            raise ValueError(f"reuse_decided needs cache='dual' (got {self.cache!r}): the other modes recompute the "
                             "decided positions anyway")
        if self.keep_prompt and self.cache == "none":
            raise ValueError("keep_prompt needs a cache (prefix or dual): cache='none' refreshes everything every step")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if max_length is not None and prompt_length + self.gen_length > max_length:
            raise ValueError(f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}) exceeds the model's "
                             f"max_sequence_length {max_length}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length


@dataclass
class StepUpdate:
    """What one step decided, for streaming. Tensors are on the CPU; rows are the caller's prompt order."""

    step: int  # steps run so far in this batch (1 = the first)
    blocks: list[int]  # each row's block being decoded (the number of blocks once it is finished or dropped)
    answer: torch.Tensor  # (B, G) the answers so far; undecided positions hold the mask id
    decided: torch.Tensor  # (B, G) bool: decided by this step
    finished: list[bool]  # rows whose answer is complete (never a dropped row)


@dataclass
class Generation:
    """One prompt's result."""

    answer: torch.Tensor  # (G,) all answer positions (after an early stop, the tail is end-of-text)
    tokens: list[int]  # the answer up to and including its first end-of-text token (EOS or EoT)
    steps: int  # denoising steps this row took part in
    finish_reason: Literal["stop", "length"]  # "stop": ended with an end-of-text token
