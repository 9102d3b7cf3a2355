"""Forward-pass latency, throughput and memory of the LLaDA-8B shape (random bf16 weights) on one GPU.

Prints a table and writes JSON. Measures the card's two ceilings first (device-to-device copy
bandwidth and a large bf16 matmul), so every row can be read against its physical floor:
max(weights bytes / bandwidth, FLOPs / matmul rate).

    PYTHONPATH=src python benchmarks/forward.py --out benchmarks/results/forward_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial

import torch

from llada.model.config import preset
from llada.model.transformer import LLaDAModel
from llada.training.parallelize import compile_model

SHAPES = [(1, 32), (1, 768), (1, 2048), (8, 32), (8, 768), (8, 2048)]  # (batch, length)


def time_cuda(fn, warmup: int = 3, repeat: int = 20) -> list[float]:
    """Milliseconds per call, measured with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write bytes) and bf16 matmul rate of this card."""
    source = torch.randn(2 * 2**30 // 2, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    target = torch.empty_like(source)
    copy_ms = statistics.median(time_cuda(lambda: target.copy_(source)))
    bandwidth = 2 * source.numel() * 2 / (copy_ms / 1e3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_ms = statistics.median(time_cuda(lambda: a @ b))
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / (matmul_ms / 1e3) / 1e12}


def bench_model(model, config, variant: str, ceilings: dict[str, float], repeat: int,
                shapes: list[tuple[int, int]]) -> list[dict]:
    weight_bytes = config.num_parameters() * 2
    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, length), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            compile_start = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            first_call_s = time.perf_counter() - compile_start
            times = time_cuda(partial(model, ids), repeat=repeat)
        median = statistics.median(times)
        flops = config.flops_per_token(length) * batch * length
        floor_ms = 1e3 * max(weight_bytes / (ceilings["copy_bandwidth_GBps"] * 1e9),
                             flops / (ceilings["bf16_matmul_TFLOPs"] * 1e12))
        rows.append({
            "variant": variant, "batch": batch, "length": length,
            "median_ms": median, "min_ms": min(times), "max_ms": max(times),
            "tokens_per_s": batch * length / (median / 1e3), "TFLOPs": flops / (median / 1e3) / 1e12,
            "floor_ms": floor_ms, "x_floor": median / floor_ms,
            "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30, "first_call_s": first_call_s,
        })
        print(f"{variant:16s} b={batch} L={length:5d}  {median:8.2f} ms  (floor {floor_ms:6.2f} ms, "
              f"x{median / floor_ms:4.2f})  {rows[-1]['TFLOPs']:6.1f} TFLOP/s  "
              f"peak {rows[-1]['peak_memory_GiB']:5.1f} GiB  first call {first_call_s:5.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b")
    parser.add_argument("--variants", default="eager,compiled,compiled-cudagraphs",
                        help="comma-separated: eager, compiled (torch.compile), compiled-cudagraphs "
                             "(torch.compile with CUDA graphs)")
    parser.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES),
                        help="comma-separated BATCHxLENGTH, e.g. 1x32,8x768")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    ceilings = measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_bandwidth_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    config = preset(args.preset)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly (no fp32 copy of 8B)
    with torch.device("cuda"):
        model = LLaDAModel(config).eval()
    torch.set_default_dtype(torch.float32)
    print(f"model: {args.preset}, {config.num_parameters() / 1e9:.2f}B parameters", flush=True)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    check_ids = torch.randint(0, config.vocab_size, (2, 64), device="cuda")
    with torch.inference_mode():
        reference = model(check_ids).logits.float()
    results = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        if variant == "compiled":
            runner = compile_model(model)
        elif variant == "compiled-cudagraphs":
            runner = compile_model(model, mode="reduce-overhead")
        elif variant == "eager":
            runner = model
        else:
            raise SystemExit(f"unknown variant {variant}")
        with torch.inference_mode():
            error = ((runner(check_ids).logits.float() - reference).norm() / reference.norm()).item()
        print(f"{variant}: relative error of logits vs eager {error:.2e}", flush=True)
        rows = bench_model(runner, config, variant, ceilings, args.repeat, shapes)
        results += [dict(row, rel_error_vs_eager=error) for row in rows]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "preset": args.preset, "parameters": config.num_parameters(), "ceilings": ceilings, "results": results}
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
