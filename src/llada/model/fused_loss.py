"""Output projection and cross-entropy in one step, over only the rows that carry loss.

The masked-diffusion objectives score only masked positions (about half of them on average), yet a
plain ``logits = hidden @ W.T`` followed by ``cross_entropy`` computes the vocabulary projection for
every position and keeps the float32 logits (B·L × V: 8 GB for a 1B model at 8 × 2048 tokens with the
126k vocabulary) alive until the backward pass, reading and writing them several times. Here the rows
with zero weight are dropped before the projection, and the rest is processed in chunks whose
gradient is computed immediately, so only one chunk of logits ever exists.

The gradient is computed in the forward pass (the loss is a plain sum, so d loss / d logits is known
there: ``weight · (softmax − one_hot)``) and scaled by the incoming gradient in the backward pass.
Row selection needs the number of weighted rows on the host, so this function runs outside
``torch.compile`` graphs (it is all large matmuls; compiling it would gain nothing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

# Elements of one chunk's float32 logits: 2^28 = 1 GiB (about 2,100 rows of a 126k vocabulary).
DEFAULT_CHUNK_ELEMENTS = 1 << 28


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ weights · CE of one chunk of logits, and its gradient ``weights · (softmax − one_hot)``.

    The softmax runs in (at least) float32; the gradient is returned in the logits' dtype, ready for
    the two matmuls that follow.
    """
    out_dtype, compute = logits.dtype, torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute)
    weights = weights.to(compute)
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
    target_logits = logits.gather(1, targets[:, None])  # (c, 1)
    loss = ((log_norm - target_logits).squeeze(1) * weights).sum()
    if not with_grad:
        return loss, None
    one_hot = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    grad = ((logits - log_norm).exp() - one_hot.to(compute)) * weights[:, None]
    return loss, grad.to(out_dtype)


@functools.cache
def _compiled_chunk_fn() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    # On GPUs Inductor turns the float32 softmax, one-hot and scaling into one pass over the chunk
    # (eagerly each is a separate read and write of 4 bytes per logit: ~10 ms per step of a 1B model).
    return torch.compile(_chunk_loss_and_grad, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
                chunk_rows: int, with_grad: bool) -> torch.Tensor:
        rows = row_weights.nonzero().squeeze(1)  # the one host synchronisation
        hidden_rows = hidden.index_select(0, rows)
        targets_rows = targets.index_select(0, rows)
        weights_rows = row_weights.index_select(0, rows)
        compute = torch.promote_types(hidden.dtype, torch.float32)
        chunk_fn = _compiled_chunk_fn() if hidden.is_cuda else _chunk_loss_and_grad
        total = torch.zeros((), dtype=compute, device=hidden.device)
        if with_grad:
            grad_hidden_rows = torch.empty_like(hidden_rows)
            grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
        for start in range(0, rows.numel(), chunk_rows):
            h = hidden_rows[start:start + chunk_rows]
            # Logits in the matmul's dtype (bf16 under autocast), as F.linear would give them.
            loss, grad_logits = chunk_fn(h @ weight.T, targets_rows[start:start + chunk_rows],
                                         weights_rows[start:start + chunk_rows], with_grad)
            total += loss
            if with_grad:
                grad_hidden_rows[start:start + chunk_rows] = grad_logits @ weight
                grad_weight += (grad_logits.T @ h).to(compute)
        if with_grad:
            ctx.save_for_backward(rows, grad_hidden_rows, grad_weight)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        rows, grad_hidden_rows, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden_rows.new_zeros(ctx.hidden_shape)
        grad_hidden.index_copy_(0, rows, grad_hidden_rows * grad_total.to(grad_hidden_rows.dtype))
        return grad_hidden, (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None, None


# Not traced by torch.compile: a compiled model calls it as a graph break (its chunked custom autograd
# function runs eagerly, with its own compiled chunk kernel). torch.compiler.disable would import
# torch._dynamo (a second or more) whenever llada is imported; torch's own lazy form defers that to
# the first call.
_not_compiled = getattr(torch, "_disable_dynamo", torch.compiler.disable)


@_not_compiled
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         row_weights: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                         row_groups: torch.Tensor | None = None, groups: int = 0) -> torch.Tensor:
    """``Σ_i row_weights[i] · CE(hidden[i] @ weight.T, targets[i])`` without materialising all logits.

    Under autocast the projection runs in the autocast dtype (as ``F.linear`` would) and the softmax
    in float32; otherwise in the inputs' dtype (at least float32).

    Args:
        hidden: (N, E) final hidden states.
        weight: (V, E) output projection.
        targets: (N,) token ids to score.
        row_weights: (N,) per-row weights; rows with weight 0 are skipped entirely.
        chunk_elements: logits elements per chunk (bounds the memory used).
        row_groups: optional (N,) group index in [0, groups) per row: then the sums are taken per group
            and returned as a (groups,) vector. Scoring only (no gradients): a loss that is not a
            plain sum needs the gradient computed otherwise.
    Returns:
        The weighted sum as a 0-dim tensor (float32, or float64 for float64 inputs), or the
        (groups,) sums.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, E) and weight (V, E) do not fit: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or row_weights.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} and row_weights {tuple(row_weights.shape)} must both be "
                         f"({hidden.shape[0]},)")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # differentiable casts, like autocast's own
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        if row_groups is not None:
            if with_grad:
                raise ValueError("per-group sums are for scoring: compute them under torch.no_grad()")
            return _group_sums(hidden, weight, targets, row_weights, row_groups, groups, chunk_rows)
        return _LinearCrossEntropy.apply(hidden, weight, targets, row_weights.detach(), chunk_rows, with_grad)


def _group_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
                row_groups: torch.Tensor, groups: int, chunk_rows: int) -> torch.Tensor:
    """Σ weight · CE per group, over the weighted rows, a chunk of logits at a time."""
    if row_groups.shape != row_weights.shape:
        raise ValueError(f"row_groups {tuple(row_groups.shape)} must have the shape of row_weights "
                         f"{tuple(row_weights.shape)}")
    compute = torch.promote_types(hidden.dtype, torch.float32)
    sums = torch.zeros(groups, dtype=compute, device=hidden.device)
    rows = row_weights.nonzero().squeeze(1)
    for start in range(0, rows.numel(), chunk_rows):
        chunk = rows[start:start + chunk_rows]
        logits = (hidden.index_select(0, chunk) @ weight.T).to(compute)
        losses = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets.index_select(0, chunk)[:, None]).squeeze(1)
        sums.index_add_(0, row_groups.index_select(0, chunk), losses * row_weights.index_select(0, chunk).to(compute))
    return sums
