"""The Triton source of ``llada.model.batch_invariant`` (imported only where Triton is installed).

Both kernels fix how every output element is reduced, whatever the number of rows: the matmul gives
each output tile to one program that walks the inner dimension in steps of BLOCK_K from the start
(no split of the inner dimension, one tile shape for every call), and the row sum walks each row in
chunks of BLOCK, in order, in one program of its own.
"""

import triton
import triton.language as tl


@triton.jit
def matmul(a_ptr, b_ptr, c_ptr, M, N, K, a_batch, a_row, a_col, b_batch, b_row, b_col, c_batch, c_row, c_col,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
           IEEE: tl.constexpr):
    """C[z] = A[z] @ B[z] for the batch element z = program_id(1): (M, K) @ (K, N), float32
    accumulation, one rounding to C's dtype. Tiles are visited in groups of GROUP_M rows of tiles
    (neighbouring programs share B's columns in the L2 cache); that changes the order in which tiles
    are computed, never how one is. IEEE: float32 inputs multiplied in float32, not TF32."""
    pid = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    a = a_ptr + z * a_batch + m[:, None] * a_row
    b = b_ptr + z * b_batch + n[None, :] * b_col
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        inner = start + k
        a_tile = tl.load(a + inner[None, :] * a_col, mask=(m[:, None] < M) & (inner[None, :] < K), other=0.0)
        b_tile = tl.load(b + inner[:, None] * b_row, mask=(inner[:, None] < K) & (n[None, :] < N), other=0.0)
        if IEEE:
            accumulator = tl.dot(a_tile, b_tile, accumulator, input_precision="ieee")
        else:
            accumulator = tl.dot(a_tile, b_tile, accumulator)
    c = c_ptr + z * c_batch + m[:, None] * c_row + n[None, :] * c_col
    tl.store(c, accumulator.to(c_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def row_sum(x_ptr, out_ptr, N, row_stride, BLOCK: tl.constexpr):
    """out[r] = the sum of row r's N elements (contiguous), accumulated in out's dtype (float32 or
    float64), chunk by chunk of BLOCK in order, then across the chunk's lanes."""
    r = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        columns = start + lanes
        total += tl.load(x_ptr + r * row_stride + columns, mask=columns < N, other=0.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r, tl.sum(total, 0))
