"""Load test of the API server: N concurrent streaming chat clients, M requests in all, localhost only.

Starts the server in this process — a checkpoint (default: the demo model), or with ``--init-preset``
a randomly initialised model of a preset's shape (e.g. ``8b``, on the GPU) with the demo tokenizer —
or targets one already running (``--url``, loopback addresses only). Each client streams
``/v1/chat/completions`` and records latency (request to ``[DONE]``), time to first block (the first
non-empty text chunk), the answer tokens (``usage.completion_tokens``: up to the first end-of-text)
and whether the stream ended properly (a ``finish_reason`` and ``[DONE]``; anything else is *lost*).
A warm-up round of N requests runs first and is not counted. The run is bounded: M requests, and
``--deadline`` seconds at most.

    PYTHONPATH=src python benchmarks/serve_load.py --clients 8 --requests 32 --max-tokens 32 \\
        --out benchmarks/results/serve/cpu_demo.json
    PYTHONPATH=src python benchmarks/serve_load.py --init-preset 8b --clients 32 --requests 256 --max-tokens 256 \\
        --max-batch 32 --out benchmarks/results/serve/h100_8b.json

With random weights no confidence reaches the threshold: every answer takes one step per token and
runs to its full length, so the GPU figures measure the server and the batching, not parallel decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import torch

from llada.engine.settings import GenerationSettings
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"
# The demo model's task kinds (definitions, verse continuation, arithmetic): varied prompt lengths.
PROMPTS = ['Define the word "king".', 'Define the word "ocean".', "What is 3 * 4?", "What is 17 + 25?",
           'Which line follows "To be, or not to be, that is the question:"?',
           'Which line comes before "And in the part of the king,"?', 'Define the word "light".',
           "What is 9 - 5?"]


@dataclass
class Outcome:
    status: int
    latency_s: float
    first_block_s: float | None  # None: no text came
    completion_tokens: int
    finish_reason: str | None
    done: bool  # the stream ended with [DONE]
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      extra: dict) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first, tokens, reason, done, error = None, 0, None, False, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(response.status_code, time.perf_counter() - start, None, 0, None, False, text[:300])
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", "error")
                    continue
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") and first is None:
                        first = time.perf_counter() - start
                    reason = choice.get("finish_reason") or reason
        return Outcome(200, time.perf_counter() - start, first, tokens, reason, done, error)
    except httpx.HTTPError as failure:
        return Outcome(0, time.perf_counter() - start, first, tokens, reason, done, f"{type(failure).__name__}: "
                       f"{failure}")


async def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int, extra: dict,
                   deadline_s: float, warmup: bool) -> tuple[list[Outcome], float]:
    """``requests`` requests from ``clients`` concurrent clients; returns the outcomes and the wall time."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s), limits=limits) as client:
        if warmup:
            await asyncio.gather(*(one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, extra)
                                   for i in range(clients)))
        pending = iter(range(requests))
        outcomes: list[Outcome] = []

        async def client_loop() -> None:
            for index in pending:  # the clients share one iterator: each request is sent once
                outcomes.append(await one_request(client, url, model, PROMPTS[index % len(PROMPTS)], max_tokens,
                                                  extra))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(clients))), deadline_s)
        return outcomes, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(outcomes: list[Outcome], wall_s: float, requests: int) -> dict:
    good = [o for o in outcomes if o.status == 200 and o.error is None]
    complete = [o for o in good if o.done and o.finish_reason]
    latencies = [o.latency_s for o in complete]
    first_blocks = [o.first_block_s for o in complete if o.first_block_s is not None]
    tokens = sum(o.completion_tokens for o in complete)
    reasons: dict[str, int] = {}
    for o in complete:
        reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
    return {
        "requests": requests, "completed": len(complete), "failed": len(outcomes) - len(good),
        "lost": len(good) - len(complete) + (requests - len(outcomes)),
        "wall_s": round(wall_s, 3), "requests_per_s": round(len(complete) / wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1), "completion_tokens": tokens,
        "latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                      "mean": sum(latencies) / len(latencies) if latencies else None},
        "first_block_s": {"p50": percentile(first_blocks, 50), "p99": percentile(first_blocks, 99),
                          "answers_with_text": len(first_blocks)},
        "finish_reasons": reasons,
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


def server_counters(url: str, headers: dict) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers).text
    wanted = ("llada_scheduler_steps_total", "llada_scheduler_rows_total", "llada_step_seconds_sum")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.split(" ")[0] in wanted}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url must be a loopback address (127.0.0.0/8, ::1, localhost), got {host!r}")


def build_model(args: argparse.Namespace) -> tuple[LLaDAModel, Tokenizer, str]:
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    if args.init_preset:
        # benchmarks/engine.py's random model of the preset's shape (bf16, on the GPU); its special ids
        # are set to the tokenizer's (ids the tokenizer lacks decode to nothing).
        sys.path.insert(0, str(Path(__file__).parent))
        from engine import random_model

        model = random_model(args.init_preset, tokenizer)
        return model, tokenizer, f"random-{args.init_preset}"
    from llada.model.loading import load

    model, _ = load(args.model, args.device, args.dtype)
    return model, tokenizer, Path(args.model).resolve().name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one in this process")
    parser.add_argument("--api-key", help="the running server's key")
    parser.add_argument("--model", default=str(DEMO_MODEL), help="checkpoint to serve (default: the demo model)")
    parser.add_argument("--init-preset", help="serve a random model of this preset's shape instead (e.g. 8b; GPU)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's block steps")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds the measured run may take at most")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    extra = {"block_length": args.block_length, "threshold": args.threshold}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    info: dict = {"command": " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
                  **{k: v for k, v in vars(args).items() if k not in ("api_key", "out")}}
    if Path(args.model).resolve().is_relative_to(Path.cwd()):
        info["model"] = str(Path(args.model).resolve().relative_to(Path.cwd()))
    with ExitStack() as stack:
        if args.url:
            check_loopback(args.url)
            url = args.url.rstrip("/")
            model_name = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        else:
            from llada.server.app import create_app
            from llada.server.background import serve_in_background
            from llada.server.config import ServerConfig

            model, tokenizer, model_name = build_model(args)
            info["device"] = torch.cuda.get_device_name() if model.device.type == "cuda" else \
                f"cpu, {torch.get_num_threads()} threads"
            gen_length = -(-args.max_tokens // args.block_length) * args.block_length
            config = ServerConfig(model_name=model_name, api_key=None, max_batch=args.max_batch,
                                  max_queue=max(256, args.requests), max_gen_length=max(1024, gen_length),
                                  compile=args.compile, request_timeout_s=args.deadline,
                                  settings=GenerationSettings(gen_length=gen_length, block_length=args.block_length))
            url = stack.enter_context(serve_in_background(create_app(config, model, tokenizer))).url
        before = server_counters(url, headers)
        outcomes, wall = asyncio.run(run_load(url, model_name, args.clients, args.requests, args.max_tokens, extra,
                                              args.deadline, not args.no_warmup))
        after = server_counters(url, headers)
    steps = after["llada_scheduler_steps_total"] - before["llada_scheduler_steps_total"]
    rows = after["llada_scheduler_rows_total"] - before["llada_scheduler_rows_total"]
    seconds = after["llada_step_seconds_sum"] - before["llada_step_seconds_sum"]
    result = {**info, "model_name": model_name, **summarize(outcomes, wall, args.requests),
              "server": {"steps": int(steps), "rows_per_step": round(rows / steps, 2) if steps else None,
                         "mean_step_ms": round(1e3 * seconds / steps, 3) if steps else None}}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if result["failed"] or result["lost"]:
        raise SystemExit(f"{result['failed']} failed and {result['lost']} lost requests")


if __name__ == "__main__":
    main()
