"""Engine speed of two source trees on one GPU, through the public API only (``from llada import ...``),
so that the same script times a tree before and after a change that moved modules.

Runs each tree in its own process, alternating A, B, A, B (``--rounds``), and reports per case the
median tokens/s of each tree, B/A, and whether both trees gave the same answers (a hash of every
answer's tokens). Cases: the shipped demo model (batch 1 at 256 tokens, batch 32 at 32 tokens, the
engine's defaults: dual cache, threshold 0.9, CUDA graphs) and random bf16 weights at the LLaDA-8B
shape (prompt 512, answer 256, block 32; batch 1 and 8; random weights commit one token per step,
so this times the step, not parallelism).

    python benchmarks/engine_ab.py --a before/src --b src --out benchmarks/results/engine/ab_h100.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "demo_b1_gen256": {"model": "demo", "batch": 1, "prompt": 32, "gen_length": 256, "block_length": 32},
    "demo_b32_gen32": {"model": "demo", "batch": 32, "prompt": 32, "gen_length": 32, "block_length": 8},
    "8b_b1_p512_gen256": {"model": "8b", "batch": 1, "prompt": 512, "gen_length": 256, "block_length": 32},
    "8b_b8_p512_gen64": {"model": "8b", "batch": 8, "prompt": 512, "gen_length": 64, "block_length": 32},
}


def child(case_names: list[str], repeats: int, compile: bool) -> None:
    """Time the cases with whichever ``llada`` is first on the path; print one JSON line per case."""
    import torch

    from llada import Engine, GenerationSettings, LLaDAModel, preset

    models: dict[str, LLaDAModel] = {}
    for name in case_names:
        case = CASES[name]
        if case["model"] not in models:
            if case["model"] == "demo":
                models["demo"] = LLaDAModel.from_pretrained("models/demo", dtype=torch.bfloat16, device="cuda").eval()
            else:
                torch.manual_seed(0)
                with torch.device("cuda"):
                    models["8b"] = LLaDAModel(preset("8b")).to(torch.bfloat16).eval()
        model = models[case["model"]]
        engine = Engine(model, compile=compile)
        generator = torch.Generator().manual_seed(1)
        vocab = min(model.config.vocab_size, 8000)
        prompts = [torch.randint(0, vocab, (case["prompt"],), generator=generator).tolist() for _ in range(case["batch"])]
        settings = GenerationSettings(gen_length=case["gen_length"], block_length=case["block_length"])
        results = engine.generate(prompts, settings)  # warm-up: captures the graphs
        seconds = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            results = engine.generate(prompts, settings)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        tokens = sum(len(r.tokens) for r in results)
        digest = hashlib.sha256(json.dumps([r.answer.tolist() for r in results]).encode()).hexdigest()[:16]
        print(json.dumps({"case": name, "tokens": tokens, "steps": max(r.steps for r in results),
                          "median_s": statistics.median(seconds), "tokens_per_s": tokens / statistics.median(seconds),
                          "answers_sha256": digest}), flush=True)
        del engine
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="source folder of tree A (holds the llada package)")
    parser.add_argument("--b", required=True, help="source folder of tree B")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=2, help="A/B alternations (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per case and process (default 5)")
    parser.add_argument("--compile", action="store_true", help="time compiled engines (the first call compiles)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.cases, args.repeats, args.compile)
        return
    runs: dict[str, dict[str, list[dict]]] = {"a": {}, "b": {}}
    for _ in range(args.rounds):
        for tree in ("a", "b"):
            path = [str(Path(getattr(args, tree)).resolve()), os.environ.get("PYTHONPATH", "")]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
            out = subprocess.run([sys.executable, __file__, "--child", "--a", args.a, "--b", args.b, "--repeats",
                                  str(args.repeats), "--cases", *args.cases, *(["--compile"] if args.compile else [])],
                                 env=env, capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                print(tree, line, file=sys.stderr, flush=True)
                record = json.loads(line)
                runs[tree].setdefault(record["case"], []).append(record)
    summary = {}
    for case in args.cases:
        a, b = runs["a"][case], runs["b"][case]
        a_rate = statistics.median(r["tokens_per_s"] for r in a)
        b_rate = statistics.median(r["tokens_per_s"] for r in b)
        summary[case] = {"a_tokens_per_s": round(a_rate, 1), "b_tokens_per_s": round(b_rate, 1),
                         "b_over_a": round(b_rate / a_rate, 3), "tokens": a[0]["tokens"], "steps": a[0]["steps"],
                         "same_answers": len({r["answers_sha256"] for r in a + b}) == 1,
                         "a_runs": [round(r["tokens_per_s"], 1) for r in a],
                         "b_runs": [round(r["tokens_per_s"], 1) for r in b]}
        print(case, json.dumps(summary[case]), flush=True)
    if args.out:
        import torch

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "a": args.a, "b": args.b, "compile": args.compile, "cases": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
