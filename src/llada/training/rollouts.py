"""diffu-GRPO in the trainer: rollouts, rewards, and the batches the updates reuse.

Every ``rl.inner_steps`` optimiser steps, each process takes its share of ``batch_size`` prompts and,
per micro-batch, ``Rollouts.prepare`` makes what the updates need:

- ``group_size`` completions per prompt, decoded with the recipe's ``rl.rollout`` generation
  settings (the engine on one process; under FSDP the reference sampler, whose fixed step count
  keeps the processes' forward passes in step);
- their rewards and group advantages;
- for each inner step, a fresh random prompt mask, the reference model's per-token
  log-probabilities under it and, from the second inner step on, the rollout policy's (the "old"
  log-probabilities of the ratio; at the first step the policy is still the rollout policy).

The prepared batches are kept (``RolloutCycle``) and written into checkpoints, so a run resumed in
the middle of a cycle repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from llada.diffusion.losses import Loss
from llada.diffusion.policy_gradient import (
    GrpoSettings,
    Rollouts,
    completion_mask,
    draw_prompt_mask,
    group_advantages,
    grpo_loss,
    log_prob_rows,
)
from llada.engine.answer_text import answer_text
from llada.engine.engine import Engine
from llada.engine.generation import batch_answers
from llada.engine.options import settings_from_options
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel, left_pad
from llada.training.config import TrainConfig
from llada.training.rewards import resolve_reward, score

Batch = dict[str, Any]


def grpo_settings(config: TrainConfig) -> GrpoSettings:
    rl = config.rl
    return GrpoSettings(prompt_mask=rl.prompt_mask, clip=rl.clip, kl=rl.kl, scale_rewards=rl.scale_rewards,
                        ratio=rl.ratio)


def collate_prompts(samples: list[tuple[torch.Tensor, dict]], eos_id: int) -> Batch:
    """Prompts left-padded (``input_ids``, ``prompt_real``) with their records (``records``)."""
    ids, real = left_pad([prompt.tolist() for prompt, _ in samples], eos_id)
    return {"input_ids": ids, "prompt_real": real, "records": [record for _, record in samples]}


class RolloutMaker:
    """Turns a batch of prompts into a prepared batch for the GRPO updates (see the module doc)."""

    def __init__(self, model: LLaDAModel, forward_model: torch.nn.Module, reference: torch.nn.Module,
                 tokenizer: Tokenizer, config: TrainConfig, sharded: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        rl = config.rl
        self.model, self.forward_model, self.reference = model, forward_model, reference
        self.tokenizer, self.rl, self.sharded, self.autocast = tokenizer, rl, sharded, autocast
        self.settings = settings_from_options(rl.rollout)
        if sharded and self.settings.policy != "fixed":  # the engine's data-dependent step count would desync FSDP
            self.settings = settings_from_options({"policy": "fixed"}, self.settings)
        self.grpo = grpo_settings(config)
        self.rewards = [resolve_reward(name) for name in rl.rewards]
        self.weights = rl.reward_weights or [1.0] * len(rl.rewards)
        self.engine: Engine | None = None
        self.end_ids = tuple(i for i in (tokenizer.ids.eos, tokenizer.ids.eot) if i is not None)

    def _generate(self, prompts: list[list[int]], generator: torch.Generator) -> torch.Tensor:
        """(N, gen_length) completions, decoded by the rollout policy as it is now."""
        if not self.sharded and self.engine is None:
            # Unfused: the engine then calls the blocks' own projections, so LoRA adapters take part,
            # and the optimiser's in-place updates reach the next rollouts (captured graphs included).
            self.engine = Engine(self.model, fuse=False)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                answers = batch_answers(self.forward_model if self.sharded else self.model, prompts,
                                        self.settings, self.engine, generator)
        finally:
            self.model.train(training)
        return torch.tensor(answers, dtype=torch.long, device=self.model.device)

    def _mismatch(self, rollouts: Rollouts) -> float:
        """Mean |Δ log p| per counted completion token between the model as the engine runs it (its
        own dtype, no autocast; the engine's refresh pass equals that forward pass) and as the
        updates run it (autocast, compiled or sharded), on the same input: the prompt clean and the
        completion masked, the rollouts' first denoising step. Non-zero where the two numerics differ
        (float32 master weights sampled in float32 but trained under bf16 autocast, say)."""
        rows = log_prob_rows(rollouts, torch.zeros_like(rollouts.prompt_real), self.model.config.mask_token_id)
        sampled = rows.scores(self.model)
        with self.autocast():
            trained = rows.scores(self.forward_model)
        real = rollouts.completion_real.flatten()
        return float(((sampled.float() - trained.float()).abs() * real).sum() / real.sum().clamp(min=1))

    def prepare(self, batch: Batch, generator: torch.Generator, inner_steps: int | None = None) -> Batch:
        """The prepared batch for ``inner_steps`` updates (default ``rl.inner_steps``; an evaluation
        reads the first only)."""
        group = self.rl.group_size
        device = self.model.device
        real_prompts = [row[keep].tolist() for row, keep in zip(batch["input_ids"], batch["prompt_real"])]
        prompts = [prompt for prompt in real_prompts for _ in range(group)]
        records = [record for record in batch["records"] for _ in range(group)]
        start = time.perf_counter()
        completions = self._generate(prompts, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        real = completion_mask(completions, self.end_ids)
        texts = [answer_text(self.tokenizer, row) for row in completions.tolist()]
        total, values = score(self.rl.rewards, self.rewards, self.weights, texts, records)
        advantages = group_advantages(total, group, self.grpo.scale_rewards).to(device)
        rollouts = Rollouts(batch["input_ids"].repeat_interleave(group, 0).to(device),
                             batch["prompt_real"].repeat_interleave(group, 0).to(device), completions, real)
        mismatch = self._mismatch(rollouts)
        hidden, old, reference = [], [], []
        for inner in range(self.rl.inner_steps if inner_steps is None else inner_steps):
            hidden.append(draw_prompt_mask(rollouts.prompt_real, self.grpo.prompt_mask, generator))
            rows = log_prob_rows(rollouts, hidden[-1], self.model.config.mask_token_id)
            with self.autocast():
                reference.append(rows.scores(self.reference).view(real.shape).float())
                old.append(None if inner == 0 else rows.scores(self.forward_model).view(real.shape).float())
        grouped = total.view(-1, group)
        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
                   "zero_variance_groups": float((grouped.std(1) == 0).float().mean()),
                   "rollout_tokens_per_s": completions.numel() / seconds, "rollout_seconds": seconds,
                   "completion_length": float(real.sum(1).float().mean()), "logprob_mismatch": mismatch,
                   **{f"reward_{name}": float(values[:, k].mean()) for k, name in enumerate(self.rl.rewards)}}
        return {"input_ids": rollouts.prompts, "prompt_real": rollouts.prompt_real, "completions": completions,
                "completion_real": real, "advantages": advantages, "hidden": hidden, "old": old,
                "reference": reference, "metrics": metrics}



def grpo_step_loss(model: torch.nn.Module, batch: Batch, mask_id: int, settings: GrpoSettings) -> Loss:
    """The loss of one inner step (``batch["inner_step"]``) on a prepared batch."""
    inner = batch["inner_step"]
    real = batch["completion_real"]
    rollouts = Rollouts(batch["input_ids"], batch["prompt_real"], batch["completions"], real)
    rows = log_prob_rows(rollouts, batch["hidden"][inner], mask_id)
    result = grpo_loss(model, rows, batch["old"][inner], batch["reference"][inner], batch["advantages"], real,
                       settings)
    # Every step's record carries the figures of the rollouts it learns from (with log_every > 1 and
    # several inner steps, logging them at the first inner step only could skip them all).
    metrics = {"kl": result.kl, "clip_fraction": result.clip_fraction, **batch["metrics"]}
    return Loss(value=result.value, n_masked=real.sum(), n_tokens=int(rows.ids.numel()), metrics=metrics)


class RolloutCycle:
    """The micro-batches of each step for an objective that prepares its batches: prepared afresh
    every ``inner_steps`` steps and reused in between; their state travels in checkpoints."""

    def __init__(self, prepare: Callable[..., Batch], inner_steps: int, world: int) -> None:
        self.prepare, self.inner_steps, self.world = prepare, inner_steps, world
        self.prepared: list[Batch] | None = None

    def batches(self, step: int, fresh: Callable[[], Iterator[Batch]],
                generator: Callable[[int, int], torch.Generator]) -> list[Batch]:
        """This step's micro-batches; ``fresh()`` gives new data micro-batches, ``generator(micro,
        count)`` the randomness of micro-batch ``micro`` of ``count``."""
        if self.prepared is None or step % self.inner_steps == 0:
            raw = list(fresh())
            self.prepared = [self.prepare(batch, generator(micro, len(raw))) for micro, batch in enumerate(raw)]
        return [{**batch, "inner_step": step % self.inner_steps} for batch in self.prepared]

    def state_dict(self) -> list[list[Batch]] | None:
        """Every process's prepared batches (on the CPU), gathered to all of them; None between cycles."""
        mine = None if self.prepared is None else [_to(batch, "cpu") for batch in self.prepared]
        if self.world == 1:
            return [mine]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def load_state_dict(self, state: list[list[Batch]] | None, rank: int, device: torch.device) -> None:
        """This process's prepared batches back; with another number of processes, none (the cycle
        starts over with new rollouts at its next boundary, so resume is exact only at boundaries)."""
        if state is None or len(state) != self.world or state[rank] is None:
            self.prepared = None
            return
        self.prepared = [_to(batch, device) for batch in state[rank]]


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_to(item, device) for item in value]
    return value
