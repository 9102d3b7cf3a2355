"""Generation speed of the engine against the reference sampler and the published accelerators' algorithms.

Random bf16 weights at the LLaDA-8B shape (speed does not depend on the weights' values):

- ``--part step``: the time of one denoising step at prompt 512 / answer 256 / block 32 / batch 1 —
  the reference sampler's full forward step, and the engine's cached block step (dual cache) eager,
  with CUDA graphs, and compiled with CUDA graphs — against the floor of reading the weights once
  at this card's measured copy bandwidth; last, the same with quantized block weights (``--quantize``:
  fp8 by default, or int8).
- ``--part e2e``: tokens/s over whole generations for answer lengths and batch sizes: the reference
  sampler (one token per step), the published prefix-cache and dual-cache algorithms with
  confidence threshold 0.9 as their papers describe them (eager PyTorch, no graphs), and the engine's
  best settings, in bf16 and (``engine_fp8``) with fp8 block weights. Tokens are counted up to and including each answer's first end-of-text token,
  wall-clock includes all host work. With random weights no confidence reaches the threshold, so
  every method commits one token per step: the ratios measure the cost of a step, not parallelism
  (docs/engine.md reports tokens per step on a trained model).

    PYTHONPATH=src python benchmarks/engine.py --part step --out benchmarks/results/engine/step_h100.json
    PYTHONPATH=src python benchmarks/engine.py --part step --batches 32 --out ...   # batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from llada.diffusion.sampling import generate
from llada.engine.engine import Engine, GenerationSettings
from llada.engine.scheduler import Scheduler
from llada.model import block_attention
from llada.model.config import preset
from llada.model.quantize import QUANTIZERS
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel


def random_model(name: str, tokenizer: Tokenizer | None = None) -> LLaDAModel:
    """A random bf16 model of a preset's shape on the GPU; with ``tokenizer``, its special ids are the
    tokenizer's (so that text in and out works; ids the tokenizer lacks decode to nothing)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        config = preset(name)
        model = LLaDAModel(config).to(torch.bfloat16)
    if tokenizer is not None:
        ids = tokenizer.ids
        model.config.mask_token_id, model.config.eos_token_id, model.config.eot_token_id = ids.mask, ids.eos, ids.eot
    return model.eval()


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy, reads plus writes (the figure the floor is quoted against)."""
    source = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * source.numel() * 20 / (start.elapsed_time(end) / 1e3)


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (synchronised wall-clock: includes host work)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_part(model: LLaDAModel, prompt_length: int, gen_length: int, block: int, batch: int,
              quantize: str | None, only: set[str] | None = None) -> dict:
    """Rows as in the module docstring; ``only``: just these variants (by name, without ``_step_ms``)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    floor_ms = weight_bytes / bandwidth * 1e3
    prompt = torch.randint(0, model.config.vocab_size - 1000, (batch, prompt_length), device="cuda")
    blocks = gen_length // block
    results = {"weights_GB": weight_bytes / 1e9, "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": floor_ms}
    # The reference sampler: one step per block here, so the time per step is the run's time / blocks.
    results["reference_step_ms"] = timed(lambda: generate(model, prompt, steps=blocks, gen_length=gen_length,
                                                          block_length=block), 3) / blocks
    settings = GenerationSettings(gen_length=gen_length, block_length=block, policy="fixed", steps=gen_length,
                                  cache="dual", early_stop=False)
    # Unfused first: the other engines fuse the q/k/v and gate/up projections in place.
    # The threshold policy at τ = 1 commits one token per step too, but reads "is the block decided?"
    # back to the host every step: its row prices that synchronisation.
    threshold = replace(settings, policy="threshold", threshold=1.0)
    # "reuse_decided": steps 5..24 query the block's undecided positions and the one decided last step
    # (widths 28 down to 8, in fours), so the row is the average of a block's sparse steps.
    # "sampling_apart": the graph holds the forward pass only; the choice and commit of tokens run as
    # separate kernels after it (the engine's way before whole block steps were captured).
    apart = {"cuda_graphs": True, "compile": True, "capture_sampling": False}
    variants = (("compiled_cuda_graphs_unfused", {"cuda_graphs": True, "compile": True, "fuse": False}, settings),
                ("eager", {"cuda_graphs": False}, settings), ("cuda_graphs", {"cuda_graphs": True}, settings),
                ("compiled_cuda_graphs", {"cuda_graphs": True, "compile": True}, settings),
                ("compiled_cuda_graphs_tensor_attention", {"cuda_graphs": True, "compile": True}, settings),
                ("compiled_cuda_graphs_sampling_apart", apart, settings),
                ("compiled_cuda_graphs_threshold_policy", {"cuda_graphs": True, "compile": True}, threshold),
                ("compiled_cuda_graphs_threshold_policy_sampling_apart", apart, threshold),
                ("compiled_cuda_graphs_reuse_decided", {"cuda_graphs": True, "compile": True},
                 replace(settings, reuse_decided=True)),
                *([(f"compiled_cuda_graphs_{quantize}", {"cuda_graphs": True, "compile": True}, settings)]
                  if quantize else []))
    for name, kwargs, variant_settings in variants:
        if only is not None and name not in only:
            continue
        if quantize and name.endswith(quantize):  # last: quantizing changes the model in place
            QUANTIZERS[quantize](model)
            results[f"{quantize}_weights_GB"] = sum(b.numel() * b.element_size() for b in model.buffers()) / 1e9
        # "tensor_attention": block steps attend with tensor operations, not llada.model.block_attention's kernel.
        block_attention.ENABLED = not name.endswith("_tensor_attention")
        engine = Engine(model, **kwargs)
        run = engine.start(prompt, variant_settings)
        run.advance()  # block start: the refresh
        for _ in range(3):
            run.advance()  # capture / compile the block step
        step_ms = timed(run.advance, 20)  # steps 5..24 of the first block: cached block steps
        cache, start = run.cache, prompt_length
        tokens = run.x[:, start:start + block]
        positions = torch.arange(start, start + block, device="cuda").expand(batch, -1)
        index = torch.arange(block, device="cuda").expand(batch, -1)
        forward_ms = timed(partial(engine.runtime.forward, cache, tokens, positions, index, None, write=not engine.runtime.compiled), 20)
        results[f"{name}_step_ms"] = step_ms
        results[f"{name}_forward_ms"] = forward_ms
        run.cancel()
        engine.release_memory()
        print(f"{name:37s} cached step {step_ms:7.2f} ms (forward alone {forward_ms:6.2f} ms)", flush=True)
    print(f"reference step {results['reference_step_ms']:.2f} ms; floor {floor_ms:.2f} ms "
          f"({weight_bytes / 1e9:.1f} GB at {bandwidth / 1e12:.2f} TB/s)", flush=True)
    return results


def count_tokens(results) -> int:
    return sum(len(r.tokens) for r in results)


def reference_run(model: LLaDAModel, prompt: torch.Tensor, gen_length: int, block: int) -> tuple[int, torch.Tensor]:
    """The reference sampler, one token per step: (answer tokens, output)."""
    out = generate(model, prompt, steps=gen_length, gen_length=gen_length, block_length=block)
    return prompt.shape[0] * gen_length, out


def engine_run(engine: Engine, prompt: torch.Tensor, settings: GenerationSettings) -> tuple[int, list]:
    """One engine generation: (answer tokens up to each first end-of-text, results)."""
    out = engine.generate(prompt, settings)
    return count_tokens(out), out


def e2e_part(model: LLaDAModel, prompt_length: int, gen_lengths: list[int], batches: list[int],
             methods: list[str], block: int, threshold: float, slow_max_batch: int,
             on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Method by method over every shape; ``engine_fp8``/``engine_int8`` (the engine on quantized block
    weights) last, since quantizing changes the model in place; ``..._keep_prompt``: with
    ``keep_prompt`` (answer-only refreshes). ``on_row(rows)`` after each row (the
    command line saves what it has, so that a run cut short keeps its rows)."""
    rows = []
    engines = {"published_prefix": Engine(model, cuda_graphs=False), "published_dual": Engine(model, cuda_graphs=False),
               "engine": Engine(model, cuda_graphs=True, compile=True)}
    prompts = {batch: torch.randint(0, model.config.vocab_size - 1000, (batch, prompt_length), device="cuda")
               for batch in batches}
    def quantized(method: str) -> str | None:
        return next((kind for kind in QUANTIZERS if f"_{kind}" in method), None)

    if len({quantized(m) for m in methods} - {None}) > 1:
        raise SystemExit("--methods: one quantized kind per run (quantizing changes the model in place)")

    for method in sorted(methods, key=lambda m: quantized(m) is not None):
        if method.startswith("engine") and method not in engines:
            kind = quantized(method)
            if kind and getattr(model, "quantized", None) != kind:
                QUANTIZERS[kind](model)
            engines[method] = Engine(model, cuda_graphs=True, compile=True,
                                     capture_sampling="sampling_apart" not in method)
        for gen_length in gen_lengths:
            for batch in batches:
                if method in ("reference", "published_prefix") and batch > slow_max_batch:
                    continue
                prompt = prompts[batch]
                if method == "reference":
                    run = partial(reference_run, model, prompt, gen_length, block)
                else:
                    cache = "prefix" if method == "published_prefix" else "dual"
                    settings = GenerationSettings(gen_length=gen_length, block_length=block, policy="threshold",
                                                  threshold=threshold, cache=cache,
                                                  early_stop=method.startswith("engine"),
                                                  keep_prompt="keep_prompt" in method,
                                                  reuse_decided="reuse_decided" in method)
                    run = partial(engine_run, engines[method], prompt, settings)
                if method.startswith("engine"):
                    run()  # compile and capture this shape first
                torch.cuda.synchronize()
                start = time.perf_counter()
                tokens, _ = run()
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                row = {"method": method, "gen_length": gen_length, "batch": batch, "tokens": tokens,
                       "seconds": seconds, "tokens_per_s": tokens / seconds}
                rows.append(row)
                print(f"gen {gen_length:4d} batch {batch:3d} {method:18s} {tokens:6d} tokens {seconds:8.2f} s "
                      f"{row['tokens_per_s']:9.1f} tokens/s", flush=True)
                if on_row:
                    on_row(rows)
    return rows


def check_part(preset_name: str) -> dict:
    """Agreement on the GPU: CUDA graphs vs plain calls (must be identical), compiled (may round
    differently), and the exact mode vs the reference sampler (bf16 ties may split them)."""
    model = random_model(preset_name)
    prompts = [torch.randint(0, model.config.vocab_size - 1000, (n,)).tolist() for n in (40, 57, 33, 64)]
    settings = GenerationSettings(gen_length=64, block_length=16, policy="threshold", threshold=0.5, cache="dual")
    plain = Engine(model, cuda_graphs=False).generate(prompts, settings)
    graphed = Engine(model, cuda_graphs=True).generate(prompts, settings)
    compiled = Engine(model, cuda_graphs=True, compile=True).generate(prompts, settings)
    same = lambda a, b: sum(torch.equal(x.answer, y.answer) for x, y in zip(a, b))
    exact = GenerationSettings(gen_length=64, block_length=16, policy="fixed", steps=64, cache="none",
                               early_stop=False)
    ours = Engine(model).generate(prompts[:1], exact)[0].answer
    reference = generate(model, torch.tensor(prompts[:1], device="cuda"), steps=64, gen_length=64,
                         block_length=16)[0, 40:].cpu()
    # Continuous batching with CUDA graphs: 4 requests, then 4 more joining two steps later.
    engine = Engine(model, cuda_graphs=True)
    scheduler = Scheduler(engine, max_batch=8, prompt_bucket=64)
    more = [torch.randint(0, model.config.vocab_size - 1000, (n,)).tolist() for n in (20, 61, 45, 8)]
    requests = [scheduler.submit(p, settings) for p in prompts]
    scheduler.step()
    scheduler.step()
    requests += [scheduler.submit(p, settings) for p in more]
    scheduler.run_until_idle()
    alone = [engine.generate([r.prompt], settings)[0] for r in requests]
    result = {"rows": len(prompts), "graphs_equal_plain": same(plain, graphed), "compiled_equal_plain": same(plain, compiled),
              "exact_vs_reference_positions_equal": int((ours == reference).sum()), "positions": 64,
              "scheduler_requests": len(requests),
              "scheduler_equal_single": sum(r.result.tokens == a.tokens for r, a in zip(requests, alone)),
              "scheduler_steps": [r.result.steps for r in requests]}
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["check", "step", "e2e"], default="step")
    parser.add_argument("--preset", default="8b")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--gen-lengths", default="256,512")
    parser.add_argument("--batches", default="1,32", help="--part e2e: batch sizes; --part step: the first one")
    parser.add_argument("--methods", default="reference,published_prefix,published_dual,engine,engine_fp8",
                        help="engine methods: engine, engine_keep_prompt (settings.keep_prompt), engine_fp8 / "
                             "engine_int8 (quantized block weights, run last), engine_fp8_keep_prompt; "
                             "..._sampling_apart: graphs of the forward pass only (Engine(capture_sampling=False)); "
                             "..._reuse_decided: settings.reuse_decided")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--slow-max-batch", type=int, default=1,
                        help="largest batch for the reference and prefix-cache runs (minutes per run beyond)")
    parser.add_argument("--quantize", choices=sorted(QUANTIZERS), default="fp8",
                        help="--part step: also time the compiled step with quantized block weights")
    parser.add_argument("--no-quantize", dest="quantize", action="store_const", const=None)
    parser.add_argument("--variants", help="--part step: only these rows (comma-separated names, e.g. "
                                           "compiled_cuda_graphs,compiled_cuda_graphs_sampling_apart)")
    parser.add_argument("--out")
    args = parser.parse_args()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset}
    if args.part == "check":
        info["check"] = check_part(args.preset)
        model = None
    else:
        model = random_model(args.preset)
    if args.part == "step":
        info["step"] = step_part(model, args.prompt_length, 256, args.block_length,
                                 int(args.batches.split(",")[0]), args.quantize,
                                 set(args.variants.split(",")) if args.variants else None)
    elif args.part == "e2e":
        def save(rows: list[dict]) -> None:
            info["e2e"] = rows
            write(info, args.out)

        info["e2e"] = e2e_part(model, args.prompt_length, [int(g) for g in args.gen_lengths.split(",")],
                               [int(b) for b in args.batches.split(",")], args.methods.split(","),
                               args.block_length, args.threshold, args.slow_max_batch, save)
    write(info, args.out)


def write(info: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
