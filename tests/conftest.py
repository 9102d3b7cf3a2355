"""Shared fixtures: tiny models, a trained tokenizer and checkpoint directories, all built on the fly."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (llada.model.block_attention) run in Triton's interpreter where there is no GPU
    # (tests/model/test_block_attention.py). It must be on before Triton is first imported, which PyTorch
    # modules that llada loads do.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llada.model.config import preset
from llada.model.tokenizer import Tokenizer, train_tokenizer
from llada.model.transformer import LLaDAModel

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Masked diffusion models predict every masked token at once, then commit the most confident ones.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12; 3 + 4 = 7; 12 * 12 = 144.",
    "Unicode survives: café, naïve, Ωμέγα, 日本語, emoji 🙂.",
]


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(tmp_path_factory: pytest.TempPathFactory):
    """Compiled engines in tests keep their compile cache in a temporary directory, not the user's."""
    saved = os.environ.get("LLADA_CACHE_DIR")
    os.environ["LLADA_CACHE_DIR"] = str(tmp_path_factory.mktemp("llada-cache"))
    yield
    if saved is None:
        os.environ.pop("LLADA_CACHE_DIR", None)
    else:
        os.environ["LLADA_CACHE_DIR"] = saved


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> LLaDAModel:
    """A random tiny model; float64 by default so that exact-equality tests are not at the mercy of ties."""
    torch.manual_seed(seed)
    return LLaDAModel(preset("tiny", **overrides)).to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=320, min_frequency=1)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A tiny checkpoint in the official layout, with the session tokenizer."""
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    ids = tokenizer.ids
    model = tiny_model(torch.float32, vocab_size=tokenizer.vocab_size, embedding_size=tokenizer.vocab_size,
                       mask_token_id=ids.mask, eos_token_id=ids.eos, pad_token_id=ids.pad, eot_token_id=ids.eot)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def exact_elbo(model: LLaDAModel, prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """The ELBO by enumeration: E_{l ~ U{1..T}} E_{S: |S| = l} [(T / l) Σ_{i∈S} log p(a_i | prompt, answer
    with S masked)], over every subset S of the T answer positions (for tiny answers)."""
    length = answer.numel()
    total = 0.0
    for size in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), size))
        for subset in subsets:
            noisy = answer.clone()
            noisy[list(subset)] = model.config.mask_token_id
            log_probs = model(torch.cat([prompt, noisy])[None]).logits[0, prompt.numel():].log_softmax(-1)
            value = sum(log_probs[i, answer[i]].item() for i in subset)
            total += (length / size) * value / len(subsets) / length
    return total
