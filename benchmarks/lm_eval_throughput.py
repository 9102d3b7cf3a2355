"""Requests per second of the lm-eval model class (``llada.evaluation.lm_eval_model``), by request type.

Runs the three request types lm-evaluation-harness sends, built from the demo data's text, through
``LLaDAEvalModel`` exactly as lm-eval would call it, on a random-weight model of a preset's shape:

- ``loglikelihood`` with multi-token continuations (Monte-Carlo ELBO, ``--mc-num`` samples each);
- ``loglikelihood`` with one-token continuations (multiple-choice letters: exact, many per pass);
- ``generate_until`` (``sampler=engine`` with the threshold policy; random weights never reach the
  confidence threshold, so this is the one-token-per-step worst case).

    PYTHONPATH=src python benchmarks/lm_eval_throughput.py --preset 8b \
        --out benchmarks/results/eval/lm_eval_throughput_h100_8b.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from llada.evaluation.lm_eval_model import LLaDAEvalModel
from llada.model.tokenizer import Tokenizer


def passages(path: Path, count: int, words: int, seed: int = 0) -> list[str]:
    """``count`` passages of about ``words`` words, cut from a text file at random places."""
    text = path.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    return [" ".join(text[start:start + words]) for start in (rng.randrange(len(text) - words) for _ in range(count))]


def timed(call, requests: list[Instance]) -> dict:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    call(requests, disable_tqdm=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"requests": len(requests), "seconds": seconds, "requests_per_s": len(requests) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b", help="random-weight model of this shape (GPU)")
    parser.add_argument("--tokenizer", default="models/demo")
    parser.add_argument("--text", default="data/demo/corpus/hamlet.txt", help="where contexts are cut from")
    parser.add_argument("--context-words", type=int, default=150)
    parser.add_argument("--multi", type=int, default=32, help="multi-token loglikelihood requests")
    parser.add_argument("--single", type=int, default=512, help="one-token loglikelihood requests")
    parser.add_argument("--generate", type=int, default=64, help="generate_until requests")
    parser.add_argument("--mc-num", type=int, default=128)
    parser.add_argument("--mc-batch-size", type=int, default=32,
                        help="Monte-Carlo samples per forward pass (the model's batch_size, lm-eval's --batch_size)")
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's block steps")
    parser.add_argument("--out")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from engine import random_model

    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    model = random_model(args.preset, tokenizer)
    lm = LLaDAEvalModel((model, tokenizer), mc_num=args.mc_num, batch_size=args.mc_batch_size,
                        gen_batch_size=args.batch_size, sampler="engine", policy="threshold", cache="dual",
                        gen_length=args.gen_length, block_length=args.block_length, is_check_greedy=False,
                        compile=args.compile)
    contexts = passages(Path(args.text), max(args.multi, args.single, args.generate), args.context_words)
    continuations = passages(Path(args.text), args.multi, 8, seed=1)

    def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]

    multi = instances("loglikelihood", [(c, " " + t) for c, t in zip(contexts, continuations)])
    single = instances("loglikelihood", [(c + "\nAnswer:", " " + "ABCD"[i % 4]) for i, c in enumerate(contexts[:args.single])])
    generate = instances("generate_until", [(c, {"until": ["\n\n"], "max_gen_toks": args.gen_length})
                                            for c in contexts[:args.generate]])
    warm = instances("generate_until", [(contexts[0], {"until": [], "max_gen_toks": args.gen_length})] * args.batch_size)
    lm.generate_until(warm, disable_tqdm=True)  # CUDA graphs captured (and compiled) outside the timing
    lm.loglikelihood(multi[:2] + single[:args.mc_batch_size], disable_tqdm=True)
    results = {
        "loglikelihood_multi_token": {**timed(lm.loglikelihood, multi), "mc_num": args.mc_num},
        "loglikelihood_one_token": timed(lm.loglikelihood, single),
        "generate_until": {**timed(lm.generate_until, generate), "gen_length": args.gen_length,
                           "batch_size": args.batch_size},
    }
    report = {"preset": args.preset, "context_words": args.context_words, "mc_batch_size": args.mc_batch_size,
              "context_tokens_mean": sum(len(tokenizer.encode(c)) for c in contexts) / len(contexts),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "results": results}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
