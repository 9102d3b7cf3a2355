"""The OpenAI-compatible HTTP API: ``create_app`` wires routes, authentication, errors and the worker.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the web UI's files at ``/`` when present.
Handlers only parse, submit to the ``Worker`` and format; all model work happens on its thread.
The app's lifespan starts the worker and, on shutdown, stops admitting (503) and lets in-flight
requests finish for up to ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llada.engine import Engine
from llada.model import LLaDAModel
from llada.scheduler import Scheduler, SchedulerFull
from llada.server.completions import Answering, complete, stream
from llada.server.config import ServerConfig
from llada.server.errors import APIError, install_error_handlers
from llada.server.metrics import Metrics
from llada.server.schemas import Kind, parse_job
from llada.server.text import TokenPieces
from llada.server.worker import Draining, Worker
from llada.tokenizer import Tokenizer

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 << 20  # a prompt is at most max_prompt_tokens tokens; this bounds what is read to find out
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


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


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", None, "request_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", None, "request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", None, "invalid_json") from error


def create_app(config: ServerConfig, model: LLaDAModel, tokenizer: Tokenizer) -> FastAPI:
    """The API server for one model (in eval mode, on its device); run it with uvicorn.

    Args:
        config: address, key, limits and default decoding settings (checked here).
        model: the mask predictor; only the worker thread runs it.
        tokenizer: its tokenizer (with a chat template for ``/v1/chat/completions``).
    """
    config.validate()
    metrics = Metrics()
    scheduler = Scheduler(Engine(model, compile=config.compile), max_batch=config.max_batch,
                          max_waiting=config.max_queue)
    worker = Worker(scheduler, metrics)
    metrics.gauge("llada_queue_depth", "Requests waiting for a batch slot", lambda: worker.queued)
    metrics.gauge("llada_active_rows", "Rows decoding after the last step", lambda: worker.active_rows)
    metrics.gauge("llada_max_batch", "Most rows decoding at once (configured)", lambda: config.max_batch)
    end_ids = tuple(i for i in (model.config.eos_token_id, model.config.eot_token_id) if i is not None)
    answering = Answering(worker=worker, tokenizer=tokenizer, pieces=TokenPieces(tokenizer), metrics=metrics,
                          model_name=config.model_name, mask_id=model.config.mask_token_id, end_ids=end_ids,
                          timeout_s=config.request_timeout_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop, config.drain_timeout_s)

    app = FastAPI(title="llada", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    async def answer(kind: Kind, request: Request) -> Response:
        job = parse_job(kind, await _json_body(request), tokenizer, config, model.config.max_sequence_length)
        generator = None
        if job.seed is not None and (job.settings.temperature > 0 or job.settings.remasking == "random"):
            generator = torch.Generator(device=model.device).manual_seed(job.seed)
        try:
            ticket = worker.submit(job.prompt, job.settings, generator)
        except SchedulerFull as error:
            raise APIError(429, str(error), None, "rate_limit_exceeded") from error
        except Draining as error:
            raise APIError(503, str(error), None, "server_shutting_down") from error
        if job.stream:
            return StreamingResponse(stream(answering, job, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = await complete(answering, job, ticket, request.is_disconnected)
        if body is None:  # nobody is listening; 499 = "client closed request", for the logs and metrics
            return Response(status_code=499)
        return JSONResponse(body)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        return await answer("chat", request)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        return await answer("completion", request)

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "llada",
                "max_model_len": model.config.max_sequence_length}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model_info(name: str) -> dict:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           "model", "model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if worker.accepting else "draining", "model": config.model_name,
                "queued": worker.queued, "active_rows": worker.active_rows}
        return JSONResponse(body, status_code=200 if worker.accepting else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    if (STATIC_DIR / "index.html").is_file():  # the web UI: its page at /, its files under /static/
        @app.get("/", include_in_schema=False)
        async def web_ui() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
