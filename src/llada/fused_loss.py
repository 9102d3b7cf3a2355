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

import torch

# Elements of one chunk's float32 logits: 2^28 = 1 GiB (about 2,100 rows of a 126k vocabulary).
DEFAULT_CHUNK_ELEMENTS = 1 << 28


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
                chunk_rows: int, with_grad: bool) -> torch.Tensor:  # noqa: ANN001 - autograd context
        rows = row_weights.nonzero().squeeze(1)  # the one host synchronisation
        hidden_rows = hidden.index_select(0, rows)
        targets_rows = targets.index_select(0, rows)
        weights_rows = row_weights.index_select(0, rows)
        compute = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=compute, device=hidden.device)
        if with_grad:
            grad_hidden_rows = torch.empty_like(hidden_rows)
            grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
        for start in range(0, rows.numel(), chunk_rows):
            h = hidden_rows[start:start + chunk_rows]
            t = targets_rows[start:start + chunk_rows]
            w = weights_rows[start:start + chunk_rows].to(compute)
            # Logits rounded to the matmul's dtype first, exactly like F.linear then .float().
            logits = (h @ weight.T).to(compute)  # (c, V)
            log_norm = torch.logsumexp(logits, dim=-1)  # (c,)
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            total += ((log_norm - target_logits) * w).sum()
            if not with_grad:
                continue
            grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1.0
            grad_logits.mul_(w[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden_rows[start:start + chunk_rows] = grad_logits @ weight
            grad_weight += (grad_logits.T @ h).to(compute)
        if with_grad:
            ctx.save_for_backward(rows, grad_hidden_rows, grad_weight)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # noqa: ANN001, ANN205 - autograd signature
        rows, grad_hidden_rows, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden_rows.new_zeros(ctx.hidden_shape)
        grad_hidden.index_copy_(0, rows, grad_hidden_rows * grad_total.to(grad_hidden_rows.dtype))
        return grad_hidden, (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None, None


@torch.compiler.disable
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         row_weights: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """``Σ_i row_weights[i] · CE(hidden[i] @ weight.T, targets[i])`` without materialising all logits.

    Under autocast the projection runs in the autocast dtype (as ``F.linear`` would) and the softmax
    in float32; otherwise in the inputs' dtype (at least float32).

    Args:
        hidden: (N, E) final hidden states.
        weight: (V, E) output projection.
        targets: (N,) token ids to score.
        row_weights: (N,) per-row weights; rows with weight 0 are skipped entirely.
        chunk_elements: logits elements per chunk (bounds the memory used).
    Returns:
        The weighted sum as a 0-dim tensor (float32, or float64 for float64 inputs).
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
        return _LinearCrossEntropy.apply(hidden, weight, targets, row_weights.detach(), chunk_rows, with_grad)
