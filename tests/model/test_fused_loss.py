"""The fused projection + cross-entropy against the plain dense computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from llada.model.fused_loss import linear_cross_entropy


def dense(hidden, weight, targets, row_weights):
    losses = F.cross_entropy((hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)), targets,
                             reduction="none")
    return (losses * row_weights).sum()


def inputs(n=37, e=16, v=50, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, e, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, e, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=generator)
    row_weights = torch.rand(n, generator=generator, dtype=torch.float64) * (torch.rand(n, generator=generator) < 0.5)
    return hidden, weight, targets, row_weights


@pytest.mark.parametrize("chunk_elements", [50, 7 * 50, 10_000])  # 1 row, 7 rows (uneven), all rows per chunk
def test_value_and_gradients_equal_the_dense_computation(chunk_elements: int) -> None:
    hidden, weight, targets, row_weights = inputs()
    fused = linear_cross_entropy(hidden, weight, targets, row_weights, chunk_elements=chunk_elements)
    (fused * 2.5).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = dense(hidden, weight, targets, row_weights)
    (reference * 2.5).backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-10, atol=1e-12)
    assert (grads[0][row_weights == 0] == 0).all()  # skipped rows get no gradient


def test_all_zero_weights_and_no_grad_mode() -> None:
    hidden, weight, targets, _ = inputs()
    zero = linear_cross_entropy(hidden, weight, targets, torch.zeros(hidden.shape[0], dtype=torch.float64))
    zero.backward()
    assert zero.item() == 0.0 and (hidden.grad == 0).all() and (weight.grad == 0).all()
    with torch.no_grad():
        hidden, weight, targets, row_weights = inputs(seed=1)
        value = linear_cross_entropy(hidden, weight, targets, row_weights)
    assert value.item() == pytest.approx(dense(hidden, weight, targets, row_weights).item(), rel=1e-12)


def test_autocast_rounds_like_f_linear() -> None:
    """Under CPU bf16 autocast the logits are rounded to bf16 exactly as F.linear's would be."""
    hidden, weight, targets, row_weights = inputs(dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets, row_weights)
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    reference = (F.cross_entropy(logits.float(), targets, reduction="none") * row_weights).sum()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)


def test_bad_shapes_are_named() -> None:
    hidden, weight, targets, row_weights = inputs()
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(hidden, weight[:, :3], targets, row_weights)
    with pytest.raises(ValueError, match="row_weights"):
        linear_cross_entropy(hidden, weight, targets, row_weights[:3])


def test_model_forward_with_targets_equals_scoring_its_logits() -> None:
    model = tiny_model()
    ids = torch.randint(0, 500, (2, 9))
    targets = torch.randint(0, 500, (2, 9))
    weights = torch.rand(2, 9, dtype=torch.float64) * (torch.rand(2, 9) < 0.6)
    fused = model(ids, targets=targets, target_weights=weights).weighted_nll
    reference = dense(model(ids).logits.flatten(0, 1), torch.eye(model.config.embedding_size, dtype=torch.float64),
                      targets.flatten(), weights.flatten())
    assert fused.item() == pytest.approx(reference.item(), rel=1e-10)
    with pytest.raises(ValueError, match="target_weights"):
        model(ids, targets=targets)


@pytest.mark.parametrize("chunk_elements", [50, 7 * 50, 10_000])
def test_group_sums_equal_the_dense_sums_per_group(chunk_elements: int) -> None:
    hidden, weight, targets, row_weights = inputs()
    groups = torch.randint(0, 5, (hidden.shape[0],), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, row_weights, chunk_elements, row_groups=groups, groups=6)
        want = torch.stack([dense(hidden[groups == g], weight, targets[groups == g], row_weights[groups == g])
                            for g in range(6)])
    torch.testing.assert_close(got, want)
    assert got[5] == 0  # a group with no rows
    with pytest.raises(ValueError, match="no_grad"):
        linear_cross_entropy(hidden, weight, targets, row_weights, row_groups=groups, groups=6)


def test_a_compiled_caller_runs_the_loss_eagerly_with_the_same_value_and_gradients() -> None:
    """torch.compile never traces into the loss (its data-dependent row selection and custom autograd
    would not trace): a compiled caller breaks the graph there and gets the eager value and gradients."""
    import torch._dynamo

    def step(hidden, weight, targets, row_weights):
        return linear_cross_entropy(torch.tanh(hidden), weight, targets, row_weights) * 2.0

    hidden, weight, targets, row_weights = inputs()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(hidden, weight, targets, row_weights)
    assert explanation.graph_break_count == 1  # one break, at the call (traced into, it would break at each nonzero)
    compiled = torch.compile(step, backend="eager")(hidden, weight, targets, row_weights)
    compiled.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    eager = step(hidden, weight, targets, row_weights)
    eager.backward()
    assert compiled.item() == eager.item()
    torch.testing.assert_close(grads, (hidden.grad, weight.grad), rtol=0, atol=0)
