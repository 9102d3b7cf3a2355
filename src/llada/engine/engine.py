"""The fast generation engine: block-wise KV caching, parallel decoding policies, batching, CUDA graphs.

The reference sampler (``sampling.generate``) runs the model over prompt + answer at every step.
Here a step instead runs one of three forward passes, all through ``kv_cache.cached_forward``:

- *refresh*: every position is a query; fills the cache and equals the full forward pass exactly.
  It runs at the first step of each block (and every ``refresh_every`` steps within one). With
  ``keep_prompt`` only a row's first refresh is complete; later ones query the answer's positions
  and read the prompt's keys/values from the cache.
- *dual* step: only the current block's positions are queries; the prompt, the decided blocks and
  the still-masked later blocks are read from the cache (Fast-dLLM's DualCache).
- *prefix* step: the block and everything after it are queries; only the prefix is cached
  (Fast-dLLM's PrefixCache).

``cache="none"`` refreshes at every step: the *exact* mode, token-for-token the reference sampler
(same proposals, confidences and top-k choices). The approximations trade that for speed; see
docs/engine.md for measured agreement and speed.

Batches: prompts of different lengths are left-padded and their padding hidden from attention;
every row decodes the same answer layout at its own pace (``batch_run.py``); rows that finish early
(an end-of-text token with everything before it decided) stop decoding, and the batch shrinks to
the rows still decoding once half of it is done.
``Engine.start`` returns a ``BatchRun`` whose ``step()`` advances one denoising step, so a server
can interleave many runs and let requests join and leave between steps (``scheduler.py``).

On CUDA each forward pass of a given shape is captured once as a CUDA graph (optionally of a
``torch.compile``d function) and replayed (refreshes of some rows of a batch only when short:
``batch_run.CAPTURED_REFRESH_FLOPS``); a greedy block step is captured whole, forward pass and
commits (``Engine.replay`` over the cache's state tensors), so that it costs one graph launch, with
no host synchronisation except where the policy needs a count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from llada.diffusion.sampling import REMASKING_CHOICES, Remasking
from llada.engine.decoding import POLICIES, Policy
from llada.model.fusion import fuse_projections, projections_fused_in
from llada.model.kv_cache import KVCache, cached_forward
from llada.model.transformer import LLaDAModel

if TYPE_CHECKING:
    from llada.engine.batch import BatchRun

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES: tuple[str, ...] = ("none", "prefix", "dual")


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Defaults: dual cache, confidence threshold 0.9, blocks of 32 (Fast-dLLM's)."""

    gen_length: int = 128
    block_length: int = 32
    policy: Policy = "threshold"
    steps: int | None = None  # fixed policy: total steps (None = gen_length, one token per step)
    threshold: float = 0.9
    factor: float = 1.0
    cache: CacheMode = "dual"
    refresh_every: int = 0  # also refresh the cache every N steps inside a block (0 = block starts only)
    # Approximate modes: after a row's first refresh, later refreshes recompute the answer's keys/values
    # only and keep the prompt's from that first pass (the prompt is encoded once, as in an
    # autoregressive model): a refresh over gen_length positions instead of prompt + gen_length.
    keep_prompt: bool = False
    # Dual cache: block steps recompute only the block's undecided positions and those decided since
    # their keys/values were last stored; the other decided positions are read from the cache (each is
    # computed once more after it is decided). Fewer queries per step: for large, compute-bound batches.
    reuse_decided: bool = False
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: Remasking = "low_confidence"
    early_stop: bool = True  # stop a row once its answer up to an end-of-text token is decided
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def validate(self, max_length: int | None = None, prompt_length: int = 0) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {self.gen_length}")
        if not 0 < self.block_length <= self.gen_length:
            raise ValueError(f"block_length must be between 1 and gen_length ({self.gen_length}), got {self.block_length}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {CACHE_MODES}")
        if self.remasking not in REMASKING_CHOICES:
            raise ValueError(f"unknown remasking {self.remasking!r}; choose one of {REMASKING_CHOICES}")
        if self.policy == "fixed":
            steps = self.total_steps
            blocks = self.gen_length // self.block_length
            if not blocks <= steps <= self.gen_length or steps % blocks:
                raise ValueError(f"steps must be a multiple of the number of blocks ({blocks}) between {blocks} and "
                                 f"gen_length ({self.gen_length}), got {steps}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise ValueError(f"factor must be positive, got {self.factor}")
        if self.reuse_decided and self.cache != "dual":
            raise ValueError(f"reuse_decided needs cache='dual' (got {self.cache!r}): the other modes recompute the "
                             "decided positions anyway")
        if self.keep_prompt and self.cache == "none":
            raise ValueError("keep_prompt needs a cache (prefix or dual): cache='none' refreshes everything every step")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if max_length is not None and prompt_length + self.gen_length > max_length:
            raise ValueError(f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}) exceeds the model's "
                             f"max_sequence_length {max_length}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length


@dataclass
class StepUpdate:
    """What one step decided, for streaming. Tensors are on the CPU; rows are the caller's prompt order."""

    step: int  # steps run so far in this batch (1 = the first)
    blocks: list[int]  # each row's block being decoded (the number of blocks once it is finished or dropped)
    answer: torch.Tensor  # (B, G) the answers so far; undecided positions hold the mask id
    decided: torch.Tensor  # (B, G) bool: decided by this step
    finished: list[bool]  # rows whose answer is complete (never a dropped row)


@dataclass
class Generation:
    """One prompt's result."""

    answer: torch.Tensor  # (G,) all answer positions (after an early stop, the tail is end-of-text)
    tokens: list[int]  # the answer up to and including its first end-of-text token (EOS or EoT)
    steps: int  # denoising steps this row took part in
    finish_reason: Literal["stop", "length"]  # "stop": ended with an end-of-text token


def _refresh_pass(model: LLaDAModel, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  key_bias: torch.Tensor | None, logits_index: torch.Tensor, fused: bool) -> torch.Tensor:
    """``cached_forward`` writing the cache (a refresh), as a function of its own to compile apart."""
    return cached_forward(model, tokens, positions, cache, key_bias, logits_index, True, fused)


@dataclass
class _Graph:
    """One captured pass: its copied inputs, the state tensors it works on in place, its output, and
    the CUDA graph that fills it."""

    cache: KVCache  # held, so that the memory the graph writes into stays allocated
    inputs: list[torch.Tensor | None]
    state_pointers: list[int]
    output: Any = None
    graph: torch.cuda.CUDAGraph | None = None


class Engine:
    """Fast generation for one model. Keep one per model and process; it caches compiled graphs."""

    def __init__(self, model: LLaDAModel, cuda_graphs: bool | None = None, compile: bool = False,
                 max_pooled_caches: int = 2, fuse: bool | None = None, capture_sampling: bool = True) -> None:
        """
        Args:
            model: the mask predictor, in eval mode, on its device and dtype.
            cuda_graphs: capture each forward shape as a CUDA graph (default: on CUDA devices).
            compile: ``torch.compile`` the forward passes (fuses norms, RoPE and SwiGLU; the first
                call of each shape compiles for some seconds, up to a minute at the 8B shape): block
                steps, and refreshes except in the exact mode (``cache="none"``), which keeps the
                model's own eager arithmetic so as to equal the reference sampler bit for bit.
            max_pooled_caches: idle KV caches kept for reuse (each keeps its captured graphs, so a
                later batch of the same shape starts without capturing again).
            fuse: run q/k/v and gate/up as one matmul each (``fusion.fuse_projections``: the
                model's weights become views of fused matrices, in place; default: on CUDA devices).
                The model must not be moved or reloaded while the engine is in use. The exact mode
                keeps the model's own matmuls (it stays bit-identical to the reference); every
                other pass uses the fused ones.
            capture_sampling: with CUDA graphs, capture greedy block steps whole — the forward pass and
                the choice and commit of tokens — as one graph, so that the host launches one graph
                per step instead of a dozen small kernels after it. False captures the forward pass only.
        """
        self.model = model.eval()
        self.device = model.device
        self.fused = fuse_projections(model) if (self.device.type == "cuda" if fuse is None else fuse) else False
        self.weights_version = getattr(model, "weights_version", 0)  # see _check_weights
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        # Block steps (read-only, a few shapes) compile with static shapes first (dynamic=None: a
        # second cache length recompiles once, with symbolic lengths); refreshes, whose number of
        # rows and queries varies (rows joining, answer-only refreshes), compile once with symbolic
        # shapes, as a function of their own so that they keep their own recompile budget.
        self.compiled = compile
        self.capture_sampling = capture_sampling
        self.step_fn: Callable[..., torch.Tensor] = (
            torch.compile(cached_forward, dynamic=None, fullgraph=True) if compile else cached_forward)
        self.refresh_fn: Callable[..., torch.Tensor] = (
            torch.compile(_refresh_pass, dynamic=True, fullgraph=True) if compile else _refresh_pass)
        self.max_pooled_caches = max_pooled_caches
        self._free_caches: list[KVCache] = []  # oldest first
        self._graphs: dict[tuple, _Graph] = {}
        config = model.config
        self.mask_id = config.mask_token_id
        self.end_ids = tuple(i for i in (config.eos_token_id, config.eot_token_id) if i is not None)
        if self.mask_id is None:
            raise ValueError("the model config has no mask_token_id")

    # --- public API ------------------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]] | torch.Tensor, settings: GenerationSettings | None = None,
              generator: torch.Generator | None = None, prompt_room: int = 0) -> BatchRun:
        """Begin decoding ``prompts`` (lists of ids, or a (B, P) tensor of equal-length prompts).

        ``prompt_room`` left-pads to at least that many prompt tokens, so that prompts up to that
        length can join the batch later (``BatchRun.add``).
        """
        from llada.engine.batch import BatchRun  # the run module imports this one

        return BatchRun(self, prompts, settings or GenerationSettings(), generator, prompt_room)

    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, settings: GenerationSettings | None = None,
                 generator: torch.Generator | None = None, progress: bool = False) -> list[Generation]:
        """Decode to the end and return one ``Generation`` per prompt, in order."""
        run = self.start(prompts, settings, generator)
        with tqdm(total=run.max_steps, desc="denoising", unit="step", disable=not progress, leave=False) as bar:
            while run.advance():
                bar.update(1)
        return run.results()

    def stream(self, prompts: Sequence[Sequence[int]] | torch.Tensor, settings: GenerationSettings | None = None,
               generator: torch.Generator | None = None) -> Iterator[StepUpdate]:
        """Yield a ``StepUpdate`` after every step (the chat and the server show these)."""
        run = self.start(prompts, settings, generator)
        try:
            while (update := run.step()) is not None:
                yield update
        finally:
            if not run.done:  # the consumer stopped early: give the cache (and its graphs) back
                run.cancel()

    def release_memory(self) -> None:
        """Drop pooled caches and captured graphs (they are rebuilt on demand)."""
        self._free_caches = []
        for entry in self._graphs.values():
            entry.cache.graph_pool = None  # its graphs are gone: never capture into that pool again
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_weights(self, replay: bool) -> None:
        """Refuse to run on weights other than those this engine was made for: fused or quantized
        since (the version counter; cheap enough for every replay), or moved or reloaded under the
        fused matrices (every block checked, before a capture or a plain pass)."""
        if getattr(self.model, "weights_version", 0) != self.weights_version:
            raise RuntimeError("the model's weights were replaced (fused by another engine, or quantized) after this "
                               "engine was made; make a new Engine for the model as it is now")
        if self.fused and not replay and not all(projections_fused_in(block) for block in self.model.blocks):
            raise RuntimeError("the model's weights were moved or reloaded after the engine fused them; "
                               "make a new Engine for the model as it is now")

    # --- caches and graphs (used by BatchRun) ----------------------------------------------------

    def acquire_cache(self, rows: int, length: int) -> KVCache:
        """A cache of this shape: a pooled one (its captured graphs still valid) or a new one."""
        for index, cache in enumerate(self._free_caches):
            if (cache.batch, cache.length) == (rows, length):
                return self._free_caches.pop(index)
        return KVCache.allocate(self.model, rows, length)

    def release_cache(self, cache: KVCache) -> None:
        """Return a cache to the pool; beyond ``max_pooled_caches`` the oldest is freed with its graphs."""
        self._free_caches.append(cache)
        while len(self._free_caches) > self.max_pooled_caches:
            evicted = self._free_caches.pop(0)
            for key in [k for k, entry in self._graphs.items() if entry.cache is evicted]:
                del self._graphs[key]
            evicted.graph_pool = None

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
        functions: read-only block steps (``write=False``) or refreshes writing the cache.
        ``query_mask`` and ``return_entries`` as in ``cached_forward`` (block steps only).
        """
        if exact or not self.compiled:
            return cached_forward(self.model, tokens, positions, cache, key_bias, logits_index, write,
                                  self.fused and not exact, query_mask, return_entries)
        if write:
            return self.refresh_fn(self.model, tokens, positions, cache, key_bias, logits_index, self.fused)
        return self.step_fn(self.model, tokens, positions, cache, key_bias, logits_index, False, self.fused,
                            query_mask, return_entries)

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
        self._check_weights(replay=captured)
        if not captured:
            return function(*state, *inputs)
        entry = self._graphs.get(key)
        if entry is None:
            self._check_weights(replay=False)  # every block, before the weights are baked into a graph
            entry = self._capture(cache, function, inputs, state)
            self._graphs[key] = entry
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
