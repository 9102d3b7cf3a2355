"""Training objectives as a table: what data each one reads, how it batches it and what loss it takes.

The trainer looks an objective up by name (``OBJECTIVES[config.objective]``) and never branches on
names. A new objective is a new entry: its dataset reader, its collate function and its loss over
the model the trainer runs (sharded or compiled), with the knobs of ``LossSettings``; one that
compares against a frozen reference model (the preference objectives) says so, and the trainer
builds the reference and hands it over in ``LossSettings.reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llada.diffusion.ar_sampling import generate_autoregressive
from llada.diffusion.losses import (
    Loss,
    answer_positions,
    autoregressive_loss,
    pretrain_loss,
    random_truncation,
    sft_loss,
)
from llada.diffusion.policy_gradient import GrpoSettings
from llada.diffusion.preference import PLAIN_DPO, VarianceReduction, preference_loss
from llada.diffusion.sampling import generate
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.packing import PackedDataset
from llada.training.preference_data import PreferenceDataset, collate_preference, split_pairs
from llada.training.prompt_data import PromptDataset
from llada.training.rollouts import RolloutMaker, collate_prompts, grpo_step_loss
from llada.training.sft_data import SFTDataset, collate_sft

Batch = dict[str, Any]  # tensors, and for RL the prompts' records and the prepared rollouts


@dataclass(frozen=True)
class LossSettings:
    """The recipe's numbers a loss may read, and whether the model is training (or evaluated)."""

    mask_id: int
    eps: float  # the lowest masking probability t (t ~ U(eps, 1])
    random_length_probability: float  # pretraining: the share of batches cut to a random length
    training: bool
    reference: torch.nn.Module | None = None  # the frozen model a preference objective compares against
    beta: float = 0.1  # preference: DPO's β
    reduction: VarianceReduction = PLAIN_DPO  # vrpo: how the ELBO estimates are drawn
    grpo: GrpoSettings = field(default_factory=GrpoSettings)  # grpo: the loss's knobs


@dataclass(frozen=True)
class Objective:
    """One training objective.

    ``dataset(path, seq_len)`` reads the prepared data; ``collate(samples, eos_id)`` makes a batch of
    tensors; ``loss(model, batch, settings, generator)`` is the scalar the trainer minimises (a
    ``Loss``), with ``batch["input_ids"]`` already on the model's device.
    """

    dataset: Callable[[Path, int], torch.utils.data.Dataset]
    collate: Callable[[list[Any], int], Batch]
    loss: Callable[[torch.nn.Module, Batch, LossSettings, torch.Generator], Loss]
    chat: bool  # samples are dialogues: sample prompts go through the chat template
    causal: bool  # the autoregressive baseline: sampled left to right
    per_token_bound: bool  # the evaluation loss bounds the NLL per token (so exp of it bounds perplexity)
    needs_reference: bool = False  # the loss reads LossSettings.reference
    # Objectives that make their own batches (RL rollouts): built by the trainer, its ``prepare(batch,
    # generator)`` turns each data micro-batch into what the loss reads, reused for rl.inner_steps steps.
    preparer: type[RolloutMaker] | None = None
    # A loss far above its running mean is a spike to skip (spike_factor); not for a policy-gradient
    # loss, which hovers around zero with either sign.
    spikes_detectable: bool = True


def _packed(path: Path, seq_len: int) -> PackedDataset:
    return PackedDataset(path, seq_len)


def _sft(path: Path, seq_len: int) -> SFTDataset:
    return SFTDataset(path)


def _stack(samples: list[torch.Tensor], eos_id: int) -> Batch:
    return {"input_ids": torch.stack(samples)}


def _pad_dialogues(samples: list[tuple[torch.Tensor, int]], eos_id: int) -> Batch:
    ids, prompt_lengths = collate_sft(samples, eos_id)
    return {"input_ids": ids, "prompt_lengths": prompt_lengths}


def _pretrain(model: torch.nn.Module, batch: Batch, settings: LossSettings, generator: torch.Generator) -> Loss:
    ids = batch["input_ids"]
    if settings.training:  # the paper cuts 1% of training batches to a random length; evaluation never
        ids = random_truncation(ids, settings.random_length_probability, generator=generator)
    return pretrain_loss(model, ids, settings.mask_id, eps=settings.eps, generator=generator)


def _sft_loss(model: torch.nn.Module, batch: Batch, settings: LossSettings, generator: torch.Generator) -> Loss:
    return sft_loss(model, batch["input_ids"], batch["prompt_lengths"], settings.mask_id, eps=settings.eps,
                    generator=generator)


def _autoregressive(model: torch.nn.Module, batch: Batch, settings: LossSettings,
                    generator: torch.Generator) -> Loss:
    return autoregressive_loss(model, batch["input_ids"])


def _autoregressive_sft(model: torch.nn.Module, batch: Batch, settings: LossSettings,
                        generator: torch.Generator) -> Loss:
    ids = batch["input_ids"]
    return autoregressive_loss(model, ids, loss_mask=answer_positions(ids, batch["prompt_lengths"]))


def _preference_data(path: Path, seq_len: int) -> PreferenceDataset:
    return PreferenceDataset(path)


def _preference(model: torch.nn.Module, batch: Batch, settings: LossSettings, generator: torch.Generator,
                reduction: VarianceReduction) -> Loss:
    if settings.reference is None:
        raise ValueError("a preference objective needs the frozen reference model in LossSettings.reference")
    result = preference_loss(model, settings.reference, split_pairs(batch), settings.beta, reduction,
                             settings.mask_id, generator)
    scored = batch["chosen_lengths"].sum() + batch["rejected_lengths"].sum()
    return Loss(value=result.value, n_masked=scored, n_tokens=int(batch["input_ids"].numel()),
                metrics={"reward_accuracy": result.accuracy, "reward_margin": float(result.margins.mean())})


def _dpo(model: torch.nn.Module, batch: Batch, settings: LossSettings, generator: torch.Generator) -> Loss:
    return _preference(model, batch, settings, generator, PLAIN_DPO)


def _vrpo(model: torch.nn.Module, batch: Batch, settings: LossSettings, generator: torch.Generator) -> Loss:
    return _preference(model, batch, settings, generator, settings.reduction)


def _prompts(path: Path, seq_len: int) -> PromptDataset:
    return PromptDataset(path)


def _grpo(model: torch.nn.Module, batch: Batch, settings: LossSettings, generator: torch.Generator) -> Loss:
    return grpo_step_loss(model, batch, settings.mask_id, settings.grpo)


OBJECTIVES: dict[str, Objective] = {
    "pretrain": Objective(dataset=_packed, collate=_stack, loss=_pretrain, chat=False, causal=False,
                          per_token_bound=True),
    "sft": Objective(dataset=_sft, collate=_pad_dialogues, loss=_sft_loss, chat=True, causal=False,
                     per_token_bound=False),
    "autoregressive": Objective(dataset=_packed, collate=_stack, loss=_autoregressive, chat=False, causal=True,
                                per_token_bound=True),
    "autoregressive_sft": Objective(dataset=_sft, collate=_pad_dialogues, loss=_autoregressive_sft, chat=True,
                                    causal=True, per_token_bound=False),
    "dpo": Objective(dataset=_preference_data, collate=collate_preference, loss=_dpo, chat=True, causal=False,
                     per_token_bound=False, needs_reference=True),
    "vrpo": Objective(dataset=_preference_data, collate=collate_preference, loss=_vrpo, chat=True, causal=False,
                      per_token_bound=False, needs_reference=True),
    "grpo": Objective(dataset=_prompts, collate=collate_prompts, loss=_grpo, chat=True, causal=False,
                      per_token_bound=False, needs_reference=True, preparer=RolloutMaker, spikes_detectable=False),
}


@torch.no_grad()
def greedy_text(model: LLaDAModel, tokenizer: Tokenizer, prompt: str, length: int, objective: Objective) -> str:
    """A greedy answer of at most ``length`` tokens to ``prompt`` as the objective trains the model to
    give it (the trainer's samples): through the chat template for dialogue objectives, decoded by the
    reference sampler (one block, one token per step) or left to right for the causal ones."""
    ids = tokenizer.ids
    tokens = (tokenizer.encode_chat([{"role": "user", "content": prompt}]) if objective.chat
              else tokenizer.encode(prompt, add_special_tokens=False))
    if objective.causal:
        answer = generate_autoregressive(model, tokens, length, stop_ids=(ids.eos, ids.eot))
    else:
        out = generate(model, torch.tensor([tokens], device=model.device), steps=length, gen_length=length,
                       block_length=length, mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot)
        answer = out[0, len(tokens):].tolist()
    stops = [i for i, token in enumerate(answer) if token in (ids.eos, ids.eot)]
    return tokenizer.decode(answer[:stops[0]] if stops else answer, skip_special_tokens=True)
