"""Answering a ``Job`` in the OpenAI format: one JSON body, or server-sent events as the answer is decided.

Both follow the request's steps from the worker through an ``AnswerText``; once the answer is complete
(end-of-text, a stop sequence, ``max_tokens`` decided) the request is cancelled at once, so the
engine stops spending steps on text nobody will read. A timeout, a client that went away or an error
cancels it too.

Streams send text chunks as the decided prefix grows. With ``denoising`` every step sends one chunk
that also carries ``canvas``: ``{"step", "tokens", "decided", "done"}`` (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from llada.scheduler import RequestUpdate, SchedulerFull
from llada.server.errors import APIError
from llada.server.metrics import Metrics
from llada.server.schemas import Job
from llada.server.text import AnswerText, TokenPieces
from llada.server.worker import Draining, Ticket, Worker, WorkerFailure
from llada.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


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


async def _follow(ctx: Answering, ticket: Ticket, text: AnswerText,
                  is_disconnected: Callable[[], Awaitable[bool]] | None = None
                  ) -> AsyncIterator[tuple[RequestUpdate, str, int]]:
    """Each step's update, the text it settled and the request's own step number (from 1), until the
    answer is complete. Ends early only by raising ``APIError`` or when ``is_disconnected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.timeout_s
    reason, number, next_check = "disconnect", 0, loop.time() + DISCONNECT_POLL_S
    try:
        while not text.complete:
            remaining = deadline - loop.time()
            if remaining <= 0:
                reason = "timeout"
                raise APIError(504, f"the answer took longer than the server's limit of {ctx.timeout_s:g} s",
                               None, "timeout")
            update = None
            try:
                update = await ticket.next(min(remaining, DISCONNECT_POLL_S) if is_disconnected else remaining)
            except asyncio.TimeoutError:
                pass
            except SchedulerFull as error:
                reason = "error"
                raise APIError(429, str(error), None, "rate_limit_exceeded") from error
            except Draining as error:
                reason = "shutdown"
                raise APIError(503, str(error), None, "server_shutting_down") from error
            except WorkerFailure as error:
                reason = "error"
                raise APIError(500, str(error), None, "generation_failed") from error
            except ValueError as error:  # the scheduler refused the settings (checked before, so rare)
                reason = "error"
                raise APIError(400, str(error), None, "invalid_value") from error
            if is_disconnected is not None and loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_S
                if await is_disconnected():
                    return
            if update is None:
                continue
            number += 1
            yield update, text.update(update.answer, update.finished), number
        reason = "done"
    finally:
        if not ticket.done:
            ctx.worker.cancel(ticket, reason)


def _tracker(ctx: Answering, job: Job) -> AnswerText:
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
    text = _tracker(ctx, job)
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


async def stream(ctx: Answering, job: Job, ticket: Ticket) -> AsyncIterator[str]:
    """Server-sent events: OpenAI chunks as text is settled, then the finish reason, then ``[DONE]``.

    A client that disconnects cancels this generator (and so the request). An error after the
    stream has started is sent as an ``{"error": ...}`` event, which the OpenAI client raises.
    """
    chat = job.kind == "chat"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": ctx.model_name}

    def chunk(delta: str | None, finish_reason: str | None = None, **extra: object) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return _event({**head, "choices": [choice], **extra})

    text = _tracker(ctx, job)
    if chat:
        yield _event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]})
    try:
        async with aclosing(_follow(ctx, ticket, text)) as steps:
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
        yield "data: [DONE]\n\n"
        return
    _count(ctx, job, text)
    yield chunk(None, text.finish_reason, **({"usage": _usage(job, text)} if job.include_usage else {}))
    yield "data: [DONE]\n\n"
