"""The engine's runtime, below every batch: the model with its fused projections, the pool of KV
caches, the forward pass as the engine runs it (eager or compiled, fused or the model's own
arithmetic), and CUDA-graph capture and replay.

On CUDA each forward pass of a given shape is captured once as a CUDA graph (optionally of a
``torch.compile``d function) and replayed; a batch (``batch.BatchRun``) also captures whole greedy
block steps, forward pass and commits, through ``Runtime.replay`` over its cache's state tensors.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llada.engine.compile_cache import CompileCache
from llada.model import batch_invariant, block_attention
from llada.model.fusion import fuse_projections, projections_fused_in
from llada.model.kv_cache import KVCache, LayerPass, cached_forward, run_layer
from llada.model.quantize import Fp8Linear, Int8Linear
from llada.model.transformer import LLaDAModel


def _step_layer(*args: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``run_layer`` in a read-only block step: a function of its own, so that its compiled
    versions (a few shapes, static first) are kept and counted apart from the refreshes'."""
    return run_layer(*args)


def _refresh_layer(*args: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``run_layer`` in a refresh (writing the cache; any number of rows and queries)."""
    return run_layer(*args)


LAYER_RECOMPILE_LIMIT = 64
"""Compiled variants each layer function may have (Dynamo's default is 8). They are module-level,
so every compiled engine in a process adds to the same ones: a shape dimension that changes for
the first time, a cache mode whose optional inputs are None, another model. With ``fullgraph=True``
passing the limit is an error, which two models and a few settings reached at Dynamo's default."""


POOLED_CACHES = 2  # idle caches an engine keeps whatever their size (unless max_pooled_caches says otherwise)
POOLED_BYTES = 1 << 30  # and more while all idle caches' keys and values total at most this


@dataclass
class _Graph:
    """One captured pass: its copied inputs, the state tensors it works on in place, its output, and
    the CUDA graph that fills it."""

    cache: KVCache  # held, so that the memory the graph writes into stays allocated
    inputs: list[torch.Tensor | None]
    state_pointers: list[int]
    output: Any = None
    graph: torch.cuda.CUDAGraph | None = None


class Runtime:
    """One model's caches, compiled passes and captured graphs; the ``Engine`` holds one, its batches share it."""

    def __init__(self, model: LLaDAModel, cuda_graphs: bool | None = None, compile: bool = False,
                 max_pooled_caches: int | None = None, fuse: bool | None = None, capture_sampling: bool = True,
                 deterministic: bool = False, compile_cache: bool = True) -> None:
        """The arguments are ``Engine``'s (``engine.Engine.__init__`` documents them)."""
        self.model = model.eval()
        self.device = model.device
        self.deterministic = deterministic
        if deterministic:
            _check_deterministic(model, compile)
        self.fused = fuse_projections(model) if (self.device.type == "cuda" if fuse is None else fuse) else False
        self.compile_cache = CompileCache.for_engine(model, bool(self.fused)) if compile and compile_cache else None
        # How many saved blobs were preloaded (0 for a first start; none without a cache).
        self.compile_cache_loaded = self.compile_cache.activate() if self.compile_cache is not None else 0
        self.weights_version = getattr(model, "weights_version", 0)  # see check_weights
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        # One layer is compiled, not the unrolled network (``kv_cache.run_layer``): every layer
        # reuses it, so the 8B shape compiles in seconds and a cached start re-traces one layer.
        # Block steps (read-only, a few shapes) compile with static shapes first (dynamic=None: a
        # second cache length recompiles once, with symbolic lengths); refreshes, whose number of
        # rows and queries varies (rows joining, answer-only refreshes), compile once with symbolic
        # shapes, as a function of their own so that they keep their own recompile budget.
        self.compiled = compile
        self.capture_sampling = capture_sampling
        self.step_layer: LayerPass = (
            torch.compile(_step_layer, dynamic=None, fullgraph=True) if compile else run_layer)
        self.refresh_layer: LayerPass = (
            torch.compile(_refresh_layer, dynamic=True, fullgraph=True) if compile else run_layer)
        self.max_pooled_caches = max_pooled_caches
        self._free_caches: list[KVCache] = []  # oldest first
        self._graphs: dict[tuple, _Graph] = {}
        # Graphs captured so far, recaptures after a pooled cache's eviction included: a capture costs
        # far more than a replay, so benchmarks count them to tell warm-up from steady state.
        self.captures = 0
        config = model.config
        self.mask_id = config.mask_token_id
        self.end_ids = tuple(i for i in (config.eos_token_id, config.eot_token_id) if i is not None)
        if self.mask_id is None:
            raise ValueError("the model config has no mask_token_id")

    def save_compile_cache(self) -> None:
        """Save the compile cache; a write that fails (a full disk) turns it off with a warning."""
        try:
            self.compile_cache.save()
        except OSError as error:
            warnings.warn(f"compile cache turned off: saving to {self.compile_cache.directory} failed ({error})",
                          stacklevel=2)
            self.compile_cache = None

    def numerics(self) -> contextlib.AbstractContextManager:
        """The context a batch's step runs in: batch-invariant kernels on deterministic engines."""
        return batch_invariant.enabled() if self.deterministic else contextlib.nullcontext()

    def release_memory(self) -> None:
        """Drop pooled caches and captured graphs (they are rebuilt on demand)."""
        self._free_caches = []
        for entry in self._graphs.values():
            entry.cache.graph_pool = None  # its graphs are gone: never capture into that pool again
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def check_weights(self, replay: bool) -> None:
        """Refuse to run on weights other than those this engine was made for: fused or quantized
        since (the version counter; cheap enough for every replay), or moved or reloaded under the
        fused matrices (every block checked, before a capture or a plain pass)."""
        if getattr(self.model, "weights_version", 0) != self.weights_version:
            raise RuntimeError("the model's weights were replaced (fused by another engine, or quantized) after this "
                               "engine was made; make a new Engine for the model as it is now")
        if self.fused and not replay and not all(projections_fused_in(block) for block in self.model.blocks):
            raise RuntimeError("the model's weights were moved or reloaded after the engine fused them; "
                               "make a new Engine for the model as it is now")

    def acquire_cache(self, rows: int, length: int) -> KVCache:
        """A cache of this shape: a pooled one (its captured graphs still valid) or a new one."""
        for index, cache in enumerate(self._free_caches):
            if (cache.batch, cache.length) == (rows, length):
                return self._free_caches.pop(index)
        return KVCache.allocate(self.model, rows, length)

    def release_cache(self, cache: KVCache) -> None:
        """Return a cache to the pool; past the pool's limit (``_pool_full``) the oldest idle caches
        are freed with their graphs."""
        self._free_caches.append(cache)
        while self._pool_full():
            evicted = self._free_caches.pop(0)
            for key in [k for k, entry in self._graphs.items() if entry.cache is evicted]:
                del self._graphs[key]
            evicted.graph_pool = None

    def _pool_full(self) -> bool:
        """Whether the idle caches are more than the pool keeps: ``max_pooled_caches`` of them if set;
        by default at least ``POOLED_CACHES`` and more while their entries total at most
        ``POOLED_BYTES``. A batch shrinks through several cache shapes as its rows finish (``row_bucket``
        sizes), and a shape that left the pool captures its graphs again on the next call:
        small caches are cheap to keep, large ones (the 8B shape's) are not."""
        count = len(self._free_caches)
        if self.max_pooled_caches is not None:
            return count > self.max_pooled_caches
        pooled_bytes = sum(cache.entries.numel() * cache.entries.element_size() for cache in self._free_caches)
        return count > POOLED_CACHES and pooled_bytes > POOLED_BYTES

    @torch.no_grad()
    def forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
                key_bias: torch.Tensor | None, write: bool = True, exact: bool = False) -> torch.Tensor:
        """``plain_forward`` through a CUDA graph captured for this cache and these shapes.

        The returned logits live in the graph's output buffer: read them before the next call.
        """
        def run(tokens: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
                key_bias: torch.Tensor | None) -> torch.Tensor:
            return self.plain_forward(cache, tokens, positions, logits_index, key_bias, write, exact)

        key = ("forward", id(cache), tokens.shape, positions.shape, logits_index.shape,
               None if key_bias is None else key_bias.shape, write, exact)
        return self.replay(key, cache, run, [tokens, positions, logits_index, key_bias])

    def plain_forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
                      key_bias: torch.Tensor | None, write: bool, exact: bool = False,
                      query_mask: torch.Tensor | None = None, return_entries: bool = False) -> Any:
        """``cached_forward`` as the engine runs it.

        ``exact``: the model's own arithmetic, eagerly (the exact mode, which equals the reference
        sampler bit for bit). Otherwise fused matmuls, and on compiling engines the compiled
        layer functions: read-only block steps (``write=False``) or refreshes writing the cache.
        ``query_mask`` and ``return_entries`` as in ``cached_forward``.
        """
        compiled_layer = None if exact or not self.compiled else self.refresh_layer if write else self.step_layer
        # Dynamo's limit applies while a call compiles; patched once per pass, not per layer (~26 µs each)
        limit = (torch._dynamo.config.patch(recompile_limit=LAYER_RECOMPILE_LIMIT) if compiled_layer is not None
                 else contextlib.nullcontext())
        with limit:
            return cached_forward(self.model, tokens, positions, cache, key_bias, logits_index, write,
                                  self.fused and not exact, query_mask, return_entries, compiled_layer)

    def replay(self, key: tuple, cache: KVCache, function: Callable[..., Any], inputs: list[torch.Tensor | None],
               state: Sequence[torch.Tensor] = (), graph: bool = True) -> Any:
        """``function(*state, *inputs)``, through a CUDA graph captured once per ``key`` on graph engines.

        ``key`` must name everything the function bakes in (shapes, settings, host numbers). ``inputs``
        are copied into the graph's own tensors at every call; ``state`` tensors are read and written
        in place, so they must be the same tensors at every call of a key (a cache's state tensors).
        The output lives in the graph's buffers: read it before the next call. ``graph=False`` calls
        the function plainly (a pass not worth capturing).
        """
        captured = self.cuda_graphs and graph
        self.check_weights(replay=captured)
        if not captured:
            return function(*state, *inputs)
        entry = self._graphs.get(key)
        if entry is None:
            self.check_weights(replay=False)  # every block, before the weights are baked into a graph
            entry = self._capture(cache, function, inputs, state)
            self._graphs[key] = entry
            self.captures += 1
            if self.compile_cache is not None:  # a new shape may have compiled: keep it for the next process
                self.save_compile_cache()
        if entry.state_pointers != [tensor.data_ptr() for tensor in state]:
            raise RuntimeError("a captured step was replayed on other state tensors than it was captured on")
        for static, value in zip(entry.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()
        return entry.output

    def _capture(self, cache: KVCache, function: Callable[..., Any], inputs: list[torch.Tensor | None],
                 state: Sequence[torch.Tensor]) -> _Graph:
        entry = _Graph(cache=cache, inputs=[None if a is None else a.clone() for a in inputs],
                       state_pointers=[tensor.data_ptr() for tensor in state])
        # Warm-up on a side stream (compiles, picks kernels), on copies of the state so that it changes
        # nothing; it writes the cache, as the replay below does again with the same tokens.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # twice: the second call must find everything compiled
                function(*[tensor.clone() for tensor in state], *entry.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        # thread_local: a server captures on its worker thread while other threads (the web server's,
        # the garbage collector's) may free or copy CUDA memory; the default "global" mode would let
        # their calls abort this capture.
        if cache.graph_pool is None:
            cache.graph_pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(entry.graph, pool=cache.graph_pool, capture_error_mode="thread_local"):
                entry.output = function(*state, *entry.inputs)
        except BaseException:
            if not any(other.cache is cache for other in self._graphs.values()):
                cache.graph_pool = None  # a failed capture leaves its pool's count unreliable
            raise
        return entry


def _check_deterministic(model: LLaDAModel, compile: bool) -> None:
    """Refuse what deterministic mode cannot make batch-invariant, naming it."""
    if compile:
        raise ValueError("deterministic mode runs the forward passes eagerly (captured as CUDA graphs on GPUs); "
                         "torch.compile generates reductions whose split depends on the batch: drop compile")
    quantized = sorted({type(module).__name__ for module in model.modules()
                        if isinstance(module, (Int8Linear, Fp8Linear))})
    if quantized:
        raise ValueError(f"deterministic mode has no batch-invariant kernels for quantized layers "
                         f"({', '.join(quantized)}); load the model without quantization")
    if model.device.type not in ("cpu", "cuda"):
        raise ValueError(f"deterministic mode runs on CPUs and CUDA GPUs; the model is on {model.device.type}")
    if model.device.type == "cuda":
        dim = model.config.head_dim
        if not batch_invariant.gpu_kernels_available(model.device):
            raise ValueError("deterministic mode on a GPU needs Triton and compute capability 8.0 or later")
        probe = torch.empty(1, 1, 1, dim, dtype=model.dtype, device=model.device)
        if not block_attention.available(probe, probe):
            raise ValueError(f"deterministic mode on a GPU needs bf16 or fp16 weights and a head dimension that is a "
                             f"power of two from 16 to 128 (the attention kernel's); got {model.dtype}, {dim}")
