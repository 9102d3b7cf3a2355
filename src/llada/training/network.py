"""The networks a training run holds: the model it trains (built from a preset or a checkpoint,
optionally with LoRA adapters) and the frozen reference a preference objective compares against.

With LoRA the base weights are frozen (in bf16 on GPUs, half the memory of float32 master weights)
and the reference is the same network with its adapters switched off: no second copy. Without LoRA
the reference is a second, frozen copy of the starting checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llada.model.checkpoint import load_model
from llada.model.config import preset
from llada.model.lora import add_lora
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.config import TrainConfig
from llada.training.parallelize import apply_activation_checkpointing

if TYPE_CHECKING:
    from peft import PeftModel


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the forward passes run in under autocast (and FSDP gathers weights in): bf16 on GPUs
    when the recipe asks for it, None (no autocast: float32) otherwise."""
    return torch.bfloat16 if device.type == "cuda" and config.dtype == "bfloat16" else None


def frozen_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype of weights that never train: the autocast dtype, else float32."""
    return autocast_dtype(config, device) or torch.float32


def build_model(config: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> LLaDAModel:
    """The model to train, in training mode: the checkpoint ``model.init_from`` (float32 master
    weights, or frozen base weights for LoRA) or a fresh preset sized to the tokenizer."""
    ids = tokenizer.ids
    if config.model.init_from:
        dtype = frozen_dtype(config, device) if config.lora.rank else torch.float32
        model = load_model(config.model.init_from, dtype=dtype, device=device)
    else:
        torch.manual_seed(config.seed)
        architecture = preset(config.model.preset, **{
            "vocab_size": tokenizer.vocab_size, "embedding_size": tokenizer.vocab_size,
            "mask_token_id": ids.mask, "eos_token_id": ids.eos, "pad_token_id": ids.pad, "eot_token_id": ids.eot,
            **config.model.overrides})
        with torch.device(device):
            model = LLaDAModel(architecture)
    if model.config.mask_token_id != ids.mask or model.config.eos_token_id != ids.eos:
        raise ValueError(f"model and tokenizer disagree on special ids (mask {model.config.mask_token_id} vs "
                         f"{ids.mask}, EOS {model.config.eos_token_id} vs {ids.eos})")
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model.train()


def attach_adapters(model: LLaDAModel, config: TrainConfig) -> PeftModel | None:
    """LoRA adapters injected into ``model`` as the recipe's ``lora`` section asks (None at rank 0)."""
    lora = config.lora
    if not lora.rank:
        return None
    torch.manual_seed(config.seed)  # the adapters' random start (B is zero, A is not): the same on every run
    return add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, base=config.model.init_from)


class AdaptersOff(torch.nn.Module):
    """The adapted model with its adapters switched off: the base model, as a frozen reference."""

    def __init__(self, model: torch.nn.Module, adapters: PeftModel) -> None:
        super().__init__()
        self.model = model  # what the trainer calls (possibly sharded); the adapters live inside it
        self._adapters = [adapters]  # in a list: the handle wraps ``model`` and must not be a submodule twice

    def forward(self, *args, **kwargs):
        with self._adapters[0].disable_adapter():
            return self.model(*args, **kwargs)


def build_reference(config: TrainConfig, model: torch.nn.Module, adapters: PeftModel | None,
                    device: torch.device) -> torch.nn.Module:
    """The frozen model a preference objective compares against: the LoRA base, or the starting
    checkpoint loaded a second time (in the autocast dtype, without gradients)."""
    if adapters is not None:
        return AdaptersOff(model, adapters)
    reference = load_model(Path(config.model.init_from), dtype=frozen_dtype(config, device), device=device)
    return reference.requires_grad_(False).eval()
