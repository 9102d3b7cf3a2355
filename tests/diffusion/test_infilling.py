"""Infilling: gaps anywhere in the sequence, filled from both sides; the reference sampler's schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llada.diffusion.infilling import encode_answer_with_gaps, encode_with_gaps, infill
from llada.diffusion.sampling import generate
from llada.model.tokenizer import Tokenizer

MASK = 511


def test_a_single_gap_takes_the_argmax_at_its_position_given_the_suffix() -> None:
    """One masked token in the middle: the fill is the argmax of the model's prediction there, and the
    prediction reads the suffix (changing the suffix changes the logits at the gap)."""
    model = tiny_model()
    ids = torch.tensor([3, 17, 42, MASK, 7, 99, 8])
    with torch.no_grad():
        logits = model(ids[None]).logits[0, 3]
        other_suffix = model(torch.tensor([[3, 17, 42, MASK, 250, 12, 300]])).logits[0, 3]
    logits[MASK] = -torch.inf
    filled = infill(model, ids)
    assert filled.tolist() == [3, 17, 42, int(logits.argmax()), 7, 99, 8]
    assert not torch.allclose(logits[:MASK], other_suffix[:MASK])


def test_a_gap_at_the_end_is_the_reference_sampler_with_one_block() -> None:
    """With every mask after the prompt, infilling is exactly the official algorithm (one block)."""
    model = tiny_model(seed=3)
    prompt = torch.tensor([[5, 9, 33, 70], [8, 1, 2, 64]])
    for steps in (8, 4, 2):
        reference = generate(model, prompt, steps=steps, gen_length=8, block_length=8)
        assert not (reference == MASK).any()  # the reference may commit [MASK]; infill never does
        gapped = torch.cat([prompt, torch.full((2, 8), MASK)], dim=1)
        assert torch.equal(infill(model, gapped, steps=steps), reference)


def test_every_gap_is_filled_and_the_rest_is_kept() -> None:
    model = tiny_model()
    ids = torch.tensor([MASK, 4, MASK, MASK, 9, MASK])
    generator = torch.Generator().manual_seed(0)
    for options in ({}, {"temperature": 1.0, "generator": generator}, {"remasking": "random", "generator": generator}):
        filled = infill(model, ids, **options)
        assert not (filled == MASK).any() and filled[[1, 4]].tolist() == [4, 9]


def test_bad_calls_are_named() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one"):
        infill(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="between 1 and the number of masked positions \\(2\\)"):
        infill(model, torch.tensor([1, MASK, MASK]), steps=3)
    with pytest.raises(ValueError, match="unknown remasking"):
        infill(model, torch.tensor([1, MASK]), remasking="nope")


def test_gaps_in_text_become_mask_ids(tokenizer: Tokenizer) -> None:
    mask = tokenizer.ids.mask
    ids = encode_with_gaps(tokenizer, "the cat [MASK] on [MASK*3] mat")
    assert ids.count(mask) == 4
    first = ids.index(mask)
    assert ids[:first] == tokenizer.encode("the cat ")
    assert ids[first + 1:first + 1 + len(tokenizer.encode(" on ", add_special_tokens=False))] == \
        tokenizer.encode(" on ", add_special_tokens=False)
    assert ids[-len(tokenizer.encode(" mat", add_special_tokens=False)):] == tokenizer.encode(" mat", add_special_tokens=False)
    with pytest.raises(ValueError, match="no gap"):
        encode_with_gaps(tokenizer, "no gap here")
    with pytest.raises(ValueError, match="at least one token"):
        encode_with_gaps(tokenizer, "a [MASK*0] b")


def test_a_gapped_answer_is_the_sft_encoding_of_the_exchange_with_the_gap_masked(tokenizer: Tokenizer) -> None:
    """Filling the gap with the words it stands for gives exactly the ids SFT trains on for the whole
    exchange (chat template, answer, end of turn), so the model sees a familiar sequence."""
    question, before, middle, after = "Sort these: pear, fig, apple", "apple,", " fig", ", pear"
    size = len(tokenizer.encode(middle, add_special_tokens=False))
    ids, start = encode_answer_with_gaps(tokenizer, question, f"{before}[MASK*{size}]{after}")
    assert ids[:start] == tokenizer.encode_chat([{"role": "user", "content": question}])
    gap = [i for i, token in enumerate(ids) if token == tokenizer.ids.mask]
    assert len(gap) == size and gap == list(range(gap[0], gap[0] + size))
    ids[gap[0]:gap[-1] + 1] = tokenizer.encode(middle, add_special_tokens=False)
    exchange = [{"role": "user", "content": question}, {"role": "assistant", "content": before + middle + after}]
    assert ids == tokenizer.encode_chat(exchange, add_generation_prompt=False)
    with pytest.raises(ValueError, match="no gap"):
        encode_answer_with_gaps(tokenizer, question, "apple, fig, pear")
