"""What callers of the engine import: how to decode (``GenerationSettings``) and what comes back
(``Generation`` per prompt, ``StepUpdate`` per step). Plain data with no engine behind it, so that the
scheduler, the server, the command line and evaluation depend on these and not on the engine."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llada.diffusion.sampling import REMASKING_CHOICES, Remasking
from llada.engine.decoding import POLICIES, Policy

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES: tuple[str, ...] = typing.get_args(CacheMode)


@dataclass(frozen=True)
class CacheBehaviour:
    """What a cache mode means for a batch's steps (``passes.py`` runs them)."""

    # Refresh every step with the model's own arithmetic: token for token the reference sampler.
    exact: bool
    # Block steps query from the rows' earliest block to the end (only the prefix is cached), so rows
    # move from block to block together and join only while all are in their first block.
    shared_suffix: bool
    # Block steps may query only the positions that changed (``reuse_decided``).
    sparse: bool


CACHE_BEHAVIOURS: dict[str, CacheBehaviour] = {
    "none": CacheBehaviour(exact=True, shared_suffix=False, sparse=False),
    "prefix": CacheBehaviour(exact=False, shared_suffix=True, sparse=False),  # Fast-dLLM's PrefixCache
    "dual": CacheBehaviour(exact=False, shared_suffix=False, sparse=True),  # Fast-dLLM's DualCache
}


def _setting(default: Any, help: str, off: str | None = None) -> Any:
    """A settings field with its default and the help its command-line flag shows (``off``: the help of
    the ``--no-...`` flag of a setting that is on by default)."""
    return field(default=default, metadata={"help": help, "off": off})


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Defaults: dual cache, confidence threshold 0.9, blocks of 32 (Fast-dLLM's)."""

    # Each field's help is the command line's (``cli.common.add_sampling`` makes one flag per field).
    gen_length: int = _setting(128, "answer length in tokens (default 128)")
    block_length: int = _setting(32, "semi-autoregressive block size (default 32)")
    policy: Policy = _setting("threshold", "tokens committed per step: threshold (engine default), factor, or "
                              "fixed (--steps in total; the reference sampler's rule)")
    steps: int | None = _setting(None, "fixed policy: denoising steps in total (default: gen length, one token "
                                 "per step)")
    threshold: float = _setting(0.9, "threshold policy: confidence τ (default 0.9)")
    factor: float = _setting(1.0, "factor policy: f (default 1)")
    cache: CacheMode = _setting("dual", "engine KV cache: dual (default), prefix, or none (exact: a full forward "
                                "per step)")
    refresh_every: int = _setting(0, "engine: also refresh the cache every N steps within a block (default 0: "
                                  "block starts only)")
    # Approximate modes: after a row's first refresh, later refreshes recompute the answer's keys/values
    # only and keep the prompt's from that first pass (the prompt is encoded once, as in an
    # autoregressive model): a refresh over gen_length positions instead of prompt + gen_length.
    keep_prompt: bool = _setting(False, "engine, prefix/dual cache: encode the prompt once; later refreshes "
                                 "recompute the answer only (faster refreshes, one more approximation; docs/engine.md)")
    # Dual cache: block steps recompute only the block's undecided positions and those decided since
    # their keys/values were last stored; the other decided positions are read from the cache (each is
    # computed once more after it is decided). Fewer queries per step: for large, compute-bound batches.
    reuse_decided: bool = _setting(False, "engine, dual cache: block steps recompute only undecided (and just "
                                   "decided) positions; fewer queries per step for large batches (an "
                                   "approximation; docs/engine.md)")
    temperature: float = _setting(0.0, "0 = greedy (default)")
    cfg_scale: float = _setting(0.0, "classifier-free guidance (default 0 = off)")
    remasking: Remasking = _setting("low_confidence", "which proposals to commit first: low_confidence (the most "
                                    "confident, default) or random")
    early_stop: bool = _setting(True, "engine: stop a row once its answer up to an end-of-text token is decided",
                                off="engine: decode every block even after the answer has ended")
    logits_eos_inf: bool = _setting(False, "never propose the end-of-text token (the official setting for some "
                                    "benchmarks)")
    confidence_eos_eot_inf: bool = _setting(False, "never commit end-of-text/end-of-turn tokens by confidence "
                                            "(the official setting for some benchmarks)")

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
        if self.reuse_decided and not self.cache_behaviour.sparse:
            raise ValueError(f"reuse_decided needs cache='dual' (got {self.cache!r}): the other modes recompute the "
                             "decided positions anyway")
        if self.keep_prompt and self.cache_behaviour.exact:
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
    def cache_behaviour(self) -> CacheBehaviour:
        return CACHE_BEHAVIOURS[self.cache]

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
