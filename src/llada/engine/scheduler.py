"""A step-level request scheduler over the engine, for servers: requests join and leave between steps.

``submit`` queues a request and returns its handle at once; every ``step()`` call admits waiting
requests (as many as the batch capacity allows, batched together when their settings match) and
advances every running batch by one denoising step. Each request's handle collects its per-step
updates (for streaming) and, when its answer is complete, its ``Generation``. The scheduler is
synchronous and single-threaded on purpose: a server calls ``step()`` from one worker loop and
hands updates to its clients; nothing here blocks except the GPU work of one step.

Continuous batching: a waiting request joins a running batch with the same settings when its prompt
fits the batch's prompt room (prompts are left-padded to a multiple of ``prompt_bucket``) and, with
the prefix cache, every row is still in its first block, taking the slot of a finished row or
growing the batch; it then shares every forward pass with the rows already decoding. The batch the
queue's head would join keeps finished rows' slots for it (``BatchRun.hold_slots``) instead of
shrinking. Otherwise it starts a new batch, advanced in the same ``step()`` calls. A cancelled
request's row leaves its batch at once (``BatchRun.drop``), so it costs no more compute and its slot
can take a waiting request.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llada.engine.batch import BatchRun
from llada.engine.engine import Engine
from llada.engine.settings import Generation, GenerationSettings


class SchedulerFull(RuntimeError):
    """The waiting queue is full: the caller should answer "try again later" (HTTP 429/503)."""


@dataclass
class RequestUpdate:
    """One step of one request: its answer so far and what this step decided."""

    step: int
    answer: list[int]  # all answer positions; undecided ones hold the mask id
    decided: list[int]  # positions decided by this step
    finished: bool


@dataclass
class Request:
    """A submitted prompt; read ``updates`` and ``result`` as the scheduler steps."""

    id: int
    prompt: list[int]
    settings: GenerationSettings
    generator: torch.Generator | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    updates: deque[RequestUpdate] = field(default_factory=deque)
    result: Generation | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.result is not None or self.cancelled


@dataclass
class _Running:
    run: BatchRun
    requests: list[Request]  # row i of the run is requests[i]


class Scheduler:
    """Feeds an ``Engine`` with requests that arrive over time."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_waiting: int = 256, stream: bool = True,
                 prompt_bucket: int = 64) -> None:
        """
        Args:
            engine: the engine to run.
            max_batch: most rows decoding at once, over all running batches.
            max_waiting: most requests waiting for a batch row (those that free rows will take at the next
                step are not counted); beyond it ``submit`` raises ``SchedulerFull``.
            stream: record a ``RequestUpdate`` per step (costs a device-to-host copy per step).
            prompt_bucket: a new batch left-pads its prompts to a multiple of this, so that later
                prompts up to that length can join it.
        """
        if max_batch < 1 or max_waiting < 0 or prompt_bucket < 1:
            raise ValueError(f"max_batch and prompt_bucket must be >= 1 and max_waiting >= 0, got {max_batch}, "
                             f"{prompt_bucket}, {max_waiting}")
        self.engine, self.max_batch, self.max_waiting, self.stream = engine, max_batch, max_waiting, stream
        self.prompt_bucket = prompt_bucket
        self.waiting: deque[Request] = deque()
        self.running: list[_Running] = []
        self._ids = itertools.count()

    @property
    def active_rows(self) -> int:
        return sum(sum(not r.done for r in running.requests) for running in self.running)

    @property
    def free_slots(self) -> int:
        """Batch rows not in use: that many waiting requests join at the next step and do not wait."""
        return max(0, self.max_batch - self.active_rows)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def submit(self, prompt: list[int], settings: GenerationSettings | None = None,
               generator: torch.Generator | None = None) -> Request:
        """Queue a prompt. Settings are checked now, so a bad request fails here and not mid-batch."""
        settings = settings or GenerationSettings()
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        settings.validate(self.engine.model.config.max_sequence_length, len(prompt))
        if len(self.waiting) >= self.max_waiting + self.free_slots:  # those that will get a free row do not wait
            raise SchedulerFull(f"{len(self.waiting) - self.free_slots} requests are waiting "
                                f"(max_waiting={self.max_waiting})")
        request = Request(id=next(self._ids), prompt=list(prompt), settings=settings, generator=generator)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client disconnected, or its answer is complete); it gets no result.

        A waiting request leaves the queue; a running one's row leaves its batch at once (the batch
        ends when no row is left). Cancelling a request twice, or after it finished, changes nothing
        but its ``cancelled`` flag.
        """
        request.cancelled = True
        if any(r is request for r in self.waiting):
            self.waiting.remove(request)
            return
        for running in self.running:
            row = next((i for i, r in enumerate(running.requests) if r is request), None)
            if row is None:
                continue
            running.run.drop(row)
            if running.run.done:
                self.running.remove(running)
            return

    def step(self) -> list[Request]:
        """Admit what fits, advance every running batch by one step; return the requests that finished."""
        self._admit()
        finished: list[Request] = []
        # Slots freed by this step go first to the head of the queue (FIFO): only the batch it would
        # join keeps its finished rows' slots instead of shrinking (``BatchRun.hold_slots``).
        joins = self._batch_for(self.waiting[0]) if self.waiting else None
        for running in list(self.running):
            running.run.hold_slots = running is joins
            update = None
            if self.stream:
                update = running.run.step()
            else:
                running.run.advance()
            for row, request in enumerate(running.requests):
                if request.done:
                    continue
                if update is not None:
                    request.updates.append(RequestUpdate(
                        step=update.step, answer=update.answer[row].tolist(),
                        decided=update.decided[row].nonzero().squeeze(1).tolist(), finished=update.finished[row]))
                if running.run.rows.finished[row]:
                    request.result = running.run.result(row)
                    request.finished_at = time.monotonic()
                    finished.append(request)
            if running.run.done:
                self.running.remove(running)
        return finished

    def run_until_idle(self) -> None:
        """Step until every submitted request is done (tests, offline batches)."""
        while not self.idle:
            self.step()

    def _batch_for(self, request: Request) -> _Running | None:
        """The running batch ``request`` would join (the first that can take it); None when it has its own
        random generator (it then runs alone) or no batch can take it."""
        if request.generator is not None:
            return None
        return next((running for running in self.running if running.run.can_add(request.prompt, request.settings)),
                    None)

    def _admit(self) -> None:
        """Admit waiting requests FIFO: into a running batch that can take them, else as a new batch
        (grouping consecutive requests with equal settings)."""
        capacity = self.max_batch - self.active_rows
        while self.waiting and capacity > 0:
            first = self.waiting.popleft()
            target = self._batch_for(first)
            group = [first]
            if target is not None:
                # It and the requests right behind it that fit the same batch join in one ``add``.
                while (self.waiting and len(group) < capacity and self.waiting[0].generator is None
                       and target.run.can_add(self.waiting[0].prompt, self.waiting[0].settings)):
                    group.append(self.waiting.popleft())
                rows = target.run.add([r.prompt for r in group])
                assert rows[0] == len(target.requests)  # rows are numbered in the order they join
                target.requests += group
            else:
                # A request with its own random generator runs alone: its draws must not depend on others.
                while (first.generator is None and self.waiting and len(group) < capacity
                       and self.waiting[0].settings == first.settings and self.waiting[0].generator is None):
                    group.append(self.waiting.popleft())
                longest = max(len(r.prompt) for r in group)
                room = -(-longest // self.prompt_bucket) * self.prompt_bucket
                limit = self.engine.model.config.max_sequence_length - first.settings.gen_length
                run = self.engine.start([r.prompt for r in group], first.settings, first.generator,
                                        prompt_room=max(longest, min(room, limit)))
                self.running.append(_Running(run, group))
            now = time.monotonic()
            for request in group:
                request.started_at = now
            capacity -= len(group)
