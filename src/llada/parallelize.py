"""Speed-ups applied to a built model from the outside: compilation today, sharding later.

The model code stays plain single-device PyTorch; this module wraps it. Each Transformer block is
compiled on its own rather than the whole model: all blocks share one compiled graph, so compiling
an 8B model costs about as much as compiling one block.
"""

from __future__ import annotations

from typing import Literal

from llada.model import LLaDAModel

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def compile_model(model: LLaDAModel, mode: CompileMode = "default", dynamic: bool | None = False) -> LLaDAModel:
    """Compile every block and the final norm in place with ``torch.compile``; returns the model.

    Args:
        model: the model to speed up (its weights are untouched).
        mode: ``torch.compile`` mode; ``reduce-overhead`` adds CUDA graphs, which pays off when
            the per-step work is small (short sequences, decoding steps).
        dynamic: False specialises on each input shape (fastest kernels, a recompile per new
            shape); None lets torch decide.
    """
    for block in model.blocks:
        block.compile(mode=mode, dynamic=dynamic)
    model.ln_f.compile(mode=mode, dynamic=dynamic)
    return model
