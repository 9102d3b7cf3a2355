"""Running the API app under uvicorn: connection limits, and a shutdown that drains once.

``uvicorn_server(app)`` is what ``llada serve`` runs (and ``serve_in_background``). Unlike a plain
``uvicorn.Server``, when shutdown begins (Ctrl-C, SIGTERM, ``should_exit``) the worker stops
admitting requests at once and gives those in flight ``drain_timeout_s`` to finish; then it ends the
rest, whose streams close with an error event and ``[DONE]`` and whose other requests get a 503.
While the drain lasts the server keeps listening: new requests and ``/health`` are answered 503
"draining" with ``Retry-After``, so that a load balancer learns to send them elsewhere.
uvicorn's own graceful timeout comes ``SHUTDOWN_GRACE_S`` later, only for connections that still will
not close (a client that stopped reading); by then the lifespan's drain has nothing left to wait for.

What uvicorn enforces from the config: ``max_connections`` (``limit_concurrency``: beyond it, a plain
503) and idle keep-alive connections closed after ``KEEP_ALIVE_S``. uvicorn has no timeout for slow
request headers; put a reverse proxy in front of a server that is reachable from untrusted networks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time

import uvicorn
from fastapi import FastAPI

from llada.server.config import ServerConfig
from llada.server.worker import Worker

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 2.0  # after the drain: time for the streams it ended to send their last events
DRAIN_POLL_S = 0.05  # how often a shutdown looks whether the drain has finished
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default, stated)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that starts the worker's drain as soon as it begins to shut down."""

    def __init__(self, config: uvicorn.Config, worker: Worker, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.worker, self.drain_timeout_s = worker, drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Drain first with the listening socket still open, so that while requests are in flight new
        ones (and ``/health``) get a 503 "draining" with ``Retry-After`` instead of a refused
        connection; then uvicorn's own shutdown closes the socket and the connections."""
        self.worker.drain(self.drain_timeout_s)
        deadline = time.monotonic() + self.drain_timeout_s
        while self.worker.busy and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await super().shutdown(sockets)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def uvicorn_server(app: FastAPI, host: str | None = None, port: int | None = None,
                   log_level: str = "info") -> DrainingServer:
    """A server for ``app`` (from ``create_app``) with its config's limits; host and port default to the config's.

    Logs a warning when it will listen beyond this machine without an API key.
    """
    config: ServerConfig = app.state.config
    host = config.host if host is None else host
    if config.api_key is None and not is_loopback(host):
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(set --api-key or LLADA_API_KEY)", host)
    settings = uvicorn.Config(app, host=host, port=config.port if port is None else port, log_level=log_level,
                              limit_concurrency=config.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
                              timeout_graceful_shutdown=config.drain_timeout_s + SHUTDOWN_GRACE_S)
    return DrainingServer(settings, app.state.worker, config.drain_timeout_s)
