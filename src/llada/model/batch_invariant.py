"""Batch-invariant numerics: a row's result is the same bits whatever else shares its batch.

On a GPU the library kernels behind a matmul or a reduction pick their tiling by the problem's size:
cuBLAS chooses another algorithm (and may split the inner dimension) when a batch has more rows, a
reduction over few rows splits each row across more threads. Every choice is deterministic, but a
row computed among 16 rows can round differently from the same row alone, and at temperature 0 one
ulp of a bf16 confidence can reorder a decoding policy's choices. Inside ``enabled()`` (one thread;
a ``TorchDispatchMode``), the operations the engine's forward passes and commits use run kernels
whose reduction order does not depend on the number of rows:

- matrix products (``mm``, ``addmm``, ``bmm``): one Triton kernel with one tile shape for every
  call, each output tile reduced by one program from the first inner index to the last;
- sums and means over the last dimension, softmax and log-softmax: one program per row, walking it
  in fixed chunks in order.

Everything else the engine runs is elementwise, a gather, or an exact comparison (max, top-k).
Attention is made invariant by its caller (``kv_cache``: each row attends from its own first real
key, so left padding does not shift the tiles); ``active()`` tells it the mode is on. On the CPU,
matrix products run in fixed-size pieces of rows (PyTorch's CPU matmul takes another path for one
row than for many); its reductions already reduce each row the same way at any batch size
(``tests/engine/test_deterministic.py`` checks the logits bit for bit).

The cost is speed: one fixed tile shape is slower than cuBLAS's choice at most sizes
(``benchmarks/deterministic_cost.py`` measures it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# The matmul's one configuration (tiles of BLOCK_M × BLOCK_N outputs, BLOCK_K inner indices a step).
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, WARPS, STAGES = 64, 128, 64, 8, 4, 3
ROW_BLOCK = 1024  # the row sum's chunk
CPU_ROWS = 16  # rows of a CPU matmul (``_fixed_shape_mm``)


class _ThreadState(threading.local):
    on = False  # a class default: every thread reads the attribute, none has to create it


_thread = _ThreadState()
aten = torch.ops.aten


def active() -> bool:
    """Whether batch-invariant numerics are on in this thread. False while ``torch.compile`` traces
    (deterministic engines never compile; guarding compiled code on a thread's flag would only make
    default engines recompile)."""
    return not torch.compiler.is_compiling() and _thread.on


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Run the enclosed operations with batch-invariant kernels (this thread only; re-entrant)."""
    if active():
        yield
        return
    _thread.on = True
    try:
        with _InvariantOperations():
            yield
    finally:
        _thread.on = False


@functools.cache
def gpu_kernels_available(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: a CUDA GPU of compute capability 8 or later
    (bf16 tensor-core products) with Triton installed. Cached: every routed operation asks."""
    return (device.type == "cuda" and TRITON_INSTALLED
            and torch.cuda.get_device_properties(device).major >= 8)


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use so that importing this module needs no Triton."""
    from llada.model import batch_invariant_kernels

    return batch_invariant_kernels


def _launch_context(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device, not the tensors'; CPU tensors run in Triton's
    interpreter (TRITON_INTERPRET=1, the tests' way to check the kernels without a GPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for (M, K) @ (K, N) or batched (Z, M, K) @ (Z, K, N), of one float dtype, by the
    fixed-tile kernel: row i of the result depends only on row i of ``a`` (and ``b``)."""
    if a.dtype != b.dtype or a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul of {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    batched = a.dim() == 3
    a3, b3 = (a, b) if batched else (a[None], b[None])
    if a3.shape[0] != b3.shape[0]:
        raise ValueError(f"batched matmul of {a3.shape[0]} and {b3.shape[0]} matrices")
    batch, rows, inner = a3.shape
    columns = b3.shape[2]
    out = a3.new_empty((batch, rows, columns))
    if out.numel() == 0 or inner == 0:
        out.zero_()
    else:
        grid = (-(-rows // BLOCK_M) * -(-columns // BLOCK_N), batch)
        with _launch_context(a3):
            _kernels().matmul[grid](a3, b3, out, rows, columns, inner, *a3.stride(), *b3.stride(), *out.stride(),
                                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                    IEEE=a.dtype == torch.float32, num_warps=WARPS, num_stages=STAGES)
    return out if batched else out[0]


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """The sums of ``x`` over its last dimension, shape ``x.shape[:-1]``, accumulated in float32
    (float64 for float64 input) by the row kernel: each row summed alone, in fixed chunks, in order."""
    width = x.shape[-1]
    flat = x.reshape(-1, width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    if flat.shape[0] and width:
        with _launch_context(flat):
            _kernels().row_sum[(flat.shape[0],)](flat, out, width, flat.stride(0), BLOCK=ROW_BLOCK)
    elif flat.shape[0]:
        out.zero_()
    return out.reshape(x.shape[:-1])


# --- the operations the mode replaces ----------------------------------------------------------------

def _served(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: floating, on a GPU they run on (elsewhere PyTorch's own
    operations run; see the module's docstring)."""
    return all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors) and \
        gpu_kernels_available(tensors[0].device)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    if _served(a, b) and a.dtype != torch.float64:
        return matmul(a, b)
    if a.dim() == 2 and a.device.type == "cpu":
        return _fixed_shape_mm(a, b)
    return None


def _fixed_shape_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` on the CPU as products of CPU_ROWS rows of ``a`` at a time (the last zero-padded):
    PyTorch's CPU matmul takes other paths for other row counts (a matrix-vector product for one
    row), which round differently, while rows of a product of one shape come out the same wherever
    they sit in it."""
    rows = a.shape[0]
    padded = -(-rows // CPU_ROWS) * CPU_ROWS
    if padded != rows:
        a = torch.cat([a, a.new_zeros(padded - rows, a.shape[1])])
    return torch.cat([torch.mm(chunk, b) for chunk in a.split(CPU_ROWS)])[:rows]


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1
           ) -> torch.Tensor | None:
    """``beta · bias + alpha · a @ b``; the product is rounded to its dtype before the bias is added
    (cuBLAS adds it before), and with ``beta`` 0 the bias is ignored (NaNs in it too), as in PyTorch."""
    product = _mm(a, b)
    if product is None:
        return None
    compute = torch.promote_types(product.dtype, torch.float32)
    result = alpha * product.to(compute)
    if beta != 0:
        result = result + beta * bias.to(compute)
    return result.to(product.dtype)


def _last_dim_only(x: torch.Tensor, dims: list[int] | None) -> bool:
    """Whether ``dims`` (as passed to a reduction) names exactly the last dimension of ``x``."""
    return dims is not None and len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1


def _sum(x: torch.Tensor, dims: list[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None,
         mean: bool = False) -> torch.Tensor | None:
    """A sum (or mean) over the last dimension; ``dtype``, as in PyTorch, is what ``x`` is cast to
    first (integer ones left to PyTorch)."""
    if dtype is not None and dtype != x.dtype:
        if not dtype.is_floating_point:
            return None
        x = x.to(dtype)
    if x.dim() == 0 or not _served(x) or not _last_dim_only(x, dims):
        return None
    total = row_sums(x)
    if mean:
        total = total / x.shape[-1]
    total = total.to(dtype or x.dtype)
    return total.unsqueeze(-1) if keepdim else total


def _mean(x: torch.Tensor, dims: list[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
          ) -> torch.Tensor | None:
    return _sum(x, dims, keepdim, dtype=dtype, mean=True)


def _softmax_parts(x: torch.Tensor, dim: int, half_to_float: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.dtype] | None:
    """(x - its row maximum, the row sums of their exponents, the output dtype) over the last dimension."""
    if x.dim() == 0 or not _served(x) or dim % x.dim() != x.dim() - 1:
        return None
    compute = torch.promote_types(x.dtype, torch.float32)
    shifted = x.to(compute) - x.amax(-1, keepdim=True).to(compute)  # the maximum is exact at any batch size
    return shifted, row_sums(shifted.exp()).unsqueeze(-1), compute if half_to_float else x.dtype


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor | None:
    parts = _softmax_parts(x, dim, half_to_float)
    return None if parts is None else (parts[0].exp() / parts[1]).to(parts[2])


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor | None:
    parts = _softmax_parts(x, dim, half_to_float)
    return None if parts is None else (parts[0] - parts[1].log()).to(parts[2])


_REPLACEMENTS = {
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _mm,
    aten.sum.dim_IntList: _sum,
    aten.mean.dim: _mean,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _log_softmax,
}


class _InvariantOperations(TorchDispatchMode):
    """Routes the operations of ``_REPLACEMENTS`` to the batch-invariant kernels where they serve the
    arguments (each replacement returns None where they do not), everything else to PyTorch."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = _REPLACEMENTS.get(func)
        if replacement is not None:
            result = replacement(*args, **kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)
