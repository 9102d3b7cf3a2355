"""Batch-invariant kernels and the dispatch mode that routes operations to them.

The Triton kernels run in Triton's interpreter on the CPU (tests/conftest.py turns it on where there
is no GPU); tests/test_cuda.py runs them for real. Independent truth: float64 PyTorch operations for
values, and the same rows computed inside larger and smaller problems for invariance.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from llada.model import batch_invariant, block_attention
from llada.model.kv_cache import _attend_cache_and_fresh

interpreted = pytest.mark.skipif(not (batch_invariant.TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET") == "1"),
                                 reason="needs Triton, run by its interpreter (tests/conftest.py: no GPU)")


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "inner", "columns"), [(1, 64, 128), (70, 96, 130), (129, 200, 64)])
def test_matmul_kernel_equals_float64_and_its_rows_do_not_depend_on_the_row_count(
        dtype: torch.dtype, rows: int, inner: int, columns: int) -> None:
    a, b = randn(rows, inner, dtype=dtype), randn(columns, inner, dtype=dtype, seed=1).t()  # b: a transposed view
    product = batch_invariant.matmul(a, b)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 5e-2}
    torch.testing.assert_close(product.double(), a.double() @ b.double(), **tolerance)
    assert product.dtype == dtype
    for part in (slice(0, 1), slice(rows // 2, rows), slice(rows - 1, rows)):
        assert torch.equal(batch_invariant.matmul(a[part], b), product[part])


@interpreted
def test_batched_matmul_kernel_equals_each_matrix_product() -> None:
    a, b = randn(3, 20, 48), randn(3, 48, 36, seed=1)
    product = batch_invariant.matmul(a, b)
    for z in range(3):
        torch.testing.assert_close(product[z].double(), a[z].double() @ b[z].double(), rtol=1e-5, atol=1e-4)
        assert torch.equal(batch_invariant.matmul(a[z:z + 1], b[z:z + 1])[0], product[z])
    with pytest.raises(ValueError, match="matmul"):
        batch_invariant.matmul(a, b[0])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_row_sums_equal_float64_and_each_row_alone(dtype: torch.dtype) -> None:
    x = randn(5, 3, 2500, dtype=dtype)  # more than one chunk of ROW_BLOCK, the last one partial
    sums = batch_invariant.row_sums(x)
    assert sums.shape == (5, 3) and sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(sums.double(), x.double().sum(-1), rtol=1e-5, atol=1e-3)
    assert torch.equal(batch_invariant.row_sums(x[2:3, 1:2]), sums[2:3, 1:2])


@pytest.fixture
def kernels_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route CPU tensors to the Triton kernels (run by the interpreter), as CUDA tensors are on a GPU."""
    monkeypatch.setattr(batch_invariant, "gpu_kernels_available", lambda device: True)


@interpreted
@pytest.mark.usefixtures("kernels_on_the_cpu")
def test_the_mode_routes_products_reductions_and_softmax_to_the_kernels_with_pytorchs_semantics() -> None:
    x, weight = randn(2, 5, 40), randn(24, 40, seed=1)
    bias = randn(24, seed=2)
    expected = {
        "linear": F.linear(x, weight), "addmm": torch.addmm(bias, x[0], weight.t(), beta=0.5, alpha=2.0),
        "bmm": torch.bmm(x, x.transpose(1, 2)), "mean": x.pow(2).mean(-1, keepdim=True),
        "sum": x.sum(dim=-1), "sum64": x.sum(-1, dtype=torch.float64), "softmax": F.softmax(x, dim=-1),
        "log_softmax": F.log_softmax(x, dim=2), "softmax16": F.softmax(x.half(), dim=-1, dtype=torch.float32),
        "sum_first_dim": x.sum(0), "mean_all": x.mean(),
    }
    with batch_invariant.enabled():
        got = {
            "linear": F.linear(x, weight), "addmm": torch.addmm(bias, x[0], weight.t(), beta=0.5, alpha=2.0),
            "bmm": torch.bmm(x, x.transpose(1, 2)), "mean": x.pow(2).mean(-1, keepdim=True),
            "sum": x.sum(dim=-1), "sum64": x.sum(-1, dtype=torch.float64), "softmax": F.softmax(x, dim=-1),
            "log_softmax": F.log_softmax(x, dim=2), "softmax16": F.softmax(x.half(), dim=-1, dtype=torch.float32),
            "sum_first_dim": x.sum(0), "mean_all": x.mean(),  # not over the last dimension: PyTorch's own
        }
    for name, value in expected.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
    # A single row through the mode's product is its row of a larger product, bit for bit.
    with batch_invariant.enabled():
        assert torch.equal(F.linear(x[0, 3:4], weight), F.linear(x.flatten(0, 1), weight)[3:4])


def test_cpu_products_in_the_mode_do_not_depend_on_the_row_count() -> None:
    """PyTorch's CPU matmul multiplies a single row by another path than many rows (the last bits
    differ); in the mode every product runs in pieces of one shape."""
    x, weight = randn(40, 64), randn(192, 64, seed=1)
    plain = [torch.equal(F.linear(x[i:i + 1], weight)[0], F.linear(x, weight)[i]) for i in range(40)]
    with batch_invariant.enabled():
        whole = F.linear(x, weight)
        invariant = [torch.equal(F.linear(x[i:i + 1], weight)[0], whole[i]) for i in range(40)]
        torch.testing.assert_close(whole, x @ weight.t(), rtol=1e-6, atol=1e-5)
    assert all(invariant)
    assert not all(plain)  # what the mode is for: without it, single rows come out differently here


@interpreted
@pytest.mark.parametrize("fresh", [False, True])
def test_aligned_block_attention_gives_a_row_the_same_bits_under_any_left_padding(fresh: bool) -> None:
    """The kernel with ``starts``: a row's keys are tiled from its first real key, so the same row
    left-padded by 0, 5 or 70 keys (beyond one tile of 64) gives the same output bits, and the
    output equals float64 attention."""
    heads, kv_heads, queries, dim, length = 4, 2, 6, 16, 90
    dtype = torch.float16
    q = randn(1, heads, queries, dim, dtype=dtype)
    keys, values = randn(1, kv_heads, length, dim, dtype=dtype, seed=1), randn(1, kv_heads, length, dim, dtype=dtype,
                                                                              seed=2)
    k, v = (randn(1, kv_heads, queries, dim, dtype=dtype, seed=s) for s in (3, 4)) if fresh else (None, None)
    lowest = torch.finfo(dtype).min
    outputs = []
    for padding in (0, 5, 70):
        pad = torch.zeros(1, kv_heads, padding, dim, dtype=dtype)
        bias = torch.zeros(1, 1, 1, padding + length, dtype=dtype)
        bias[..., :padding] = lowest
        outputs.append(block_attention.block_attention(q, torch.cat([pad, keys], 2), torch.cat([pad, values], 2), bias,
                                                       k, v, None, torch.tensor([padding], dtype=torch.int32)))
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])
    if fresh:
        truth = _attend_cache_and_fresh(*(t.double() for t in (q, keys, values, torch.zeros(1, 1, 1, length), k, v)))
    else:
        truth = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), enable_gqa=True)
        truth = truth.transpose(1, 2).reshape(1, queries, heads * dim)
    torch.testing.assert_close(outputs[0].double(), truth, rtol=2e-3, atol=2e-3)


@interpreted
def test_aligned_block_attention_rows_of_one_launch_each_equal_the_row_alone() -> None:
    """Three rows with 0, 5 and 70 keys of left padding in one launch, fresh keys partly hidden by
    ``fresh_bias``: each row's output is the bits of its real keys attended alone."""
    heads, kv_heads, queries, dim, length = 4, 2, 6, 16, 160
    dtype, lowest = torch.float16, torch.finfo(torch.float16).min
    paddings = (0, 5, 70)
    q = randn(3, heads, queries, dim, dtype=dtype)
    keys, values = randn(3, kv_heads, length, dim, dtype=dtype, seed=1), randn(3, kv_heads, length, dim, dtype=dtype,
                                                                              seed=2)
    k, v = randn(3, kv_heads, queries, dim, dtype=dtype, seed=3), randn(3, kv_heads, queries, dim, dtype=dtype, seed=4)
    bias = torch.zeros(3, 1, 1, length, dtype=dtype)
    for row, padding in enumerate(paddings):
        bias[row, ..., :padding] = lowest
    fresh_bias = torch.zeros(3, 1, 1, queries, dtype=dtype)
    fresh_bias[..., 2] = lowest
    together = block_attention.block_attention(q, keys, values, bias, k, v, fresh_bias,
                                               torch.tensor(paddings, dtype=torch.int32))
    for row, padding in enumerate(paddings):
        one = slice(row, row + 1)
        alone = block_attention.block_attention(q[one], keys[one, :, padding:], values[one, :, padding:],
                                                bias[one, ..., padding:], k[one], v[one], fresh_bias[one],
                                                torch.zeros(1, dtype=torch.int32))
        assert torch.equal(together[one], alone)
