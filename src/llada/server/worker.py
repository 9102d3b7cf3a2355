"""The one thread that owns the model: it runs ``Scheduler.step()`` and hands each step to its requests.

HTTP handlers run on the asyncio event loop and must never wait for the GPU, so they only ``submit``
(a ``Ticket`` is queued in an inbox under a lock) and ``end``; the worker thread moves the inbox
into the scheduler between steps, steps while anything is queued or running, and posts every
request's ``RequestUpdate`` to the ticket on the event loop (``call_soon_threadsafe``). All requests
in flight therefore share the scheduler's batches: one forward pass per step for all of them.
The thread sleeps on a condition variable when there is nothing to do.

A step that raises (out of memory, a bug) ends the requests in flight with a ``WorkerFailure`` and
the worker carries on with the next requests.

Shutdown is one bounded drain: ``drain(timeout)`` stops admitting at once, and ``timeout`` seconds
later the worker ends whatever is still in flight with ``Draining`` (each stream then sends an error
event); ``stop`` ends the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Literal

import torch

from llada.engine.scheduler import Request, RequestUpdate, Scheduler, SchedulerFull
from llada.engine.settings import GenerationSettings
from llada.server.metrics import Metrics

logger = logging.getLogger(__name__)

# Why a request stops before the engine has finished it: its answer is complete (end-of-text, a stop
# sequence or max_tokens decided: the rest of the canvas is not needed), or it is cancelled.
EndReason = Literal["complete", "disconnect", "timeout", "error", "shutdown"]


class Draining(RuntimeError):
    """The server is shutting down: it admits no new requests (HTTP 503)."""


class WorkerFailure(RuntimeError):
    """A step failed; the requests it was decoding are ended (HTTP 500)."""


class Ticket:
    """A request in flight as its handler sees it: the worker posts its steps here."""

    def __init__(self, prompt: list[int], settings: GenerationSettings, generator: torch.Generator | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.prompt, self.settings, self.generator, self.loop = prompt, settings, generator, loop
        self.request: Request | None = None  # the scheduler's request, once the worker has taken the ticket
        self.done = False  # the worker posts nothing more (finished, cancelled or failed); worker thread only
        self._items: deque[RequestUpdate | BaseException] = deque()
        self._ready = asyncio.Event()

    def post(self, item: RequestUpdate | BaseException) -> None:
        """Hand a step (or the error that ends the request) to the event loop; called by the worker."""
        try:
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _put(self, item: RequestUpdate | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    async def next(self, timeout: float) -> RequestUpdate:
        """The next step's update.

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
            WorkerFailure, Draining, SchedulerFull, ValueError: the error that ended the request.
        """
        while not self._items:
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), max(timeout, 0.0))
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item


class Worker:
    """Owns a ``Scheduler`` (and through it the model) and runs it on a thread of its own."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics) -> None:
        """The scheduler's ``max_waiting`` is the queue limit: beyond it ``submit`` raises ``SchedulerFull``."""
        self.scheduler, self.metrics = scheduler, metrics
        self.accepting = True
        self._wake = threading.Condition()
        self._inbox: deque[Ticket] = deque()
        self._ends: deque[tuple[Ticket, EndReason]] = deque()
        self._live: dict[int, Ticket] = {}  # scheduler request id -> ticket; worker thread only
        self._drain_deadline: float | None = None  # time.monotonic() at which requests in flight are ended
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Requests not yet in a batch (those free rows will take at the next step included)."""
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def active_rows(self) -> int:
        """Requests the scheduler has taken into batches, the one being admitted by a running step
        included (read from other threads: a gauge, not a synchronised count)."""
        return max(0, len(self._live) - len(self.scheduler.waiting))

    @property
    def busy(self) -> bool:
        return bool(self._inbox or self._live)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llada-worker", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], settings: GenerationSettings,
               generator: torch.Generator | None = None) -> Ticket:
        """Queue a request (on the event loop; this never waits for a step).

        Raises:
            Draining: the server is shutting down.
            SchedulerFull: ``max_waiting`` requests are already waiting.
        """
        if not self.accepting:
            raise Draining("the server is shutting down and admits no new requests")
        ticket = Ticket(prompt, settings, generator, asyncio.get_running_loop())
        with self._wake:
            free = max(0, self.scheduler.max_batch - self.active_rows)  # those joining at the next step do not wait
            if self.queued >= self.scheduler.max_waiting + free:
                raise SchedulerFull(f"{self.queued - free} requests are waiting (the server's queue holds "
                                    f"{self.scheduler.max_waiting}); retry later")
            self._inbox.append(ticket)
            self._wake.notify()
        return ticket

    def end(self, ticket: Ticket, reason: EndReason) -> None:
        """Stop decoding a request: its answer is complete, or it is no longer wanted (``reason``).

        Counted in ``llada_requests_finished_early_total`` (complete) or
        ``llada_requests_cancelled_total{reason}``; a request the engine already finished is not counted.
        """
        with self._wake:
            self._ends.append((ticket, reason))
            self._wake.notify()

    def drain(self, timeout: float) -> None:
        """Admit nothing new (``Draining``: 503); ``timeout`` s from now, end what is still in flight.

        A later call never moves the deadline later, so draining twice cannot take twice as long.
        """
        with self._wake:
            self.accepting = False
            deadline = time.monotonic() + timeout
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._wake.notify()

    def stop(self, drain_timeout: float) -> None:
        """``drain(drain_timeout)``, wait until nothing is in flight (the drain ends it at its deadline),
        then end the worker thread."""
        self.drain(drain_timeout)
        while self.busy and time.monotonic() < self._drain_deadline:
            time.sleep(0.02)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the worker thread ------------------------------------------------------------------------

    def _overdue(self) -> bool:
        """The drain's deadline has passed with requests still in flight."""
        return self._drain_deadline is not None and self.busy and time.monotonic() >= self._drain_deadline

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._ends or self._stopping or not self.scheduler.idle
                           or self._overdue()):
                    waiting = self._drain_deadline is not None and self.busy
                    self._wake.wait(max(self._drain_deadline - time.monotonic(), 0.0) if waiting else None)
                if self._stopping or self._overdue():
                    self._end_all(Draining("the server shut down before the answer was complete"), "shutdown")
                    if self._stopping:
                        return
                while self._ends:  # an ended row leaves its batch now, not at the next step (there may be none)
                    self._end(*self._ends.popleft())
                while self._inbox:
                    self._take(self._inbox.popleft())
                idle = self.scheduler.idle
            if not idle:
                self._step()

    def _take(self, ticket: Ticket) -> None:
        try:
            ticket.request = self.scheduler.submit(ticket.prompt, ticket.settings, ticket.generator)
        except (SchedulerFull, ValueError) as error:
            ticket.done = True
            ticket.post(error)
            return
        self._live[ticket.request.id] = ticket

    def _end(self, ticket: Ticket, reason: EndReason) -> None:
        if ticket.done:
            return
        ticket.done = True
        if ticket.request is None:
            self._inbox.remove(ticket)
        else:
            self.scheduler.cancel(ticket.request)
            del self._live[ticket.request.id]
        if reason == "complete":
            self.metrics.inc("llada_requests_finished_early_total")
        else:
            self.metrics.inc("llada_requests_cancelled_total", reason=reason)

    def _end_all(self, error: Exception, reason: EndReason) -> None:
        for ticket in [*self._inbox, *self._live.values()]:
            self._end(ticket, reason)
            ticket.post(error)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            self.scheduler.step()
        except Exception as error:  # any failure ends its requests, never the server
            logger.exception("a scheduler step failed; ending the %d requests in flight", len(self._live))
            with self._wake:
                self._end_all(WorkerFailure(f"generation failed: {type(error).__name__}: {error}"), "error")
            return
        rows = 0
        for key, ticket in list(self._live.items()):
            request = ticket.request
            while request.updates:
                ticket.post(request.updates.popleft())
                rows += 1
            if request.result is not None:
                ticket.done = True
                del self._live[key]
        self.metrics.observe_step(time.perf_counter() - start, rows)
