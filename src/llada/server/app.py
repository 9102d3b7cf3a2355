"""The OpenAI-compatible HTTP API: ``create_app`` wires routes, authentication, errors and the worker.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the web UI's files at ``/`` when present.
Handlers only read the body (bounded in size and time), check it and tokenize on a thread (a long
prompt never stalls the event loop), submit to the ``Worker`` and format; all model work happens on
its thread. The app's lifespan starts the worker and, on shutdown, drains it: no new requests (503),
and what is still running after ``drain_timeout_s`` is ended (``runner.py`` starts that drain as soon
as uvicorn begins shutting down, so it is the only wait).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llada.engine.engine import Engine
from llada.engine.scheduler import Scheduler
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.server.completions import Answering, TokenPieces, complete, start, stream
from llada.server.config import ServerConfig
from llada.server.errors import APIError, install_error_handlers, model_not_found, retry_after, unencodable_string
from llada.server.metrics import Metrics
from llada.server.schemas import Kind, parse_job
from llada.server.worker import Worker

STATIC_DIR = Path(__file__).parent / "static"
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no caching or proxy buffering


@dataclass
class Served:
    """What the route handlers need, kept on ``app.state.served``."""

    config: ServerConfig
    tokenizer: Tokenizer
    worker: Worker
    metrics: Metrics
    answering: Answering
    max_sequence_length: int  # the model's context: prompt + answer canvas
    created: int  # Unix time the app was made (the model card's "created")

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "llada",
                "max_model_len": self.max_sequence_length}


class _CountRequests:
    """ASGI middleware: counts answered requests by endpoint and status (streams when they end)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.inc("llada_requests_total", endpoint=endpoint, status=str(status))


def create_app(config: ServerConfig, model: LLaDAModel, tokenizer: Tokenizer) -> FastAPI:
    """The API server for one model (in eval mode, on its device); run it with ``runner.uvicorn_server``.

    Args:
        config: address, key, limits and default decoding settings (checked here).
        model: the mask predictor; only the worker thread runs it.
        tokenizer: its tokenizer (with a chat template for ``/v1/chat/completions``).
    """
    config.validate()
    metrics = Metrics()
    engine = Engine(model, compile=config.compile, deterministic=config.deterministic)
    worker = Worker(Scheduler(engine, max_batch=config.max_batch, max_waiting=config.max_queue), metrics)
    metrics.gauge("llada_queue_depth", "Requests waiting for a batch slot", lambda: worker.queued)
    metrics.gauge("llada_active_rows", "Rows decoding after the last step", lambda: worker.active_rows)
    metrics.gauge("llada_max_batch", "Most rows decoding at once (configured)", lambda: config.max_batch)
    answering = Answering(worker=worker, tokenizer=tokenizer, pieces=TokenPieces(tokenizer), metrics=metrics,
                          model_name=config.model_name, mask_id=model.config.mask_token_id, end_ids=engine.end_ids,
                          timeout_s=config.request_timeout_s, device=model.device)

    app = FastAPI(title="llada", lifespan=_lifespan(worker, config.drain_timeout_s), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.served = Served(config=config, tokenizer=tokenizer, worker=worker, metrics=metrics, answering=answering,
                              max_sequence_length=model.config.max_sequence_length, created=int(time.time()))
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.include_router(_api)
    if (STATIC_DIR / "index.html").is_file():
        _add_web_ui(app)
    return app


def _lifespan(worker: Worker, drain_timeout_s: float) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop, drain_timeout_s)  # at once when the runner has drained already

    return lifespan


def _add_web_ui(app: FastAPI) -> None:
    """The web UI: its page at /, its files under /static/ (StaticFiles refuses paths outside the folder)."""

    @app.get("/", include_in_schema=False)
    async def web_ui() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# --- requests ----------------------------------------------------------------------------------------

def _served(request: Request) -> Served:
    return request.app.state.served


def _authorize(request: Request) -> None:
    """Require ``Authorization: Bearer KEY`` when a key is set, compared in constant time."""
    key = _served(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                       "invalid_api_key")


async def _read_json(request: Request, max_bytes: int, timeout_s: float) -> Any:
    """The body as JSON, read no further than ``max_bytes`` and for no longer than ``timeout_s``.

    A declared ``Content-Length`` above the limit is refused before anything is read; a chunked body
    as soon as it passes the limit, so the server never holds more than ``max_bytes`` of it.

    Raises:
        APIError: 413 (too large), 408 (too slow), 400 (not JSON).
    """
    too_large = APIError(413, f"the request body exceeds {max_bytes} bytes", None, "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large

    async def read() -> bytearray:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        return body

    try:
        body = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError as error:
        raise APIError(408, f"the request body took longer than {timeout_s:g} s to arrive", None,
                       "request_timeout") from error
    except ClientDisconnect as error:  # 499: nobody reads the answer; it is for the logs and metrics
        raise APIError(499, "the client closed the connection before its body arrived", None,
                       "client_disconnected") from error
    try:
        parsed = json.loads(body)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, as is an integer of over 4300 digits;
    # deep nesting ([[[[...) is a RecursionError.
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}"[:300], None, "invalid_json") from error
    if (where := unencodable_string(parsed)) is not None:
        raise APIError(400, f"{where} holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair): "
                       f"not text", where, "invalid_value")
    return parsed


async def _answer(kind: Kind, request: Request) -> Response:
    served = _served(request)
    body = await _read_json(request, served.config.max_body_bytes, served.config.body_timeout_s)
    job = await asyncio.to_thread(parse_job, kind, body, served.tokenizer, served.config,
                                  served.max_sequence_length)
    ticket = start(served.answering, job)
    if job.stream:
        return StreamingResponse(stream(served.answering, job, ticket, request.is_disconnected),
                                 media_type="text/event-stream", headers=_STREAM_HEADERS)
    answer = await complete(served.answering, job, ticket, request.is_disconnected)
    if answer is None:  # nobody is listening; 499 = "client closed request", for the logs and metrics
        return Response(status_code=499)
    return JSONResponse(answer)


_api = APIRouter()
_KEYED = [Depends(_authorize)]


@_api.post("/v1/chat/completions", dependencies=_KEYED)
async def _chat_completions(request: Request) -> Response:
    return await _answer("chat", request)


@_api.post("/v1/completions", dependencies=_KEYED)
async def _completions(request: Request) -> Response:
    return await _answer("completion", request)


@_api.get("/v1/models", dependencies=_KEYED)
async def _models(request: Request) -> dict:
    return {"object": "list", "data": [_served(request).model_card()]}


@_api.get("/v1/models/{name:path}", dependencies=_KEYED)
async def _model(name: str, request: Request) -> dict:
    served = _served(request)
    if name != served.config.model_name:
        raise model_not_found(name, served.config.model_name)
    return served.model_card()


@_api.get("/health")
async def _health(request: Request) -> JSONResponse:
    served = _served(request)
    accepting = served.worker.accepting
    body = {"status": "ok" if accepting else "draining", "model": served.config.model_name,
            "queued": served.worker.queued, "active_rows": served.worker.active_rows}
    return JSONResponse(body, status_code=200 if accepting else 503, headers=None if accepting else retry_after(503))


@_api.get("/metrics", dependencies=_KEYED)
async def _prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_served(request).metrics.render(), media_type="text/plain; version=0.0.4")
