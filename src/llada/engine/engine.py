"""The fast generation engine: block-wise KV caching, parallel decoding policies, batching, CUDA graphs.

The reference sampler (``sampling.generate``) runs the model over prompt + answer at every step.
Here a step instead runs one of three forward passes (``passes.py``), all through
``kv_cache.cached_forward``:

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
every row decodes the same answer layout at its own pace (``batch.py``); rows that finish early
(an end-of-text token with everything before it decided) stop decoding, and once half of the batch
is done it shrinks to the rows still decoding (with CUDA graphs, to the smallest of a few sizes
that holds them, ``rows.row_bucket``: sizes that repeat, so that their graphs are captured once).
``Engine.start`` returns a ``BatchRun`` whose ``step()`` advances one denoising step, so a server
can interleave many runs and let requests join and leave between steps (``scheduler.py``).

On CUDA each forward pass of a given shape is captured once as a CUDA graph (optionally of a
``torch.compile``d function) and replayed (refreshes of some rows of a batch only when short:
``passes.CAPTURED_REFRESH_FLOPS``); a greedy block step is captured whole, forward pass and
commits (``Runtime.replay`` over the cache's state tensors), so that it costs one graph launch, with
no host synchronisation except where the policy needs a count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from llada.engine.batch import BatchRun
from llada.engine.runtime import Runtime
from llada.engine.settings import CACHE_MODES, CacheMode, Generation, GenerationSettings, StepUpdate
from llada.model.transformer import LLaDAModel

__all__ = ["CACHE_MODES", "CacheMode", "Engine", "Generation", "GenerationSettings", "StepUpdate"]


class Engine:
    """Fast generation for one model. Keep one per model and process; it caches compiled graphs."""

    def __init__(self, model: LLaDAModel, cuda_graphs: bool | None = None, compile: bool = False,
                 max_pooled_caches: int | None = None, fuse: bool | None = None, capture_sampling: bool = True,
                 deterministic: bool = False, compile_cache: bool = True) -> None:
        """
        Args:
            model: the mask predictor, in eval mode, on its device and dtype.
            cuda_graphs: capture each forward shape as a CUDA graph (default: on CUDA devices).
            compile: ``torch.compile`` the forward passes, one layer compiled for all (fuses norms,
                RoPE and SwiGLU; the first call of each shape compiles for a few seconds): block
                steps, and refreshes except in the exact mode (``cache="none"``), which keeps the
                model's own eager arithmetic so as to equal the reference sampler bit for bit.
            max_pooled_caches: idle KV caches kept for reuse (each keeps its captured graphs, so a
                later batch of the same shape starts without capturing again). Default: two, and
                more while the idle caches total at most 1 GiB (``runtime.POOLED_BYTES``).
            fuse: run q/k/v and gate/up as one matmul each (``fusion.fuse_projections``: the
                model's weights become views of fused matrices, in place; default: on CUDA devices).
                The model must not be moved or reloaded while the engine is in use. The exact mode
                keeps the model's own matmuls (it stays bit-identical to the reference); every
                other pass uses the fused ones.
            capture_sampling: with CUDA graphs, capture greedy block steps whole — the forward pass and
                the choice and commit of tokens — as one graph, so that the host launches one graph
                per step instead of a dozen small kernels after it. False captures the forward pass only.
            deterministic: batch-invariant numerics (``batch_invariant``): an answer is the same bits
                whatever the batch size, its row's place, the other rows' lengths and padding, and
                the scheduler's joins, when decoding draws nothing at random (temperature 0,
                ``low_confidence``); a batch that samples shares one generator across its rows.
                Rotary positions count from each row's first real token, so a left-padded row
                computes what it computes alone. Eager only (no ``compile``), no quantized layers;
                slower (docs/engine.md has the cost).
            compile_cache: with ``compile``, keep what compiling produced on disk and reuse it in later
                processes (``compile_cache``: under ``$LLADA_CACHE_DIR``, default ``~/.cache/llada``).
        """
        self.runtime = Runtime(model, cuda_graphs, compile, max_pooled_caches, fuse, capture_sampling, deterministic,
                               compile_cache)
        self.model = self.runtime.model
        self.device = self.runtime.device
        self.mask_id, self.end_ids = self.runtime.mask_id, self.runtime.end_ids

    # --- public API ------------------------------------------------------------------------------

    def warm_up(self, settings: GenerationSettings | None = None, batch_sizes: Sequence[int] = (1,),
                prompt_lengths: Sequence[int] = (64,), progress: bool = True) -> float:
        """Compile and capture the passes of these batch sizes and prompt lengths (prompts left-padded
        to them) now, so that the first requests do not wait for it (a server's start-up), and save
        the compile cache; returns the seconds taken. Lengths that leave no room for the answer are
        skipped. (Graph engines also save the cache after each new capture.)"""
        settings = settings or GenerationSettings()
        filler = self.end_ids[0] if self.end_ids else 0
        limit = self.model.config.max_sequence_length - settings.gen_length
        shapes = [(batch, length) for batch in batch_sizes for length in prompt_lengths if length <= limit]
        start = time.perf_counter()
        for batch, length in tqdm(shapes, desc="warming up: compiling and capturing", unit="shape",
                                  disable=not progress):
            # Shorter prompts left-padded to the length, as a server's are (the padding's bias is part
            # of the compiled and captured passes), with the caller's settings (early_stop is part of
            # a captured step's key).
            run = self.start([[filler] * max(1, length // 2)] * batch, settings, prompt_room=length)
            while run.advance():
                pass
        if self.runtime.compile_cache is not None:  # engines without CUDA graphs save nothing on their own
            self.runtime.save_compile_cache()
        return time.perf_counter() - start

    def start(self, prompts: Sequence[Sequence[int]] | torch.Tensor, settings: GenerationSettings | None = None,
              generator: torch.Generator | None = None, prompt_room: int = 0) -> BatchRun:
        """Begin decoding ``prompts`` (lists of ids, or a (B, P) tensor of equal-length prompts).

        ``prompt_room`` left-pads to at least that many prompt tokens, so that prompts up to that
        length can join the batch later (``BatchRun.add``).
        """
        return BatchRun(self.runtime, prompts, settings or GenerationSettings(), generator, prompt_room)

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
        self.runtime.release_memory()
