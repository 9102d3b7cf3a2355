"""Cold start of a compiled engine: seconds from process start to the first answer token, first and later starts.

Each start is a new process (``start``) that imports llada, loads the checkpoint's weights onto the
GPU, makes an ``Engine(compile=True)`` (which preloads the compile cache, ``engine/compile_cache.py``)
and streams one answer; it reports, as seconds since the parent launched it: imports done, weights
loaded, engine made, first answer token decided, answer complete. ``measure`` runs, on one cache
root emptied first: a start without ``--compile`` (the eager engine, for scale), a first compiled
start (empty cache), and ``--runs - 1`` later compiled starts (the cache filled by the first).

    python benchmarks/cold_start.py prepare /tmp/ckpt-8b --preset 8b          # random bf16 weights
    python benchmarks/cold_start.py measure /tmp/ckpt-8b --cache /tmp/llada-cache --out cold_start.json
    python benchmarks/cold_start.py measure /tmp/ckpt-8b --cache /tmp/llada-cache --fp8 --keep-prompt   # fp8 layers

The weights are read from the page cache after the first start (the file was just written or read):
"including weight loading" here means from memory, not from a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PROMPT_LENGTH, GEN_LENGTH, BLOCK_LENGTH = 64, 64, 32


def _device() -> str:
    """The GPU; the CPU only to try the script on a small preset."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare(directory: str, preset_name: str) -> None:
    import torch

    from llada.model.config import preset
    from llada.model.transformer import LLaDAModel

    torch.manual_seed(0)
    with torch.device(_device()):
        model = LLaDAModel(preset(preset_name)).to(torch.bfloat16)
    model.save_pretrained(directory)
    print(f"saved random {preset_name} weights to {directory}")


def start(directory: str, launched: float, compile: bool, fp8: bool, keep_prompt: bool) -> None:
    """One start, timed from ``launched`` (the parent's clock, seconds since the epoch)."""
    import torch

    from llada import Engine, GenerationSettings, LLaDAModel
    from llada.model.quantize import quantize_fp8

    marks = {"imported": time.time() - launched}
    model = LLaDAModel.from_pretrained(directory, dtype=torch.bfloat16, device=_device()).eval()
    if fp8:
        quantize_fp8(model)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    marks["weights_loaded"] = time.time() - launched
    engine = Engine(model, compile=compile)
    marks["engine_made"] = time.time() - launched
    marks["cache_blobs_loaded"] = engine.runtime.compile_cache_loaded
    prompt = [(7 * i) % 1000 + 10 for i in range(PROMPT_LENGTH)]
    settings = GenerationSettings(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, early_stop=False,
                                  keep_prompt=keep_prompt)
    for update in engine.stream([prompt], settings):
        if "first_token" not in marks and bool(update.decided.any()):
            marks["first_token"] = time.time() - launched
    marks["answer_complete"] = time.time() - launched
    cache = engine.runtime.compile_cache
    marks["cache_bytes"] = sum(blob.stat().st_size for blob in cache.artifacts) if cache is not None else 0
    print(json.dumps(marks))


def _launch(directory: str, compile: bool, variant: list[str], environment: dict) -> dict:
    launched = time.time()
    command = [sys.executable, __file__, "start", directory, "--launched", repr(launched), *variant]
    if compile:
        command.append("--compile")
    done = subprocess.run(command, env=environment, check=True, capture_output=True, text=True)
    return {name: round(value, 2) for name, value in json.loads(done.stdout.splitlines()[-1]).items()}


def measure(directory: str, cache_root: str, runs: int, fp8: bool, keep_prompt: bool) -> dict:
    shutil.rmtree(cache_root, ignore_errors=True)
    environment = {**os.environ, "LLADA_CACHE_DIR": cache_root}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        environment.pop(name, None)  # under the cache root, emptied above
    variant = [*(["--fp8"] if fp8 else []), *(["--keep-prompt"] if keep_prompt else [])]
    report = {"checkpoint": directory, "prompt_length": PROMPT_LENGTH, "gen_length": GEN_LENGTH,
              "block_length": BLOCK_LENGTH, "fp8": fp8, "keep_prompt": keep_prompt,
              "eager": _launch(directory, False, variant, environment), "compiled": []}
    print("eager", report["eager"], flush=True)
    for run in range(runs):
        report["compiled"].append(_launch(directory, True, variant, environment))
        print("compiled start", run + 1, report["compiled"][-1], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("prepare")
    making.add_argument("directory")
    making.add_argument("--preset", default="8b")
    starting = commands.add_parser("start")
    starting.add_argument("directory")
    starting.add_argument("--launched", type=float, required=True)
    starting.add_argument("--compile", action="store_true")
    measuring = commands.add_parser("measure")
    for group in (starting, measuring):
        group.add_argument("--fp8", action="store_true", help="fp8 block weights (quantize_fp8), as --dtype fp8")
        group.add_argument("--keep-prompt", action="store_true", help="the keep_prompt setting")
    measuring.add_argument("directory")
    measuring.add_argument("--cache", required=True, help="the cache root to use (emptied first)")
    measuring.add_argument("--runs", type=int, default=2)
    measuring.add_argument("--out")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory, args.preset)
    elif args.command == "start":
        start(args.directory, args.launched, args.compile, args.fp8, args.keep_prompt)
    else:
        import torch

        report = {"device": None, **measure(args.directory, args.cache, args.runs, args.fp8, args.keep_prompt)}
        report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        if args.out:
            with open(args.out, "w", encoding="utf-8") as out:
                json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
