"""The Triton source of ``llada.block_attention`` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def _tile(q, keys, values, bias, accumulator, peak, total, scale):
    """Online-softmax update of one tile of keys (BLOCK, D) with their bias (BLOCK,)."""
    scores = tl.dot(q, tl.trans(keys)) * scale + bias[None, :]  # (M, BLOCK) float32
    new_peak = tl.maximum(peak, tl.max(scores, 1))
    rescale = tl.exp(peak - new_peak)
    probabilities = tl.exp(scores - new_peak[:, None])
    total = total * rescale + tl.sum(probabilities, 1)
    accumulator = accumulator * rescale[:, None] + tl.dot(probabilities.to(values.dtype), values)
    return accumulator, new_peak, total


@triton.jit
def block_attention(q_ptr, cache_k_ptr, cache_v_ptr, bias_ptr, k_ptr, v_ptr, fresh_bias_ptr, out_ptr,
                    kv_heads, length, queries, scale,
                    q_batch, q_head, q_row, ck_batch, ck_head, ck_row, cv_batch, cv_head, cv_row,
                    k_batch, k_head, k_row, v_batch, v_head, v_row,
                    bias_batch, bias_row, fresh_bias_batch, fresh_bias_row, out_batch, out_row,
                    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                    FRESH_BIAS: tl.constexpr):
    # Rows m = g · queries + i stand for query i of query head kv · GROUP + g: the GROUP heads that
    # share key/value head ``kv``. One program: BLOCK_M of these rows, of one batch row ``b``.
    b = tl.program_id(0) // kv_heads
    kv = tl.program_id(0) % kv_heads
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = kv * GROUP + m // queries
    query = m % queries
    real = m < GROUP * queries
    d = tl.arange(0, DIM)
    q = tl.load(q_ptr + b * q_batch + head[:, None] * q_head + query[:, None] * q_row + d[None, :],
                mask=real[:, None], other=0.0)
    peak = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    accumulator = tl.zeros((BLOCK_M, DIM), tl.float32)
    cache_k = cache_k_ptr + b * ck_batch + kv * ck_head
    cache_v = cache_v_ptr + b * cv_batch + kv * cv_head
    for start in range(0, length, BLOCK):
        t = start + tl.arange(0, BLOCK)
        inside = t < length
        keys = tl.load(cache_k + t[:, None] * ck_row + d[None, :], mask=inside[:, None], other=0.0)
        values = tl.load(cache_v + t[:, None] * cv_row + d[None, :], mask=inside[:, None], other=0.0)
        bias = tl.load(bias_ptr + b * bias_batch + t * bias_row, mask=inside, other=-float("inf")).to(tl.float32)
        accumulator, peak, total = _tile(q, keys, values, bias, accumulator, peak, total, scale)
    fresh_k = k_ptr + b * k_batch + kv * k_head
    fresh_v = v_ptr + b * v_batch + kv * v_head
    for start in range(0, queries, BLOCK):
        t = start + tl.arange(0, BLOCK)
        inside = t < queries
        keys = tl.load(fresh_k + t[:, None] * k_row + d[None, :], mask=inside[:, None], other=0.0)
        values = tl.load(fresh_v + t[:, None] * v_row + d[None, :], mask=inside[:, None], other=0.0)
        if FRESH_BIAS:
            bias = tl.load(fresh_bias_ptr + b * fresh_bias_batch + t * fresh_bias_row, mask=inside,
                           other=-float("inf")).to(tl.float32)
        else:
            bias = tl.where(inside, 0.0, -float("inf"))
        accumulator, peak, total = _tile(q, keys, values, bias, accumulator, peak, total, scale)
    out = accumulator / total[:, None]
    tl.store(out_ptr + b * out_batch + query[:, None] * out_row + head[:, None] * DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])
