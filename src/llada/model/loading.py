"""A checkpoint made ready for use: device and dtype chosen by name, optional quantization.

One home for the rules the command line, the lm-eval model, the trainer and the benchmarks share,
so that library code never imports the command line to load a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llada.model.lora import adapter_base, is_adapter, merge_adapter
from llada.model.quantize import QUANTIZERS
from llada.model.tokenizer import TOKENIZER_FILE, Tokenizer
from llada.model.transformer import LLaDAModel

# The demo checkpoint shipped in the repository (found when llada runs from a checkout or editable install).
DEMO_MODEL = Path(__file__).resolve().parents[3] / "models" / "demo"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is a GPU when there is one, else the CPU; a GPU named without an index is this
    process's (``LOCAL_RANK`` under torchrun or accelerate, else the first)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown --device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asks for a GPU, but this torch build sees none "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``auto`` is bf16 on GPU and float32 on CPU (bf16 matmuls are slow on most CPUs); ``stored``
    (None) keeps the checkpoint's."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "stored":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; choose one of auto, stored, {', '.join(DTYPES)}, "
                         f"or {' / '.join(QUANTIZERS)} (quantized block weights)")
    return DTYPES[name]


def load(model_dir: str | Path, device: str, dtype: str) -> tuple[LLaDAModel, Tokenizer]:
    """The model and tokenizer of a checkpoint, on ``device`` in ``dtype``; ``int8`` / ``fp8`` load as
    ``auto`` and then quantize the block weights (for inference: such a model cannot be saved).

    ``model_dir`` may also be a LoRA adapter (a training run's ``checkpoints/step-N/adapter``): its
    base checkpoint is loaded and the adapter merged into the weights in memory, so that generation
    and serving run at the base model's speed with nothing written to disk.
    """
    target = resolve_device(device)
    quantize = QUANTIZERS.get(dtype)
    weights, tokenizer_dir = checkpoint_sources(model_dir)
    model = LLaDAModel.from_pretrained(weights, dtype=resolve_dtype("auto" if quantize else dtype, target),
                                       device=target)
    if weights != Path(model_dir):
        model = merge_adapter(model, model_dir).eval()
    if quantize:
        quantize(model)
    return model, Tokenizer.from_pretrained(tokenizer_dir)


def checkpoint_sources(model_dir: str | Path) -> tuple[Path, Path]:
    """Where a checkpoint's weights and tokenizer are: the directory itself, or for a LoRA adapter its
    base checkpoint's weights and the adapter's own tokenizer files (the base's when it has none)."""
    weights = adapter_base(model_dir) if is_adapter(model_dir) else Path(model_dir)
    tokenizer_dir = Path(model_dir) if (Path(model_dir) / TOKENIZER_FILE).is_file() else weights
    return weights, tokenizer_dir
