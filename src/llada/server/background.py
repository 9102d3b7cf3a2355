"""Run the API app on a uvicorn server in a background thread: for tests, benchmarks and notebooks.

``llada serve`` runs the same server (``runner.uvicorn_server``) in the foreground instead; this
exists so that a client in the same process (the test suite, ``benchmarks/serve_load.py``) can talk
to a real server over a socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from llada.server.runner import uvicorn_server


@dataclass
class BackgroundServer:
    """A running server: ``url`` is its base address; ``stop()`` shuts it down as Ctrl-C would."""

    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    url: str  # http://HOST:PORT

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                        log_level: str = "warning") -> Iterator[BackgroundServer]:
    """Serve ``app`` (from ``create_app``) until the block ends; port 0 lets the OS pick a free one."""
    server = uvicorn_server(app, host=host, port=port, log_level=log_level)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    running = BackgroundServer(app, server, thread, f"http://{host}:{bound[1]}")
    try:
        yield running
    finally:
        running.stop()
