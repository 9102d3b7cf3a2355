"""Changes applied to a built model from the outside: compilation, activation checkpointing, FSDP2 sharding.

The model code stays plain single-device PyTorch; this module wraps it.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from llada.model.transformer import LLaDAModel

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def compile_model(model: LLaDAModel, mode: CompileMode = "default", dynamic: bool | None = False,
                  fullgraph: bool = True) -> LLaDAModel:
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
        fullgraph: refuse graph breaks. Training passes False: the fused loss at the end of the
            forward pass (``targets=``) runs eagerly by design.
    """
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph)


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


def init_process_group(device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on the CPU); a single process started without
    torchrun gets the environment of a one-process group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for key, default in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, default)
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def apply_fsdp(model: LLaDAModel, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> LLaDAModel:
    """Shard parameters, gradients and optimiser state over ``mesh`` with FSDP2 (``fully_shard``).

    Each block is its own unit, all-gathered just before it runs and freed after, and the root holds
    the embedding, final norm and output projection. With ``param_dtype`` (bf16 on GPUs) the gathered
    weights are cast once per step, while gradients are reduced in float32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
