"""Training recipes: typed dataclasses read from YAML, with ``--set key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key: a typo in a recipe must not
silently train something else.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llada.engine.options import settings_from_options
from llada.model.config import ModelConfig
from llada.training.schedule import ScheduleName

# A run directory's layout: checkpoints/step-N/, and the records of every step and of the samples.
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

# autoregressive_sft: the causal baseline fine-tuned on chat data, with loss on answer tokens only;
# dpo: DPO over single-draw ELBO estimates; vrpo: the same with the preference section's variance reductions;
# grpo: diffu-GRPO, RL with verifiable rewards (the rl section).
Objective = Literal["pretrain", "sft", "autoregressive", "autoregressive_sft", "dpo", "vrpo", "grpo"]

# The block projections, by their names in the official checkpoint layout (LoRA's default targets).
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "tiny"  # architecture preset (see llada.model.config.PRESETS); ignored with init_from
    init_from: str | None = None  # start from this checkpoint directory (fine-tuning)
    tokenizer: str | None = None  # tokenizer directory saved with checkpoints (default: init_from)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset


@dataclass(kw_only=True)
class DataSection:
    path: str = ""  # made by `llada data tokenize` (pretrain, autoregressive), `data sft` or `data preference` (dpo, vrpo)
    seq_len: int = 1024  # training sequence length for packed data; SFT pads each batch to its longest
    eval_fraction: float = 0.01  # share of sequences held out for evaluation (taken from the end)
    random_length_probability: float = 0.01  # pretraining batches cut to a random length (paper: 1%)


@dataclass(kw_only=True)
class PreferenceSection:
    """DPO / VRPO (LLaDA 1.5): each ELBO is estimated from ``budget`` draws; ``dpo`` uses one draw."""

    beta: float = 0.1  # strength of the pull toward the reference (DPO's β)
    budget: int = 8  # vrpo: Monte-Carlo draws per ELBO estimate
    masks_per_count: int = 1  # vrpo: masks per timestep; 1 = the optimal allocation (budget timesteps)
    antithetic: bool = True  # vrpo: policy and reference scored on the same timesteps and masks


@dataclass(kw_only=True)
class RLSection:
    """diffu-GRPO (d1): per step, ``batch_size`` prompts, ``group_size`` completions each, scored by rewards."""

    group_size: int = 8  # completions per prompt (G)
    inner_steps: int = 1  # μ: optimiser steps per batch of rollouts, each under a fresh prompt mask
    prompt_mask: float = 0.15  # share of prompt tokens masked in the log-probability pass
    clip: float = 0.2  # ε of the clipped ratio
    kl: float = 0.04  # β of the KL penalty toward the reference
    scale_rewards: bool = True  # divide advantages by the group's reward standard deviation
    ratio: Literal["token", "sequence"] = "token"  # importance ratio per token (GRPO) or per completion
    rewards: list[str] = field(default_factory=lambda: ["exact_answer"])  # built-in names or module:function
    reward_weights: list[float] = field(default_factory=list)  # one per reward (default: all 1)
    rollout: dict[str, Any] = field(default_factory=dict)  # generation settings of the rollouts (GenerationSettings)


@dataclass(kw_only=True)
class LoraSection:
    """Low-rank adapters through ``peft``: the base weights are frozen (bf16 on GPUs) and only the
    adapters train. rank 0 trains every weight."""

    rank: int = 0
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(BLOCK_PROJECTIONS))  # block projections to adapt


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 4e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr / peak lr
    schedule: ScheduleName = "wsd"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to norms and embeddings
    grad_clip: float = 1.0  # max global gradient norm (0 = off)


@dataclass(kw_only=True)
class TrainConfig:
    objective: Objective = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    lora: LoraSection = field(default_factory=LoraSection)
    rl: RLSection = field(default_factory=RLSection)
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # sequences per optimiser step, over all processes
    micro_batch_size: int | None = None  # sequences per forward pass and process (default: no accumulation)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # autocast dtype on GPU (CPU runs in float32)
    compile: bool = False  # torch.compile the model
    fsdp: bool | None = None  # shard with FSDP2; None = when running on several processes
    activation_checkpointing: bool = False  # recompute each block in the backward pass to save memory
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200  # 0 = never
    eval_batches: int = 4
    save_every: int = 500  # 0 = only at the end
    keep_last: int = 3  # checkpoints kept on disk
    mask_eps: float = 1e-3  # floor of the mask probability
    spike_factor: float = 3.0  # a loss above this multiple of its running mean is a spike (0 = off)
    max_bad_steps: int = 3  # consecutive skipped steps before rolling back to the last checkpoint
    rollback_lr_factor: float = 0.5  # lr multiplier applied at each rollback
    peak_tflops: float | None = None  # per-device peak for MFU (default: known GPUs, else no MFU)
    tensorboard: bool = False  # also log metrics to out_dir/tensorboard (needs the tensorboard package)
    sample_every: int = 0  # generate from sample_prompts every this many steps (0 = never)
    sample_prompts: list[str] = field(default_factory=lambda: ["The"])  # chat-formatted for sft
    sample_length: int = 32  # tokens generated per sample

    def validate(self) -> None:
        """Every value checked before anything is created, each error naming its key."""
        self._validate_ranges()
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        if not self.data.path:
            raise ValueError("data.path is required (a directory made by `llada data tokenize` or `llada data sft`)")
        if self.data.seq_len < 2:
            raise ValueError("data.seq_len must be >= 2")
        if not 0 <= self.data.eval_fraction < 1:
            raise ValueError("data.eval_fraction must be in [0, 1)")
        if self.keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        if self.sample_every and (self.sample_length < 1 or not self.sample_prompts):
            raise ValueError("sampling needs sample_length >= 1 and at least one sample prompt")
        preference = self.preference
        if preference.beta <= 0:
            raise ValueError(f"preference.beta must be positive, got {preference.beta}")
        if preference.budget < 1 or preference.masks_per_count < 1 or preference.budget % preference.masks_per_count:
            raise ValueError(f"preference.budget ({preference.budget}) must be a positive multiple of "
                             f"preference.masks_per_count ({preference.masks_per_count})")
        lora = self.lora
        if lora.rank < 0 or not 0 <= lora.dropout < 1:
            raise ValueError(f"lora.rank must be >= 0 and lora.dropout in [0, 1), got {lora.rank} and {lora.dropout}")
        if unknown := sorted(set(lora.targets) - set(BLOCK_PROJECTIONS)):
            raise ValueError(f"lora.targets: {unknown[0]!r} is not a block projection; choose from {BLOCK_PROJECTIONS}")
        if lora.rank and not lora.targets:
            raise ValueError("lora.targets is empty: name at least one block projection to adapt")
        self._validate_rl()
        if (lora.rank or self.objective in ("dpo", "vrpo", "grpo")) and not self.model.init_from:
            raise ValueError(f"{'LoRA' if lora.rank else self.objective} starts from a trained model: set model.init_from")


    def _validate_ranges(self) -> None:
        optim, data = self.optim, self.data
        checks = [("log_every", self.log_every >= 1, ">= 1"), ("eval_every", self.eval_every >= 0, ">= 0 (0 = never)"),
                  ("save_every", self.save_every >= 0, ">= 0 (0 = only at the end)"),
                  ("sample_every", self.sample_every >= 0, ">= 0 (0 = never)"), ("eval_batches", self.eval_batches >= 1, ">= 1"),
                  ("mask_eps", 0 < self.mask_eps < 1, "in (0, 1)"), ("spike_factor", self.spike_factor >= 0, ">= 0"),
                  ("max_bad_steps", self.max_bad_steps >= 1, ">= 1"),
                  ("rollback_lr_factor", 0 < self.rollback_lr_factor <= 1, "in (0, 1]"),
                  ("optim.lr", optim.lr > 0, "positive"), ("optim.warmup_steps", optim.warmup_steps >= 0, ">= 0"),
                  ("optim.decay_fraction", 0 <= optim.decay_fraction <= 1, "in [0, 1]"),
                  ("optim.min_lr_ratio", 0 <= optim.min_lr_ratio <= 1, "in [0, 1]"),
                  ("optim.weight_decay", optim.weight_decay >= 0, ">= 0"), ("optim.grad_clip", optim.grad_clip >= 0, ">= 0"),
                  ("optim.eps", optim.eps > 0, "positive"), ("optim.betas", all(0 <= b < 1 for b in optim.betas), "in [0, 1)"),
                  ("data.random_length_probability", 0 <= data.random_length_probability <= 1, "in [0, 1]")]
        for key, valid, expected in checks:
            if not valid:
                value = recipe_value(self, key)
                raise ValueError(f"{key} must be {expected}, got {value!r}")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown := sorted(set(self.model.overrides) - fields):
            raise ValueError(f"model.overrides: unknown field {unknown[0]!r}; model fields: {sorted(fields)}")

    def _validate_rl(self) -> None:
        rl = self.rl
        if rl.group_size < 2 or rl.inner_steps < 1:
            raise ValueError(f"rl.group_size must be >= 2 and rl.inner_steps >= 1, got {rl.group_size} and "
                             f"{rl.inner_steps}")
        if not 0 <= rl.prompt_mask < 1 or rl.clip <= 0 or rl.kl < 0:
            raise ValueError(f"rl.prompt_mask must be in [0, 1), rl.clip positive and rl.kl >= 0, got "
                             f"{rl.prompt_mask}, {rl.clip} and {rl.kl}")
        if not rl.rewards or (rl.reward_weights and len(rl.reward_weights) != len(rl.rewards)):
            raise ValueError(f"rl.rewards needs at least one reward and rl.reward_weights one weight per reward, "
                             f"got {rl.rewards} and {rl.reward_weights}")
        try:
            settings_from_options(rl.rollout)
        except ValueError as error:
            raise ValueError(f"rl.rollout: {error}") from error


def recipe_value(config: TrainConfig, key: str) -> Any:
    """The value of a dotted recipe key (``optim.lr``)."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to ``hint`` where lossless (int -> float, list -> tuple), else a ValueError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, key)
            except ValueError:
                continue
        raise ValueError(f"{key}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{key}: expected null")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ValueError(f"{key}: {value!r} is not one of {typing.get_args(hint)}")
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(hint)):
            return tuple(_check_type(v, h, key) for v, h in zip(value, typing.get_args(hint)))
        raise ValueError(f"{key}: expected a list of {len(typing.get_args(hint))} values, got {value!r}")
    if origin is list:
        if isinstance(value, list):
            return [_check_type(v, typing.get_args(hint)[0], key) for v in value]
        raise ValueError(f"{key}: expected a list, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested sections; errors name the key."""
    if not isinstance(data, dict):
        problem = f"{prefix or 'config'}: expected a mapping, got {data!r}"
        raise ValueError(problem)  # noqa: TRY004 - bad data, not a bad call
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {sorted(names)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**values)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML, so numbers, booleans and lists work) to ``data``."""
    key, separator, raw = assignment.partition("=")
    if not separator or not key:
        raise ValueError(f"override {assignment!r} must look like key=value, e.g. optim.lr=3e-4")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problem = f"override {assignment!r}: {part} is not a section"
            raise ValueError(problem)  # noqa: TRY004 - bad data, not a bad call
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML recipe (or start from defaults with None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
    for assignment in overrides:
        apply_override(data, assignment)
    config = from_dict(TrainConfig, data)
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A plain mapping (tuples as lists) that ``load_config`` reads back to an equal config."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
