"""Answering a ``Job`` in the OpenAI format: one JSON body, or server-sent events as the answer is decided.

Both follow the request's steps from the worker through an ``AnswerText``; once the answer is complete
(end-of-text, a stop sequence, ``max_tokens`` decided) the request is ended at once, so the engine
stops spending steps on text nobody will read. A timeout, a client that went away (polled with
``is_disconnected``, streams too), an error or the shutdown ends it as well.

Streams send text chunks as the decided prefix grows. With ``denoising`` every step sends one chunk
that also carries ``canvas``: ``{"step", "tokens", "decided", "done"}``. With
``stream_options.include_usage`` every chunk carries ``"usage": null`` and one more chunk, with no
choices, carries the usage before ``[DONE]``, as the OpenAI API does (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import torch

from llada.engine.answer_text import AnswerText
from llada.engine.scheduler import RequestUpdate, SchedulerFull
from llada.model.tokenizer import Tokenizer
from llada.server.errors import APIError
from llada.server.metrics import Metrics
from llada.server.schemas import Job
from llada.server.worker import Draining, EndReason, Ticket, Worker, WorkerFailure

DISCONNECT_POLL_S = 0.5  # how often a request checks whether its client is still there
DONE = "data: [DONE]\n\n"

# How a failure on the worker's side reaches the client (status, code), and the reason it is counted under.
_FAILURES: tuple[tuple[type[Exception], int, str, EndReason], ...] = (
    (SchedulerFull, 429, "rate_limit_exceeded", "error"),
    (Draining, 503, "server_shutting_down", "shutdown"),
    (WorkerFailure, 500, "generation_failed", "error"),
    (ValueError, 400, "invalid_value", "error"),  # the scheduler refused the settings (checked before, so rare)
)


class TokenPieces:
    """Each token decoded on its own (the denoising canvas shows these), cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])
        return piece


@dataclass
class Answering:
    """What answering needs from the server."""

    worker: Worker
    tokenizer: Tokenizer
    pieces: TokenPieces
    metrics: Metrics
    model_name: str
    mask_id: int
    end_ids: tuple[int, ...]
    timeout_s: float
    device: torch.device  # where a seeded request's generator lives (the model's device)


def _failure(error: Exception) -> tuple[APIError, EndReason]:
    """The client's view of a request the worker refused or ended, and the reason to count."""
    for kind, status, code, reason in _FAILURES:
        if isinstance(error, kind):
            return APIError(status, str(error), None, code), reason
    return APIError(500, f"{type(error).__name__}: {error}", None, "internal_error"), "error"


def start(ctx: Answering, job: Job) -> Ticket:
    """Queue ``job`` on the worker.

    Raises:
        APIError: 429 when the queue is full, 503 while shutting down.
    """
    generator = None
    if job.seed is not None and (job.settings.temperature > 0 or job.settings.remasking == "random"):
        generator = torch.Generator(device=ctx.device).manual_seed(job.seed)
    try:
        return ctx.worker.submit(job.prompt, job.settings, generator)
    except (SchedulerFull, Draining) as error:
        raise _failure(error)[0] from error


async def _follow(ctx: Answering, ticket: Ticket, text: AnswerText,
                  is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[tuple[RequestUpdate, str, int]]:
    """Each step's update, the text it settled and the request's own step number (from 1), until the
    answer is complete. Ends early only by raising ``APIError`` or when ``is_disconnected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.timeout_s
    reason: EndReason = "disconnect"  # unless set otherwise: the consumer stopped listening
    number, next_check = 0, loop.time() + DISCONNECT_POLL_S
    try:
        while not text.complete:
            remaining = deadline - loop.time()
            if remaining <= 0:
                reason = "timeout"
                raise APIError(504, f"the answer took longer than the server's limit of {ctx.timeout_s:g} s",
                               None, "timeout")
            update = None
            try:
                update = await ticket.next(min(remaining, DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                pass
            except (SchedulerFull, Draining, WorkerFailure, ValueError) as error:
                api_error, reason = _failure(error)
                raise api_error from error
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_S
                if await is_disconnected():
                    return
            if update is not None:
                number += 1
                yield update, text.update(update.answer, update.finished), number
        reason = "complete"
    finally:
        if not ticket.done:
            ctx.worker.end(ticket, reason)


def _answer_text(ctx: Answering, job: Job) -> AnswerText:
    return AnswerText(ctx.tokenizer, ctx.mask_id, ctx.end_ids, job.max_tokens, job.stop)


def _usage(job: Job, text: AnswerText) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": text.completion_tokens,
            "total_tokens": len(job.prompt) + text.completion_tokens}


def _count(ctx: Answering, job: Job, text: AnswerText) -> None:
    ctx.metrics.inc("llada_prompt_tokens_total", len(job.prompt))
    ctx.metrics.inc("llada_completion_tokens_total", text.completion_tokens)


async def complete(ctx: Answering, job: Job, ticket: Ticket,
                   is_disconnected: Callable[[], Awaitable[bool]]) -> dict | None:
    """The whole answer as one ``chat.completion`` / ``text_completion`` body (None: the client left)."""
    text = _answer_text(ctx, job)
    async with aclosing(_follow(ctx, ticket, text, is_disconnected)) as steps:
        async for _ in steps:
            pass
    if not text.complete:
        return None
    _count(ctx, job, text)
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text.sent}, "logprobs": None,
                  "finish_reason": text.finish_reason}
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": text.sent, "logprobs": None, "finish_reason": text.finish_reason}
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
    return {**identity, "created": int(time.time()), "model": ctx.model_name, "choices": [choice],
            "usage": _usage(job, text)}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream(ctx: Answering, job: Job, ticket: Ticket,
                 is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """Server-sent events: OpenAI chunks as text is settled, then the finish reason, then ``[DONE]``.

    A client that disconnects ends this generator (and so the request), noticed by the server's
    disconnect listener where it has one and by polling ``is_disconnected`` in any case. An error
    after the stream has started, the shutdown's included, is sent as an ``{"error": ...}`` event and
    ``[DONE]``; the OpenAI client raises it.
    """
    chat = job.kind == "chat"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": ctx.model_name}
    usage_to_come = {"usage": None} if job.include_usage else {}

    def chunk(delta: str | None, finish_reason: str | None = None, **extra: object) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return _event({**head, "choices": [choice], **usage_to_come, **extra})

    text = _answer_text(ctx, job)
    if chat:
        yield _event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}], **usage_to_come})
    try:
        async with aclosing(_follow(ctx, ticket, text, is_disconnected)) as steps:
            async for update, delta, number in steps:
                if job.denoising:
                    window = update.answer[:job.max_tokens]
                    canvas = {"step": number, "tokens": [None if t == ctx.mask_id else ctx.pieces(t) for t in window],
                              "decided": [p for p in update.decided if p < job.max_tokens], "done": text.complete}
                    yield chunk(delta or None, canvas=canvas)
                elif delta:
                    yield chunk(delta)
    except APIError as error:
        yield _event(error.body())
        yield DONE
        return
    if not text.complete:  # the client went away: nothing more to say, nobody to say it to
        return
    _count(ctx, job, text)
    yield chunk(None, text.finish_reason)
    if job.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(job, text)})
    yield DONE
