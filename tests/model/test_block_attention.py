"""The fused block-step attention kernel, run by Triton's interpreter on the CPU.

tests/conftest.py turns the interpreter on (``TRITON_INTERPRET=1``) where there is no GPU; on a GPU
machine these tests are skipped and tests/test_cuda.py runs the kernel for real, in bfloat16 too.
Independent truth: ``kv_cache._attend_cache_and_fresh`` in float64 on the same inputs. The interpreter
checks the kernel's indexing, masking and online softmax in float16 and float32 (its bfloat16
matmuls are not faithful).
"""

from __future__ import annotations

import os

import pytest
import torch

from llada.model import block_attention
from llada.model.kv_cache import _attend_cache_and_fresh

pytestmark = [
    pytest.mark.skipif(not (block_attention.TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="needs Triton, run by its interpreter (tests/conftest.py: no GPU)"),
    pytest.mark.usefixtures("multiprocessors"),
]


@pytest.fixture(params=[1, 7, 64], ids=["whole cache per program", "few parts", "cache split across programs"])
def multiprocessors(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every test runs three times: with one program per query rows walking the whole cache, and on
    pretend GPUs of 7 and 64 multiprocessors, where the small cases' caches are split into parts
    (of unequal sizes, some) whose results a second kernel merges."""
    monkeypatch.setattr(block_attention, "_multiprocessors", lambda device: request.param)
    return request.param


def case(batch: int, heads: int, kv_heads: int, queries: int, length: int, dim: int, dtype: torch.dtype,
         hidden: float = 0.3, seed: int = 0):
    """Queries and values as transposed views (as the projections give them), biases of finfo.min."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    lowest = torch.finfo(dtype).min
    q = randn(batch, queries, heads, dim).transpose(1, 2)
    cache_k, cache_v = randn(batch, kv_heads, length, dim), randn(batch, kv_heads, length, dim)
    k, v = randn(batch, kv_heads, queries, dim), randn(batch, queries, kv_heads, dim).transpose(1, 2)
    bias = torch.zeros(batch, 1, 1, length, dtype=dtype).masked_fill(
        torch.rand(batch, 1, 1, length, generator=generator) < hidden, lowest)
    padding = torch.rand(batch, 1, 1, queries, generator=generator) < 0.3
    padding[..., 0] = False  # every row keeps one fresh key
    fresh_bias = torch.zeros(batch, 1, 1, queries, dtype=dtype).masked_fill(padding, lowest)
    return q, cache_k, cache_v, bias, k, v, fresh_bias


def expected(q, cache_k, cache_v, bias, k, v, fresh_bias):
    def wide(t):  # float64, finfo.min of a narrower dtype kept finite
        return None if t is None else t.double().clamp(min=-1e30)
    return _attend_cache_and_fresh(*(wide(t) for t in (q, cache_k, cache_v, bias, k, v)), wide(fresh_bias))


def check(inputs, tolerance: float) -> None:
    out = block_attention.block_attention(*inputs)
    reference = expected(*inputs)
    assert out.shape == reference.shape and out.dtype == inputs[0].dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "queries", "length"), [
    (2, 4, 4, 8, 100),   # keys not a multiple of the 64-key tile
    (2, 8, 2, 24, 70),   # grouped heads: 4 × 24 query rows span two 64-row programs
    (1, 2, 2, 1, 1),     # one query, one cached key
    (1, 2, 1, 65, 64),   # fresh keys beyond one tile, exactly one cache tile
    (1, 4, 2, 8, 300),   # five cache tiles: five parts where split
    (1, 16, 8, 4, 900),  # 15 tiles, 8 programs: eight parts of two tiles where split, the last of one
])
def test_kernel_equals_the_tensor_operations(batch: int, heads: int, kv_heads: int, queries: int, length: int) -> None:
    check(case(batch, heads, kv_heads, queries, length, 16, torch.float16), tolerance=2e-3)  # float16 probabilities


def test_kernel_in_float32_and_without_a_fresh_bias() -> None:
    q, cache_k, cache_v, bias, k, v, _ = case(2, 4, 2, 10, 130, 32, torch.float32)
    check((q, cache_k, cache_v, bias, k, v, None), tolerance=1e-5)


def test_keys_hidden_by_minus_infinity_and_biases_shared_by_every_row() -> None:
    """A whole tile hidden by -inf (not finfo.min) gives no NaN; a (1, 1, 1, T) bias is broadcast over rows."""
    q, cache_k, cache_v, _, k, v, fresh_bias = case(3, 4, 2, 6, 150, 16, torch.float16)
    bias = torch.zeros(1, 1, 1, 150, dtype=torch.float16)
    bias[..., :64] = float("-inf")
    check((q, cache_k, cache_v, bias, k, v, fresh_bias), tolerance=2e-3)
    everything_hidden = torch.full((3, 1, 1, 150), float("-inf"), dtype=torch.float16)  # the fresh keys remain
    check((q, cache_k, cache_v, everything_hidden, k, v, fresh_bias), tolerance=2e-3)


def test_a_hidden_last_part_merges_into_visible_ones() -> None:
    """The cache's last tiles and every fresh key hidden by -inf: where the cache is split, the last
    part's peak is -inf and its merge with the finite parts before it must weigh it 0, not NaN."""
    q, cache_k, cache_v, bias, k, v, _ = case(1, 4, 2, 8, 300, 16, torch.float16)
    bias[..., 192:] = float("-inf")
    fresh_hidden = torch.full((1, 1, 1, 8), float("-inf"), dtype=torch.float16)
    check((q, cache_k, cache_v, bias, k, v, fresh_hidden), tolerance=2e-3)


def test_strided_biases_and_caches() -> None:
    """Biases read every other key of a longer one and broadcast one fresh bias over rows; the cache
    is a slice of a longer buffer and the queries have a last-dimension stride of 2 (copied first)."""
    q, _, _, _, k, v, fresh_bias = case(3, 4, 2, 6, 150, 16, torch.float16)
    longer = case(3, 4, 2, 6, 160, 16, torch.float16, hidden=0.4, seed=1)
    cache_k, cache_v = longer[1][:, :, 5:155], longer[2][:, :, 5:155]
    bias = torch.zeros(3, 1, 1, 300, dtype=torch.float16).masked_fill(torch.rand(3, 1, 1, 300) < 0.3, float("-inf"))
    bias[..., 0] = 0  # every row keeps a cached key
    q_strided = torch.zeros(*q.shape[:3], 32, dtype=q.dtype)
    q_strided[..., ::2] = q
    check((q_strided[..., ::2], cache_k, cache_v, bias[..., ::2], k, v, fresh_bias[:1]), tolerance=2e-3)


def test_the_fake_implementation_matches_the_kernel() -> None:
    """What ``torch.compile`` traces (shape, dtype, strides) is what the kernel returns."""
    inputs = case(2, 4, 2, 5, 40, 16, torch.float16)
    torch.library.opcheck(block_attention.block_attention, inputs,
                          test_utils=("test_schema", "test_faketensor"))
