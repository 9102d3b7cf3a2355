"""How the API server is set up: address, authentication, limits and default decoding settings.

Only values; ``app.py`` and ``runner.py`` read them. The defaults are the safe ones: loopback
address, bounded connections, queue, body, prompt, answer length and request time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from llada.engine.settings import GenerationSettings

API_KEY_ENV = "LLADA_API_KEY"


def _api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


@dataclass(kw_only=True)
class ServerConfig:
    """The server's address, key and limits; ``settings`` are the defaults of omitted request fields."""

    model_name: str = "llada"  # the id clients send as "model" (`llada serve` uses the directory's name)
    host: str = "127.0.0.1"  # loopback only: exposing the server is an explicit choice
    port: int = 8000
    api_key: str | None = field(default_factory=_api_key_from_env)  # None: no authentication
    max_prompt_tokens: int = 2048  # longer prompts are refused (400)
    max_gen_length: int = 1024  # largest answer canvas: max_tokens rounded up to a multiple of block_length
    max_steps: int = 1024  # largest "steps" a request may ask for
    max_batch: int = 32  # most rows decoding at once (the scheduler's batch capacity)
    max_queue: int = 256  # most requests waiting for a batch slot; beyond it 429
    # Most open connections (idle keep-alive ones too) and requests at once; beyond it uvicorn answers 503.
    # Above max_batch + max_queue, so that overload is normally the queue's 429 with an OpenAI body.
    max_connections: int = 1024
    max_body_bytes: int = 4 << 20  # larger request bodies are refused (413) as soon as they pass this
    body_timeout_s: float = 30.0  # a request body still arriving after this is refused (408): slow senders
    request_timeout_s: float = 300.0  # a request still running after this is cancelled (504)
    drain_timeout_s: float = 30.0  # on shutdown, how long in-flight requests may take before they are ended
    compile: bool = False  # torch.compile the engine's block steps (GPU)
    # Batch-invariant numerics: an answer does not depend on the requests it is batched with (slower).
    deterministic: bool = False
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # gen_length = default max_tokens

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for name in ("max_prompt_tokens", "max_gen_length", "max_steps", "max_batch", "max_queue", "max_connections",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "request_timeout_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (use None for no authentication)")
        if self.settings.gen_length > self.max_gen_length:
            raise ValueError(f"the default gen_length ({self.settings.gen_length}) exceeds max_gen_length "
                             f"({self.max_gen_length})")
        self.settings.validate()
