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
    monkeypatch.setattr(scaling, "HELD_OUT_PER_MILLE", 300)  # enough held-out pieces in a small corpus
    sources = {"prose": {f"book{i}": paragraphs(i, 40) for i in range(6)},
               "code": {"a.py": paragraphs(99, 40), "copy_of_a.py": paragraphs(99, 40)}}
    train, test = scaling.split_documents(sources, 400)
    assert train and test
    train_texts = {d["text"] for d in train}
    assert train_texts.isdisjoint(d["text"] for d in test)
    texts = [d["text"] for d in train + test]
    assert len(texts) == len(set(texts))  # copy_of_a.py added nothing
    # The split depends on a document's text alone: the same piece is held out wherever it comes from.
    assert all(scaling.held_out(d["text"]) for d in test) and not any(scaling.held_out(t) for t in train_texts)


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
