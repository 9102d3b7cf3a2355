"""Fused projections: each block's q/k/v weights as one matrix and its gate/up weights as another.

The engine's cached passes run one matmul where the model runs three (or two); ``Block.project_qkv``
and ``Block.mlp`` use the stacked matrices when asked to (``fused=True``). The model's own layers keep
their weights as views of the stacked ones, so its parameters, memory and plain forward pass stay
exactly as they were.
"""

from __future__ import annotations

import torch
from torch import nn

from llada.model.transformer import Block, LLaDAModel


def fuse_projections(model: LLaDAModel) -> bool:
    """Store each block's q/k/v weights as one matrix, and its gate/up weights as another, in place.

    The layers' own weights become row slices (views) of the fused matrices, so the model keeps its
    parameters, memory and bit-identical plain forward pass, while ``cached_forward`` runs one
    matmul where it ran three (or two): fewer, larger kernels for the launch-bound block steps.
    Quantized layers that can be stacked (fp8: ``Fp8Linear.stacked``) are fused the same way; for
    others (int8) it returns False, changing nothing. Moving or reloading the model's weights
    afterwards breaks the views; ``projections_fused_in`` tells whether they still hold.
    """
    projections = [(block.q_proj, block.k_proj, block.v_proj, block.ff_proj, block.up_proj) for block in model.blocks]
    layers = [layer for group in projections for layer in group]
    stackable = len({type(layer) for layer in layers}) == 1 and hasattr(type(layers[0]), "stacked")
    if not (stackable or all(isinstance(layer, nn.Linear) for layer in layers)):
        return False
    unfused = [block for block in model.blocks if not projections_fused_in(block)]
    with torch.no_grad():
        for block in unfused:
            # Plain attributes, not registered submodules or buffers: the model's state dict,
            # parameters and module tree stay as they were.
            object.__setattr__(block, "fused_qkv", _fuse(block.q_proj, block.k_proj, block.v_proj))
            object.__setattr__(block, "fused_gate_up", _fuse(block.ff_proj, block.up_proj))
    if unfused:
        bump_weights_version(model)
    return True


def bump_weights_version(model: LLaDAModel) -> None:
    """Record that ``model``'s weight tensors were replaced: engines made before then refuse to run
    (their CUDA graphs read the old tensors' memory)."""
    model.weights_version = getattr(model, "weights_version", 0) + 1


def unfuse_projections(model: LLaDAModel) -> None:
    """Forget the fused matrices (the layers keep their weights): for changes that replace the layers."""
    for block in model.blocks:
        for name in ("fused_qkv", "fused_gate_up"):
            block.__dict__.pop(name, None)


def projections_fused_in(block: Block) -> bool:
    """Whether ``block`` has fused matrices that its layers' weights are still views of."""
    qkv, gate_up = getattr(block, "fused_qkv", None), getattr(block, "fused_gate_up", None)
    if qkv is None or gate_up is None:
        return False
    qkv, gate_up = (fused if isinstance(fused, torch.Tensor) else fused.weight for fused in (qkv, gate_up))
    q, k, v = (block.q_proj.weight, block.k_proj.weight, block.v_proj.weight)
    gate, up = block.ff_proj.weight, block.up_proj.weight
    return (q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv[q.shape[0]:].data_ptr()
            and v.data_ptr() == qkv[q.shape[0] + k.shape[0]:].data_ptr()
            and gate.data_ptr() == gate_up.data_ptr() and up.data_ptr() == gate_up[gate.shape[0]:].data_ptr())


def _fuse(*layers: nn.Module) -> torch.Tensor | nn.Module:
    """The stacked weight matrix of ``nn.Linear`` layers, or the stacked layer of quantized ones."""
    if hasattr(type(layers[0]), "stacked"):
        return type(layers[0]).stacked(list(layers))
    fused = torch.cat([layer.weight.detach() for layer in layers])
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight.data = fused[start:start + rows]
        start += rows
    return fused
