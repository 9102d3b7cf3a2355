"""How often lm-eval's ``is_greedy`` approximations agree with the official definition.

Builds continuations that are greedy by construction (the reference sampler decoding a masked suffix
one token per step, most confident first: exactly the official ``suffix_greedy_prediction``), then
asks the official check (``llada.diffusion.likelihood.suffix_greedy``) and the one-pass approximation
(``greedy_check=one_pass``: every continuation token the argmax of one forward pass) about them.

    PYTHONPATH=src python benchmarks/experiments/greedy_check_agreement.py --model models/demo \
        --out benchmarks/results/eval/greedy_check_agreement_demo.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from llada.diffusion.likelihood import suffix_greedy
from llada.diffusion.sampling import generate
from llada.evaluation.lm_eval_model import LLaDAEvalModel

WORDS = ["The", "king", "is", "dead", ".", "To", "be", "or", "not", "to", "be", "that", "is", "the", "question", "Define", "the", "word", "ocean", "What", "is", "3", "+", "4", "?", "O", "Romeo", "wherefore", "art", "thou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/demo")
    parser.add_argument("--targets", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    evaluator = LLaDAEvalModel(args.model, device="cpu", mc_num=2, batch_size=2, greedy_check="one_pass")
    model, tokenizer = evaluator.model, evaluator.tokenizer
    rng = random.Random(args.seed)
    pairs = []
    for _ in range(args.targets):
        context = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 10))))
        length = rng.randrange(2, 7)
        decoded = generate(model, torch.tensor([context]), steps=length, gen_length=length, block_length=length)
        pairs.append((context, decoded[0, len(context):].tolist()))
    official = suffix_greedy(model, pairs)
    one_pass = evaluator._greedy(pairs)
    report = {"model": args.model, "seed": args.seed, "targets": len(pairs), "official_greedy": sum(official),
              "one_pass_greedy": sum(one_pass), "disagree": sum(a != b for a, b in zip(official, one_pass))}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
