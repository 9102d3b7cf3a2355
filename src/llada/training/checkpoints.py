"""A training run's checkpoints: ``OUT/checkpoints/step-N/`` holding the model in the official
layout (with the tokenizer files) or, for a LoRA run, the adapter in PEFT's layout, and the
trainer's state; written atomically, the last few kept."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llada.model.checkpoint import read_state_dict
from llada.model.lora import read_adapter_state
from llada.training.config import CHECKPOINTS

TRAINER_STATE = "trainer.pt"
MODEL_DIR = "model"  # the whole model, official layout
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, PEFT's layout


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The run's complete checkpoints (those with a trainer state), oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_STATE).is_file())


def write_checkpoint(target: Path, write_weights: Callable[[Path], None], trainer_state: dict[str, Any],
                     keep_last: int) -> None:
    """Write ``target`` (``.../checkpoints/step-N``) beside it and rename it into place, so that a
    crash leaves the previous checkpoints whole; then delete all but the last ``keep_last``.
    ``write_weights(staging)`` writes the model's ``MODEL_DIR`` or ``ADAPTER_DIR`` into the staging directory."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_weights(staging)
        torch.save(trainer_state, staging / TRAINER_STATE)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's full (unsharded) weights on the CPU, float32 for a whole model or the adapter's
    alone, under the names the model gives them; and its trainer state."""
    if (directory / ADAPTER_DIR).is_dir():
        weights = read_adapter_state(directory / ADAPTER_DIR)
    else:
        weights = read_state_dict(directory / MODEL_DIR, dtype=torch.float32, device="cpu")
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True, mmap=True)
    return weights, state
