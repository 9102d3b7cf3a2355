"""``llada serve``: the OpenAI-compatible HTTP server over the engine (``llada.server``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llada.cli.common import CliError, Command, add_runtime, add_sampling, settings_from_args
from llada.model.loading import load
from llada.server.config import ServerConfig


def add_serving(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig(api_key=None)
    parser.add_argument("--host", default=defaults.host, help=f"address to bind (default {defaults.host}: this "
                        "machine only; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=defaults.port, help=f"default {defaults.port}")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LLADA_API_KEY, else none)")
    parser.add_argument("--model-name", help="the model id clients send (default: the model directory's name)")
    for name, help_text in (("max_prompt_tokens", "longest prompt accepted"),
                            ("max_gen_length", "largest answer canvas (max_tokens rounded up to block_length)"),
                            ("max_steps", "largest 'steps' a request may ask for"),
                            ("max_batch", "most rows decoding at once"),
                            ("max_queue", "most requests waiting for a batch slot (beyond: HTTP 429)"),
                            ("max_connections", "most open connections and requests at once (beyond: HTTP 503)"),
                            ("max_body_bytes", "largest request body (beyond: HTTP 413)")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"{help_text} (default {getattr(defaults, name)})")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help=f"seconds a request body may take to arrive (default {defaults.body_timeout_s:g})")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help=f"seconds before a request is cancelled (default {defaults.request_timeout_s:g})")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout_s,
                        help=f"on shutdown, seconds in-flight requests may take before they are ended (default "
                             f"{defaults.drain_timeout_s:g})")


def serve_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """ServerConfig from the serve flags; the sampling flags are the defaults of omitted request fields."""
    if args.sampler != "engine":
        raise CliError("llada serve decodes with the engine; --sampler reference is not available (use --policy fixed)")
    key = {} if args.api_key is None else {"api_key": args.api_key}
    return ServerConfig(model_name=args.model_name or Path(args.model).resolve().name, host=args.host, port=args.port,
                        max_prompt_tokens=args.max_prompt_tokens, max_gen_length=args.max_gen_length,
                        max_steps=args.max_steps, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_connections=args.max_connections, max_body_bytes=args.max_body_bytes,
                        body_timeout_s=args.body_timeout, request_timeout_s=args.request_timeout,
                        drain_timeout_s=args.drain_timeout,
                        compile=args.compile, deterministic=args.deterministic, settings=settings_from_args(args),
                        **key)


def run_serve(model: str, config: ServerConfig, device: str = "auto", dtype: str = "auto", seed: int = 0) -> None:
    """Serve ``model`` over the OpenAI API until interrupted; Ctrl-C lets in-flight requests finish first."""
    try:
        from llada.server.app import create_app
        from llada.server.runner import uvicorn_server
    except ImportError as error:
        raise CliError(f"llada serve needs FastAPI and uvicorn: pip install 'llada[serve]' ({error})") from error
    config.validate()  # before the model is loaded
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    app = create_app(config, net, tokenizer)
    if config.compile:  # compile (or load from the compile cache) and capture before the first request
        scheduler = app.state.worker.scheduler
        scheduler.engine.warm_up(config.settings, batch_sizes=(1,), prompt_lengths=(scheduler.prompt_bucket,))
    uvicorn_server(app).run()


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling(parser)
    add_serving(parser)
    add_runtime(parser)


def _serve(args: argparse.Namespace) -> None:
    run_serve(args.model, serve_config_from_args(args), device=args.device, dtype=args.dtype, seed=args.seed)


COMMANDS = [
    Command("serve", "Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, denoising "
            "steps); --gen-length is the default max_tokens.",
            "examples:\n  llada serve --model ckpt/ --port 8000          # http://127.0.0.1:8000/v1, docs/serving.md\n"
            "  LLADA_API_KEY=secret llada serve --model ckpt/ --host 0.0.0.0 --max-batch 16 --gen-length 256",
            _serve_arguments, _serve),
]
