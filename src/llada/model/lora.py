"""Low-rank adapters (LoRA) on the model's block projections, through ``peft``.

The adapters are PEFT's own: ``add_lora`` injects them into a ``LLaDAModel`` in place (the model
keeps its class and forward pass, the adapted projections gain ``lora_A`` / ``lora_B``), and
``save_adapter`` writes ``adapter_model.safetensors`` and ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` reads back. ``merge_adapter`` folds an adapter into the weights
for generation and serving: the engine's fused projections and CUDA graphs then run at the base
model's speed, with no adapter kernels in the step.

The targets are matched by a pattern over ``blocks.N.<name>``, not by bare names: the output head
is also called ``ff_out``, and adapting it through a name match would be silently bypassed (the
forward pass reads the head's weight directly).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from llada.model.transformer import LLaDAModel

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_WRAPPED = "base_model.model."  # where PeftModel keeps the model, in its state-dict keys


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs the peft package: pip install 'llada[lora]'") from error
    return peft


def add_lora(model: LLaDAModel, rank: int, alpha: float, dropout: float, targets: Sequence[str],
             base: str | Path | None = None) -> PeftModel:
    """Freeze ``model`` and inject trainable rank-``rank`` adapters into each block's ``targets``.

    Returns the ``PeftModel`` handle (for ``disable_adapter`` and saving); ``model`` itself now
    computes with the adapters and is what to train. ``base`` is recorded in the adapter's config as
    the checkpoint it applies to.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not targets:
        raise ValueError("LoRA needs at least one target projection")
    peft = _peft()
    pattern = r"blocks\.\d+\.(" + "|".join(re.escape(name) for name in targets) + ")"
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    model.requires_grad_(False)
    handle = peft.get_peft_model(model, config)
    # Set afterwards: get_peft_model overwrites it with the name a transformers model carries (none here).
    handle.peft_config["default"].base_model_name_or_path = str(Path(base).resolve()) if base else None
    return handle


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a LoRA model's state dict (keys as the model names them)."""
    return {key: value for key, value in state.items() if ".lora_" in key}


def save_adapter(directory: str | Path, handle: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Write the adapter in PEFT's layout; ``state`` is the model's (full, unsharded) state dict or
    its ``adapter_state``, so that a sharded run can gather it first."""
    peft = _peft()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped = {_WRAPPED + key: value for key, value in adapter_state(state).items()}
    weights = peft.get_peft_model_state_dict(handle, state_dict=wrapped, save_embedding_layers=False)
    save_file({key: value.detach().contiguous().cpu() for key, value in weights.items()},
              str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    handle.peft_config["default"].save_pretrained(str(directory))


def read_adapter_state(directory: str | Path, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The weights of a saved adapter under the names the adapted model gives them (``adapter_state``'s
    keys): PEFT stores them without the wrapper's prefix and the adapter's name."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    state = {}
    for key, value in load_file(str(path)).items():
        key = key.removeprefix(_WRAPPED)
        state[re.sub(r"\.(lora_[AB])\.", rf".\1.{adapter}.", key)] = value
    return state


def load_adapter(model: LLaDAModel, directory: str | Path, trainable: bool = False) -> PeftModel:
    """Inject the adapter saved in ``directory`` into ``model`` (in place); the handle is returned."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds no LoRA adapter ({ADAPTER_CONFIG} is missing)")
    return _peft().PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


def merge_adapter(model: LLaDAModel, directory: str | Path) -> LLaDAModel:
    """``model`` with the adapter in ``directory`` added into its weights (W + (alpha/rank)·B·A): the
    same outputs as the adapted model up to rounding in the weights' dtype, at the base model's cost."""
    return load_adapter(model, directory).merge_and_unload()


def is_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` holds a LoRA adapter (PEFT's layout) rather than a whole model."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def adapter_base(directory: str | Path) -> Path:
    """The checkpoint an adapter applies to, as its config records it; a clear error when it is
    unrecorded or no longer there."""
    config_path = Path(directory) / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is unreadable: {error}") from error
    if not base:
        raise ValueError(f"{config_path} records no base model (base_model_name_or_path); "
                         "set it to the checkpoint the adapter was trained on")
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"the adapter in {directory} applies to {base}, which holds no checkpoint; "
                                f"edit base_model_name_or_path in {config_path} to where it is now")
    return Path(base)
