"""The Triton source of ``llada.model.block_attention`` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def _finite(peak):
    """The peak to take exponents against: a row whose keys so far are all hidden by a bias of -inf
    keeps a peak of -inf, and exponents are taken against 0 then (every term is 0), not against -inf
    (which would give NaN)."""
    return tl.where(peak == -float("inf"), 0.0, peak)


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
        reference = _finite(new_peak)
        rescale = tl.exp(peak - reference)
        probabilities = tl.exp(scores - reference[:, None])
        total = total * rescale + tl.sum(probabilities, 1)
        accumulator = accumulator * rescale[:, None] + tl.dot(probabilities.to(values.dtype), values)
        peak = new_peak
    return accumulator, peak, total


@triton.jit
def _rows(queries, kv_heads, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's batch row, key/value head and query rows: rows m = g · queries + i stand for
    query i of query head kv · GROUP + g, the GROUP heads that share key/value head ``kv``. 64-bit
    row and head numbers: a large cache's offsets pass 2^31 elements."""
    b = (tl.program_id(0) // kv_heads).to(tl.int64)
    kv = (tl.program_id(0) % kv_heads).to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, kv, kv * GROUP + m // queries, m % queries, m < GROUP * queries


@triton.jit
def _store(out_ptr, b, head, query, real, out_batch, out_row, out, DIM: tl.constexpr):
    d = tl.arange(0, DIM)
    tl.store(out_ptr + b * out_batch + query[:, None] * out_row + head[:, None] * DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])


@triton.jit
def block_attention(q_ptr, cache_k_ptr, cache_v_ptr, bias_ptr, k_ptr, v_ptr, fresh_bias_ptr, out_ptr,
                    partial_ptr, peak_ptr, total_ptr, starts_ptr,
                    kv_heads, length, queries, split_keys, scale,
                    q_batch, q_head, q_row, ck_batch, ck_head, ck_row, cv_batch, cv_head, cv_row,
                    k_batch, k_head, k_row, v_batch, v_head, v_row,
                    bias_batch, bias_row, fresh_bias_batch, fresh_bias_row, out_batch, out_row,
                    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                    FRESH: tl.constexpr, FRESH_BIAS: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr):
    """One program: BLOCK_M query rows of one batch row and key/value head, over the cache's keys
    from ``split_keys`` × program_id(2) on (``split_keys`` of them), and over the fresh keys (FRESH)
    if its part of the cache is the last. Without SPLIT (one part) it writes the attention's output;
    with SPLIT, its unnormalised sums, peaks and totals for ``combine_splits``. ALIGNED (one part):
    the row's keys from ``starts[b]`` on, its first real key, so that its tiles hold the same keys
    however much left padding precedes them."""
    b, kv, head, query, real = _rows(queries, kv_heads, GROUP, BLOCK_M)
    d = tl.arange(0, DIM)
    q = tl.load(q_ptr + b * q_batch + head[:, None] * q_head + query[:, None] * q_row + d[None, :],
                mask=real[:, None], other=0.0)
    peak = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    accumulator = tl.zeros((BLOCK_M, DIM), tl.float32)
    part = tl.program_id(2)
    first = part.to(tl.int64) * split_keys
    if ALIGNED:
        first += tl.load(starts_ptr + b).to(tl.int64)
    count = tl.minimum(length - first, split_keys)
    accumulator, peak, total = _attend_keys(
        q, cache_k_ptr + b * ck_batch + kv * ck_head + first * ck_row,
        cache_v_ptr + b * cv_batch + kv * cv_head + first * cv_row, ck_row, cv_row,
        bias_ptr + b * bias_batch + first * bias_row, bias_row, count, accumulator, peak, total, scale,
        True, BLOCK, DIM)
    if FRESH:
        fresh = tl.where(part == tl.num_programs(2) - 1, queries, 0)
        accumulator, peak, total = _attend_keys(
            q, k_ptr + b * k_batch + kv * k_head, v_ptr + b * v_batch + kv * v_head, k_row, v_row,
            fresh_bias_ptr + b * fresh_bias_batch, fresh_bias_row, fresh, accumulator, peak, total, scale,
            FRESH_BIAS, BLOCK, DIM)
    if SPLIT:
        rows = ((tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + part).to(tl.int64) \
            * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(partial_ptr + rows[:, None] * DIM + d[None, :], accumulator)
        tl.store(peak_ptr + rows, peak)
        tl.store(total_ptr + rows, total)
    else:
        _store(out_ptr, b, head, query, real, out_batch, out_row, accumulator / total[:, None], DIM)


@triton.jit
def combine_splits(partial_ptr, peak_ptr, total_ptr, out_ptr, kv_heads, queries, parts, out_batch, out_row,
                   GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The attention's output from the ``parts`` partial results of ``block_attention`` with SPLIT,
    for the same rows (same grid, less its third axis): log-sum-exp merging of the parts."""
    b, _, head, query, real = _rows(queries, kv_heads, GROUP, BLOCK_M)
    d = tl.arange(0, DIM)
    peak = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    accumulator = tl.zeros((BLOCK_M, DIM), tl.float32)
    first = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * parts
    for part in range(parts):
        rows = (first + part) * BLOCK_M + tl.arange(0, BLOCK_M)
        part_peak = tl.load(peak_ptr + rows)
        new_peak = tl.maximum(peak, part_peak)
        reference = _finite(new_peak)
        rescale, weight = tl.exp(peak - reference), tl.exp(part_peak - reference)
        total = total * rescale + tl.load(total_ptr + rows) * weight
        accumulator = accumulator * rescale[:, None] + tl.load(partial_ptr + rows[:, None] * DIM + d[None, :]) \
            * weight[:, None]
        peak = new_peak
    _store(out_ptr, b, head, query, real, out_batch, out_row, accumulator / total[:, None], DIM)
