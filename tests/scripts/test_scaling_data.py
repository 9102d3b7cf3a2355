"""The scaling corpus: held-out documents never trained on, and continuation-choice items whose right
answer is the text that follows the context and whose choices all have the same length."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import prepare_scaling_data as scaling

from llada.model.tokenizer import Tokenizer


def paragraphs(seed: int, count: int) -> str:
    rng = random.Random(seed)
    words = ["river", "stone", "import", "def", "return", "light", "night", "value", "print", "crown"]
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(count))


def test_chunks_cut_at_blank_lines_and_keep_every_paragraph() -> None:
    text = paragraphs(0, 60)
    pieces = list(scaling.chunks(text, 300))
    assert len(pieces) > 3 and all(len(p) < 300 + 200 for p in pieces)
    assert "\n\n".join(pieces) == text


def test_held_out_documents_are_never_trained_on_and_duplicates_are_dropped(monkeypatch) -> None:
    monkeypatch.setattr(scaling, "HELD_OUT_PER_MILLE", 300)  # enough held-out files in a small corpus
    sources = {"python-doc": {f"page{i}": paragraphs(i, 40) for i in range(12)},
               "code": {"a.py": paragraphs(99, 40), "copy_of_a.py": paragraphs(99, 40)},
               "literature": {"hamlet": paragraphs(7, 200)}}
    train, test = scaling.split_documents(sources, 400)
    assert train and test
    train_texts = {d["text"] for d in train}
    assert train_texts.isdisjoint(d["text"] for d in test)
    texts = [d["text"] for d in train + test]
    assert len(texts) == len(set(texts))  # copy_of_a.py added nothing
    # A file is held out whole (its pieces never on both sides); prose piece by piece.
    side = {}
    for held, documents in ((True, test), (False, train)):
        for d in documents:
            side.setdefault(d["name"].split("#")[0], set()).add(held)
    assert all(len(sides) == 1 for name, sides in side.items() if name != "hamlet")
    assert side["hamlet"] == {True, False}
    assert {d["name"].split("#")[0] for d in test if d["source"] == "python-doc"} == {
        f"page{i}" for i in range(12) if scaling.held_out(f"python-doc/page{i}")}


def test_held_out_documents_copied_from_training_are_dropped() -> None:
    words = paragraphs(3, 60).split()
    train = [{"source": "code", "name": "a#0", "text": " ".join(words)}]
    fresh = {"source": "code", "name": "b#0", "text": paragraphs(4, 60)}
    copy = {"source": "code", "name": "c#0", "text": " ".join(words[:200]) + "\n\n" + paragraphs(5, 10)}
    seen = scaling.training_ngrams(train)
    kept, shares = scaling.decontaminate([fresh, copy], seen, max_overlap=0.2)
    # The copy's share, counted by brute force over its word sequences.
    train_runs = {tuple(words[i:i + scaling.NGRAM]) for i in range(len(words) - scaling.NGRAM + 1)}
    copy_words = copy["text"].split()
    runs = [tuple(copy_words[i:i + scaling.NGRAM]) for i in range(len(copy_words) - scaling.NGRAM + 1)]
    assert shares[1] == sum(run in train_runs for run in runs) / len(runs) > 0.5
    assert shares[0] < 0.2 and kept == [fresh]


def test_items_whose_right_continuation_is_in_training_are_replaced(tokenizer: Tokenizer) -> None:
    documents = [{"source": "prose", "name": f"doc{i}", "text": paragraphs(i, 30)} for i in range(8)]
    items = scaling.continuation_items(documents, tokenizer, 20, context=80, continuation=30, seed=0)
    leaked = items[0]
    text = tokenizer.decode(leaked["context"] + leaked["choices"][leaked["label"]])
    seen = scaling.training_ngrams([{"text": "alpha beta " + text + " gamma"}])
    assert scaling.item_seen_in_training(leaked, tokenizer, seen)
    context_only = scaling.training_ngrams([{"text": tokenizer.decode(leaked["context"])}])
    assert not scaling.item_seen_in_training(leaked, tokenizer, context_only)  # the context alone is no leak
    kept = scaling.continuation_items(documents, tokenizer, 20, context=80, continuation=30, seed=0,
                                      keep=lambda item: not scaling.item_seen_in_training(item, tokenizer, seen))
    assert len(kept) == len(items) and all(item["context"] != leaked["context"] for item in kept)


def test_continuation_items_are_the_true_continuation_among_equal_length_choices(tokenizer: Tokenizer) -> None:
    documents = [{"source": "prose" if i % 2 else "code", "name": f"doc{i}", "text": paragraphs(i, 30)}
                 for i in range(16)]
    items = scaling.continuation_items(documents, tokenizer, 40, context=12, continuation=5, seed=0)
    assert len(items) >= 30
    by_name = {d["name"]: tokenizer.encode(d["text"], add_special_tokens=False) for d in documents}
    source_of = {d["name"]: d["source"] for d in documents}
    for item in items:
        ids = by_name[item["document"]]
        window = item["context"] + item["choices"][item["label"]]
        assert any(ids[i:i + len(window)] == window for i in range(0, len(ids) - len(window) + 1, 17))
        assert len(item["context"]) == 12 and all(len(c) == 5 for c in item["choices"])
        assert source_of[item["document"]] == item["source"]
        assert len({tuple(c) for c in item["choices"]}) == 4
    assert {item["source"] for item in items} == {"prose", "code"}


def test_the_unigram_baseline_picks_the_choice_of_most_frequent_tokens(tokenizer: Tokenizer, tmp_path: Path) -> None:
    from llada.training.packing import tokenize_corpus

    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "text.txt").write_text("the the the the the fox " * 50)
    tokenize_corpus([str(tmp_path / "text.txt")], tmp_path / "packed", tmp_path / "tok", workers=1, progress=False)
    the, fox = (tokenizer.encode(word, add_special_tokens=False) for word in (" the", " fox"))
    rare = tokenizer.encode(" zq", add_special_tokens=False)
    common = {"context": [], "choices": [rare, the, fox, rare], "label": 1}
    assert scaling.unigram_accuracy(tmp_path / "packed", [common], tokenizer.vocab_size) == 1.0
    assert scaling.unigram_accuracy(tmp_path / "packed", [{**common, "label": 2}], tokenizer.vocab_size) == 0.0
