"""Speed-ups applied to a built model from the outside: compilation and activation checkpointing.

The model code stays plain single-device PyTorch; this module wraps it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from llada.model import LLaDAModel

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def compile_model(model: LLaDAModel, mode: CompileMode = "default", dynamic: bool | None = False) -> LLaDAModel:
    """The whole model compiled as one graph with ``torch.compile`` (weights shared with ``model``).

    One graph rather than one per block: Inductor fuses the norm, RoPE and SwiGLU element-wise work
    into the matmuls' neighbours, and with ``mode="reduce-overhead"`` a single CUDA graph replays
    the whole forward pass, which removes the per-kernel launch cost that dominates short inputs
    (the 8B shape at 32 tokens: 18.8 ms eager, 6.6 ms with CUDA graphs on an H100; see
    benchmarks/results/). Compiling takes a few seconds per new input shape.

    Args:
        model: the model to speed up.
        mode: ``torch.compile`` mode; ``reduce-overhead`` adds CUDA graphs (inputs must keep
            their shapes, and outputs are overwritten by the next call: copy what you keep).
        dynamic: False specialises on each input shape (fastest kernels, one compile per shape);
            None lets torch decide.
    """
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=True)


def apply_activation_checkpointing(model: LLaDAModel) -> LLaDAModel:
    """Recompute each block's activations in the backward pass instead of storing them.

    Trades about a third more compute for memory that no longer grows with the number of layers.
    The blocks' forward methods are wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return model
