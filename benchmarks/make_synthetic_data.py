"""A throwaway tokenizer and a packed dataset of synthetic token ids, for throughput and parity runs.

Ids follow a Zipf law over the official 126,464-token vocabulary, so the loss has something to learn
(the unigram distribution) and curves can be compared, while no text corpus is needed.

    python benchmarks/make_synthetic_data.py OUT_DIR --tokens 2000000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llada.model.tokenizer import train_tokenizer
from llada.training.packing import FORMAT, INDEX_FILE

VOCAB = 126464


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent (> 1)")
    args = parser.parse_args()
    tokenizer = train_tokenizer(["a throwaway tokenizer for synthetic training data"] * 4, vocab_size=300)
    tokenizer.save_pretrained(args.out_dir / "tokenizer")
    ranks = np.random.default_rng(0).zipf(args.zipf, size=args.tokens)
    ids = ((ranks - 1) % (VOCAB - 1024)).astype(np.uint32) + 512  # clear of the tokenizer's own ids
    data = args.out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    ids.tofile(data / "shard-0.bin")
    index = {"format": FORMAT, "version": 1, "dtype": "uint32", "vocab_size": VOCAB, "eos_id": tokenizer.ids.eos,
             "tokens": len(ids), "documents": 1, "shards": [{"file": "shard-0.bin", "tokens": len(ids), "documents": 1}]}
    (data / INDEX_FILE).write_text(json.dumps(index))
    print(f"{len(ids):,} tokens -> {data}; tokenizer -> {args.out_dir / 'tokenizer'}")


if __name__ == "__main__":
    main()
