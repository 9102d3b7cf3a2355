"""The fast generation engine: block-wise KV caching, parallel decoding policies, batching, CUDA graphs.

The reference sampler (``sampling.generate``) runs the model over prompt + answer at every step.
Here a step instead runs one of three forward passes, all through ``kv_cache.cached_forward``:

- *refresh*: every position is a query; fills the cache and equals the full forward pass exactly.
  It runs at the first step of each block (and every ``refresh_every`` steps within one).
- *dual* step: only the current block's positions are queries; the prompt, the decided blocks and
  the still-masked later blocks are read from the cache (Fast-dLLM's DualCache).
- *prefix* step: the block and everything after it are queries; only the prefix is cached
  (Fast-dLLM's PrefixCache).

``cache="none"`` refreshes at every step: the *exact* mode, token-for-token the reference sampler
(same proposals, confidences and top-k choices). The approximations trade that for speed; see
docs/engine.md for measured agreement and speed.

Batches: prompts of different lengths are left-padded and their padding hidden from attention;
every row decodes the same answer layout, rows that finish early (an end-of-text token with
everything before it decided) stop being computed, and shrink the batch when half of it is done.
``Engine.start`` returns a ``BatchRun`` whose ``step()`` advances one denoising step, so a server
can interleave many runs and let requests join and leave between steps (``scheduler.py``).

On CUDA each forward pass of a given shape is captured once as a CUDA graph (optionally of a
``torch.compile``d function) and replayed: a step costs one graph launch plus a handful of small
sampling kernels, with no host synchronisation except where the policy needs a count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from llada.decoding import POLICIES, Policy, propose, select
from llada.kv_cache import KVCache, cached_forward
from llada.model import LLaDAModel, attention_bias
from llada.sampling import REMASKING_CHOICES, num_transfer_tokens

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
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
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
    block: int  # block being decoded
    answer: torch.Tensor  # (B, G) the answers so far; undecided positions hold the mask id
    decided: torch.Tensor  # (B, G) bool: decided by this step
    finished: list[bool]  # rows whose answer is complete


@dataclass
class Generation:
    """One prompt's result."""

    answer: torch.Tensor  # (G,) all answer positions (after an early stop, the tail is end-of-text)
    tokens: list[int]  # the answer up to and including its first end-of-text token (EOS or EoT)
    steps: int  # denoising steps this row took part in
    finish_reason: Literal["stop", "length"]  # "stop": ended with an end-of-text token


@dataclass
class _Forward:
    """One captured (or plain) forward pass: static inputs, output, and the CUDA graph that fills it."""

    cache: KVCache  # held, so that the memory the graph writes into stays allocated
    inputs: list[torch.Tensor | None]
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class Engine:
    """Fast generation for one model. Keep one per model and process; it caches compiled graphs."""

    def __init__(self, model: LLaDAModel, cuda_graphs: bool | None = None, compile: bool = False,
                 max_pooled_caches: int = 2) -> None:
        """
        Args:
            model: the mask predictor, in eval mode, on its device and dtype.
            cuda_graphs: capture each forward shape as a CUDA graph (default: on CUDA devices).
            compile: ``torch.compile`` the cached forward pass (fuses norms, RoPE and SwiGLU; the
                first call of each shape compiles for some seconds).
            max_pooled_caches: idle KV caches kept for reuse (each keeps its captured graphs, so a
                later batch of the same shape starts without capturing again).
        """
        self.model = model.eval()
        self.device = model.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        # Only block steps are compiled: they are launch- and memory-bound, where fusion pays; a
        # refresh (every position a query) is compute-bound and runs eagerly, which also keeps the
        # number of compiled shapes small (dynamic=None: a second cache length recompiles once,
        # with symbolic lengths).
        self.compiled = compile
        self.step_fn: Callable[..., torch.Tensor] = (
            torch.compile(cached_forward, dynamic=None, fullgraph=True) if compile else cached_forward)
        self.max_pooled_caches = max_pooled_caches
        self._free_caches: list[KVCache] = []  # oldest first
        self._graphs: dict[tuple, _Forward] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        config = model.config
        self.mask_id = config.mask_token_id
        self.end_ids = tuple(i for i in (config.eos_token_id, config.eot_token_id) if i is not None)
        if self.mask_id is None:
            raise ValueError("the model config has no mask_token_id")

    # --- public API ------------------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]] | torch.Tensor, settings: GenerationSettings | None = None,
              generator: torch.Generator | None = None) -> BatchRun:
        """Begin decoding ``prompts`` (lists of ids, or a (B, P) tensor of equal-length prompts)."""
        return BatchRun(self, prompts, settings or GenerationSettings(), generator)

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
        while (update := run.step()) is not None:
            yield update

    def release_memory(self) -> None:
        """Drop pooled caches and captured graphs (they are rebuilt on demand)."""
        self._free_caches = []
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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

    @torch.no_grad()
    def forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
                key_bias: torch.Tensor | None, write: bool = True) -> torch.Tensor:
        """``cached_forward`` through a CUDA graph captured for this cache and these shapes.

        The returned logits live in the graph's output buffer: read them before the next call.
        """
        if not self.cuda_graphs:
            return self._function(write)(self.model, tokens, positions, cache, key_bias, logits_index, write)
        key = (id(cache), tokens.shape, positions.shape, logits_index.shape, None if key_bias is None else key_bias.shape,
               write)
        entry = self._graphs.get(key)
        args = [tokens, positions, logits_index, key_bias]
        if entry is None:
            entry = self._capture(cache, args, write)
            self._graphs[key] = entry
        for static, value in zip(entry.inputs, args, strict=True):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()
        return entry.output

    def _function(self, write: bool) -> Callable[..., torch.Tensor]:
        return cached_forward if write else self.step_fn

    def _capture(self, cache: KVCache, args: list[torch.Tensor | None], write: bool) -> _Forward:
        entry = _Forward(cache=cache, inputs=[None if a is None else a.clone() for a in args])
        tokens, positions, logits_index, key_bias = entry.inputs

        function = self._function(write)

        def run() -> torch.Tensor:
            return function(self.model, tokens, positions, cache, key_bias, logits_index, write)

        # Warm-up on a side stream (compiles, picks kernels). It is a real call with the real inputs:
        # its cache writes are the ones the replay below makes again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # twice: the second call must find everything compiled
                run()
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, pool=self._graph_pool):
            entry.output = run()
        return entry


class BatchRun:
    """One batch of prompts being decoded; ``step()`` advances it by one denoising step."""

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]] | torch.Tensor,
                 settings: GenerationSettings, generator: torch.Generator | None) -> None:
        self.engine, self.settings, self.generator = engine, settings, generator
        prompt_ids, prompt_mask = _left_pad(prompts, engine.end_ids[0] if engine.end_ids else 0)
        batch, prompt_length = prompt_ids.shape
        settings.validate(engine.model.config.max_sequence_length, prompt_length)
        if settings.early_stop and not engine.end_ids:
            raise ValueError("early_stop needs eos_token_id (or eot_token_id) in the model config")
        if (settings.logits_eos_inf or settings.confidence_eos_eot_inf) and len(engine.end_ids) < 2:
            raise ValueError("logits_eos_inf / confidence_eos_eot_inf need eos_token_id and eot_token_id in the config")
        device = engine.device
        self.prompt_length, self.gen_length = prompt_length, settings.gen_length
        self.length = prompt_length + settings.gen_length
        self.block_length = settings.block_length
        self.num_blocks = settings.gen_length // settings.block_length
        self.x = torch.full((batch, self.length), engine.mask_id, dtype=torch.long, device=device)
        self.x[:, :prompt_length] = prompt_ids.to(device)
        # Decided-ness is tracked apart from the tokens: a model may propose the mask id itself.
        self.undecided = torch.ones(batch, settings.gen_length, dtype=torch.bool, device=device)
        key_mask = None
        if not bool(prompt_mask.all()):
            key_mask = torch.cat([prompt_mask, torch.ones(batch, settings.gen_length, dtype=torch.bool)], 1).to(device)
        self.key_mask = key_mask  # (B, T) or None
        self.row_ids = torch.arange(batch)  # caller's row index of each remaining row
        self.finished = [False] * batch
        self.answers = torch.full((batch, settings.gen_length), engine.mask_id, dtype=torch.long)
        self.row_steps = [0] * batch
        self.steps_per_block = settings.total_steps // self.num_blocks if settings.policy == "fixed" else None
        # The fixed schedule is the same for every row (each block starts fully masked): host integers.
        self.schedule = None if self.steps_per_block is None else num_transfer_tokens(
            torch.ones(1, self.block_length, dtype=torch.bool), self.steps_per_block)[0].tolist()
        self.block, self.block_step, self.steps = 0, 0, 0
        self.max_steps = settings.total_steps if settings.policy == "fixed" else settings.gen_length
        self.cache: KVCache | None = None
        self._set_rows(batch)
        self.done = False

    # --- row bookkeeping ------------------------------------------------------------------------

    @property
    def guided(self) -> bool:
        return self.settings.cfg_scale > 0

    def _set_rows(self, batch: int) -> None:
        """(Re)build what depends on the number of rows: cache, attention bias."""
        rows = batch * (2 if self.guided else 1)
        self.cache = self.engine.acquire_cache(rows, self.length)
        mask = self.key_mask
        if mask is not None and self.guided:
            mask = torch.cat([mask, mask])
        self.key_bias = attention_bias(mask, self.length, False, self.engine.model.dtype, self.engine.device)

    def _model_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows as the model sees them: with guidance, the unconditional copies (prompt masked) follow."""
        if not self.guided:
            return tokens
        unconditional = tokens.clone()
        if tokens.shape[1] == self.length:
            unconditional[:, :self.prompt_length] = self.engine.mask_id
        return torch.cat([tokens, unconditional])

    # --- one step -------------------------------------------------------------------------------

    def _logits(self) -> torch.Tensor:
        """Logits (B, block_length, V) of the current block, by the forward pass this step calls for."""
        settings = self.settings
        batch, device = self.x.shape[0], self.engine.device
        start = self.prompt_length + self.block * self.block_length
        refresh = (settings.cache == "none" or self.block_step == 0
                   or (settings.refresh_every and self.block_step % settings.refresh_every == 0))
        query_start = 0 if refresh else start
        query_end = start + self.block_length if settings.cache == "dual" and not refresh else self.length
        tokens = self._model_rows(self.x[:, query_start:query_end])
        rows = tokens.shape[0]
        positions = torch.arange(query_start, query_end, device=device).expand(rows, -1)
        logits_index = torch.arange(start - query_start, start - query_start + self.block_length,
                                    device=device).expand(rows, -1)
        # Eagerly, writing the block into the cache and using fused SDPA is fastest; compiled, a
        # read-only step avoids copying the cache (see kv_cache.cached_forward).
        write = refresh or not self.engine.compiled
        logits = self.engine.forward(self.cache, tokens, positions, logits_index, self.key_bias, write=write)
        if self.guided:
            conditional, unconditional = logits[:batch], logits[batch:]
            logits = unconditional + (settings.cfg_scale + 1) * (conditional - unconditional)
        return logits

    def advance(self) -> bool:
        """Run one denoising step without reporting it; False once every row is finished."""
        return self._step(report=False) is not None

    def step(self) -> StepUpdate | None:
        """Run one denoising step and report it (copies the answers to the host); None once finished."""
        return self._step(report=True)

    @torch.no_grad()
    def _step(self, report: bool) -> StepUpdate | None:
        if self.done:
            return None
        settings = self.settings
        start = self.prompt_length + self.block * self.block_length
        block_index = self.block
        block = self.x[:, start:start + self.block_length]  # views: committing writes into x / undecided
        offset = start - self.prompt_length
        masked = self.undecided[:, offset:offset + self.block_length]
        logits = self._logits()
        forbid = (self.engine.end_ids[0],) if settings.logits_eos_inf else ()
        demote = self.engine.end_ids[:2] if settings.confidence_eos_eot_inf else ()
        proposals, confidence = propose(logits, settings.temperature, settings.remasking, self.generator,
                                        exact_confidence=settings.policy == "fixed", forbid=forbid, demote=demote,
                                        never=(self.engine.mask_id,))
        count = self.schedule[self.block_step] if self.schedule is not None else 1
        chosen = select(confidence, masked, settings.policy, count, settings.threshold, settings.factor)
        block.copy_(torch.where(chosen, proposals, block))
        masked &= ~chosen
        self.block_step += 1
        self.steps += 1
        for row in self.row_ids.tolist():
            self.row_steps[row] += 1
        decided = None
        if report:
            decided = torch.zeros(self.answers.shape, dtype=torch.bool)
            decided[self.row_ids, offset:offset + self.block_length] = chosen.cpu()
            self.answers[self.row_ids] = self.x[:, self.prompt_length:].cpu()
        if self.steps_per_block is not None:
            block_done = self.block_step == self.steps_per_block
        else:
            block_done = not bool(masked.any())  # the policy's one host sync
        if block_done:
            self._finish_block()
        if not report:
            return StepUpdate(self.steps, block_index, self.answers, self.answers, self.finished)
        return StepUpdate(self.steps, block_index, self.answers.clone(), decided, list(self.finished))

    def _finish_block(self) -> None:
        self.block += 1
        self.block_step = 0
        answer = self.x[:, self.prompt_length:]
        ended = _decided_through_end(answer, self.undecided, self.engine.end_ids) \
            if self.settings.early_stop else torch.zeros(answer.shape[0], dtype=torch.bool, device=answer.device)
        if self.block == self.num_blocks:
            ended[:] = True
        if not bool(ended.any()):
            return
        # Rows that are done: fill what is left with end-of-text and hand them back.
        if self.engine.end_ids:
            answer.masked_fill_(self.undecided & ended[:, None], self.engine.end_ids[0])
        self.answers[self.row_ids] = answer.cpu()
        for row in self.row_ids[ended.cpu()].tolist():
            self.finished[row] = True
        keep = (~ended).nonzero().squeeze(1)
        if keep.numel() == 0:
            self.done = True
            self.engine.release_cache(self.cache)
            self.cache = None
            return
        if keep.numel() <= math.ceil(self.x.shape[0] / 2):  # shrink the batch once half of it is done
            self._keep_rows(keep)

    def _keep_rows(self, keep: torch.Tensor) -> None:
        self.x = self.x.index_select(0, keep)
        self.undecided = self.undecided.index_select(0, keep)
        self.row_ids = self.row_ids[keep.cpu()]
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, keep)
        old = self.cache
        self._set_rows(keep.numel())
        rows = torch.cat([keep, keep + old.batch // 2]) if self.guided else keep
        for layer in range(len(old.keys)):
            self.cache.keys[layer].copy_(old.keys[layer].index_select(0, rows))
            self.cache.values[layer].copy_(old.values[layer].index_select(0, rows))
        self.engine.release_cache(old)

    def cancel(self) -> None:
        """Stop decoding (e.g. the client went away) and give the cache back to the engine."""
        if self.cache is not None:
            self.engine.release_cache(self.cache)
            self.cache = None
        self.done = True

    def result(self, row: int) -> Generation:
        """Row ``row``'s result (caller's order) once it has finished; rows may finish before the batch."""
        if not self.finished[row]:
            raise RuntimeError(f"row {row} is still decoding")
        ids = self.answers[row].tolist()
        end = next((i for i, token in enumerate(ids) if token in self.engine.end_ids), None)
        return Generation(answer=self.answers[row].clone(), tokens=ids if end is None else ids[:end + 1],
                          steps=self.row_steps[row], finish_reason="length" if end is None else "stop")

    def results(self) -> list[Generation]:
        """Every row's result, in the caller's order (once ``step()`` has returned None)."""
        if not self.done:
            raise RuntimeError("the batch is still decoding; call step() until it returns None")
        return [self.result(row) for row in range(len(self.finished))]


def _decided_through_end(answer: torch.Tensor, undecided: torch.Tensor, end_ids: tuple[int, ...]) -> torch.Tensor:
    """(B,) rows whose answer holds an end-of-text token with every position before it decided.

    Such an answer is final: decoding ends at the first end-of-text token, and tokens once committed
    are never changed, so nothing left to decode can alter the text before it.
    """
    is_end = torch.zeros_like(answer, dtype=torch.bool)
    for token in end_ids:
        is_end |= answer == token
    is_end &= ~undecided
    is_mask = undecided
    first_end = torch.where(is_end.any(1), is_end.to(torch.int8).argmax(1), answer.shape[1])
    first_mask = torch.where(is_mask.any(1), is_mask.to(torch.int8).argmax(1), answer.shape[1])
    return is_end.any(1) & (first_mask > first_end)


def _left_pad(prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and the (B, P) bool mask of real tokens."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be (batch, length), got shape {tuple(prompts.shape)}")
        return prompts.long().cpu(), torch.ones(prompts.shape, dtype=torch.bool)
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = True
    return ids, mask
