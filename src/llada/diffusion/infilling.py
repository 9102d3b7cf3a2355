"""Infilling: fill [MASK] positions anywhere in a sequence, conditioned on the text on both sides.

A masked diffusion model is trained to predict any masked position from everything unmasked, so the
gap need not be at the end: the reverse process runs on the masked positions where they are. This is
what a left-to-right model cannot do without rearranging its input (it never sees the suffix while
writing the gap). The schedule is the reference sampler's with one block spanning every gap: each step
predicts all masked positions and commits the ``k`` most confident (or ``k`` random) of them.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from llada.diffusion.sampling import REMASKING_CHOICES, Remasking, add_gumbel_noise, num_transfer_tokens
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

# A gap in infilling text: "[MASK]" is one token, "[MASK*N]" is N tokens.
GAP = re.compile(r"\[MASK(?:\*(\d+))?\]")


@torch.no_grad()
def infill(model: LLaDAModel, ids: torch.Tensor, steps: int | None = None, temperature: float = 0.0,
           remasking: Remasking = "low_confidence", mask_id: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace every ``mask_id`` in ``ids`` (a (L,) or (B, L) tensor) with the model's tokens.

    Args:
        steps: denoising steps (default: one per masked position; at most the fewest masks of a row).
        temperature: 0 for greedy, else Gumbel-max sampling (float64, as the reference sampler).
        remasking: ``low_confidence`` commits the most confident predictions first, ``random`` random ones.
        mask_id: the [MASK] id; None takes the model config's.
    The model is never allowed to propose [MASK] itself, so every gap ends up filled.
    """
    if remasking not in REMASKING_CHOICES:
        raise ValueError(f"unknown remasking {remasking!r}; choose one of {REMASKING_CHOICES}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    x = (ids[None, :] if ids.dim() == 1 else ids).to(model.device).clone()
    gaps = x == mask_id
    counts = gaps.sum(dim=1)
    if int(counts.min()) == 0:
        raise ValueError("every row needs at least one [MASK] position to fill")
    steps = int(counts.min()) if steps is None else steps
    if not 1 <= steps <= int(counts.min()):
        raise ValueError(f"steps must be between 1 and the number of masked positions ({int(counts.min())}), "
                         f"got {steps}")
    schedule = num_transfer_tokens(gaps, steps)  # (B, steps)
    for step in range(steps):
        masked = x == mask_id
        logits = model(x).logits
        logits[..., mask_id] = -torch.inf
        prediction = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
        if remasking == "low_confidence":
            score = torch.gather(F.softmax(logits.float(), dim=-1), -1, prediction[..., None]).squeeze(-1)
        else:
            score = torch.rand(prediction.shape, device=x.device, generator=generator)
        score = torch.where(masked, score, -torch.inf)
        for row in range(x.shape[0]):
            chosen = torch.topk(score[row], k=int(schedule[row, step])).indices
            x[row, chosen] = prediction[row, chosen]
    return x if ids.dim() == 2 else x[0]


def encode_with_gaps(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with each ``[MASK]`` / ``[MASK*N]`` replaced by 1 / N mask ids.

    The pieces between gaps are tokenized separately (a gap is a token boundary); the first piece as a
    plain prompt is, the others without special tokens. Raises ValueError for text without a gap.
    """
    pieces = _split_gaps(text)
    return tokenizer.encode(pieces[0], split_special_tokens=True) + _gaps_and_text(tokenizer, pieces)


def encode_answer_with_gaps(tokenizer: Tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Ids of a chat exchange whose assistant ``answer`` has gaps, and where the answer starts.

    The question is rendered with the chat template as ``llada generate`` renders a prompt; the answer
    is tokenized as SFT tokenizes one (plain text, then the end-of-turn token), so a gap can be
    anywhere in the answer, the answer's end included, and the model sees the whole exchange.
    """
    pieces = _split_gaps(answer)
    prompt = tokenizer.encode_chat([{"role": "user", "content": question}], split_special_tokens=True)
    first = tokenizer.encode(pieces[0], add_special_tokens=False, split_special_tokens=True) if pieces[0] else []
    end = [tokenizer.ids.eot if tokenizer.ids.eot is not None else tokenizer.ids.eos]
    return prompt + first + _gaps_and_text(tokenizer, pieces) + end, len(prompt)


def infill_text(model: LLaDAModel, tokenizer: Tokenizer, text: str, question: str | None = None,
                **options) -> str:
    """``text`` with its ``[MASK]`` / ``[MASK*N]`` gaps filled (``options`` go to ``infill``). With
    ``question``, ``text`` is the assistant's answer to it (``encode_answer_with_gaps``) and only the
    filled answer is returned; otherwise ``text`` is raw text (``encode_with_gaps``)."""
    if question is None:
        ids, start = encode_with_gaps(tokenizer, text), 0
    else:
        ids, start = encode_answer_with_gaps(tokenizer, question, text)
    filled = infill(model, torch.tensor(ids), **options)
    return tokenizer.decode(filled[start:].tolist(), skip_special_tokens=True)


def _split_gaps(text: str) -> list[str]:
    """``text`` split at its gaps: text, count, text, count, ..., text (count None for ``[MASK]``)."""
    pieces = GAP.split(text)
    if len(pieces) == 1:
        raise ValueError("the text has no gap to fill: mark one with [MASK] (one token) or [MASK*N] (N tokens)")
    return pieces


def _gaps_and_text(tokenizer: Tokenizer, pieces: list[str]) -> list[int]:
    """The ids after the first piece: each gap's mask ids, then the text up to the next gap."""
    ids: list[int] = []
    for count, piece in zip(pieces[1::2], pieces[2::2]):
        size = 1 if count is None else int(count)
        if size < 1:
            raise ValueError("a gap needs at least one token: [MASK*0] is empty")
        ids += [tokenizer.ids.mask] * size
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
    return ids
