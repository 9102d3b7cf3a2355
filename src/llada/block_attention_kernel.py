"""The Triton source of ``llada.block_attention`` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def _attend_keys(q, keys_ptr, values_ptr, key_row, value_row, bias_ptr, bias_row, count, accumulator, peak, total,
                 scale, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr):
    """Online-softmax update of the rows' ``accumulator``/``peak``/``total`` over ``count`` keys and
    values (rows ``key_row``/``value_row`` apart), in tiles of BLOCK, each key under its bias if
    HAS_BIAS; keys beyond ``count`` count for nothing."""
    d = tl.arange(0, DIM)
    for start in range(0, count, BLOCK):
        t = start + tl.arange(0, BLOCK)
        inside = t < count
        keys = tl.load(keys_ptr + t[:, None] * key_row + d[None, :], mask=inside[:, None], other=0.0)
        values = tl.load(values_ptr + t[:, None] * value_row + d[None, :], mask=inside[:, None], other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + t * bias_row, mask=inside, other=-float("inf")).to(tl.float32)
        else:
            bias = tl.where(inside, 0.0, -float("inf"))
        scores = tl.dot(q, tl.trans(keys)) * scale + bias[None, :]  # (M, BLOCK) float32
        new_peak = tl.maximum(peak, tl.max(scores, 1))
        # A row whose keys so far are all hidden by a bias of -inf keeps a peak of -inf: exponents are
        # taken against 0 then (every term is 0), not against -inf (which would give NaN).
        reference = tl.where(new_peak == -float("inf"), 0.0, new_peak)
        rescale = tl.exp(peak - reference)
        probabilities = tl.exp(scores - reference[:, None])
        total = total * rescale + tl.sum(probabilities, 1)
        accumulator = accumulator * rescale[:, None] + tl.dot(probabilities.to(values.dtype), values)
        peak = new_peak
    return accumulator, peak, total


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
    # 64-bit row and head numbers: a large cache's offsets pass 2^31 elements.
    b = (tl.program_id(0) // kv_heads).to(tl.int64)
    kv = (tl.program_id(0) % kv_heads).to(tl.int64)
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
    accumulator, peak, total = _attend_keys(
        q, cache_k_ptr + b * ck_batch + kv * ck_head, cache_v_ptr + b * cv_batch + kv * cv_head, ck_row, cv_row,
        bias_ptr + b * bias_batch, bias_row, length, accumulator, peak, total, scale, True, BLOCK, DIM)
    accumulator, peak, total = _attend_keys(
        q, k_ptr + b * k_batch + kv * k_head, v_ptr + b * v_batch + kv * v_head, k_row, v_row,
        fresh_bias_ptr + b * fresh_bias_batch, fresh_bias_row, queries, accumulator, peak, total, scale,
        FRESH_BIAS, BLOCK, DIM)
    out = accumulator / total[:, None]
    tl.store(out_ptr + b * out_batch + query[:, None] * out_row + head[:, None] * DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])
