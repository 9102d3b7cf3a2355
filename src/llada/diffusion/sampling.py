"""The reference sampler: the paper's reverse process, one full forward pass per denoising step.

Semantics match the official ``generate`` function of LLaDA (token-identical at temperature 0 on the
same checkpoint): the answer starts as all [MASK]; it is decoded in semi-autoregressive blocks of
``block_length``; ``steps`` are split evenly over the blocks; at every step each masked position gets a
prediction and the ``k`` most confident (or ``k`` random) ones are committed.

This is the ground truth that faster engines are tested against, so it favours the official order of
operations over speed. Fast generation (KV caches, parallel decoding, batching) lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llada.model.transformer import LLaDAModel

Remasking = Literal["low_confidence", "random"]
REMASKING_CHOICES: tuple[str, ...] = ("low_confidence", "random")


def add_gumbel_noise(logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Perturb logits so that their argmax is a sample from softmax(logits / temperature).

    Gumbel-max trick written as exp(logits) / (-log u)^temperature, in float64: low-precision Gumbel
    noise measurably hurts generation quality (paper, Appendix B). Temperature 0 returns the logits
    unchanged (greedy).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens to commit at each step of a block: (B, steps), rows summing to the mask count.

    The linear schedule of the paper: count // steps per step, plus one for the first count % steps steps.
    """
    mask_count = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base = mask_count // steps
    remainder = mask_count % steps
    schedule = base.expand(-1, steps).clone()
    schedule += torch.arange(steps, device=mask_index.device)[None, :] < remainder
    return schedule.to(torch.int64)


def validate_schedule(gen_length: int, block_length: int, steps: int) -> int:
    """Check the step/block arithmetic and return the number of blocks; errors say what to change."""
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if block_length > gen_length:
        raise ValueError(f"block_length ({block_length}) exceeds gen_length ({gen_length}); "
                         f"use block_length={gen_length} for a single block")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
                         f"e.g. use block_length={_largest_divisor_at_most(gen_length, block_length)}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"(gen_length / block_length = {num_blocks}); e.g. use steps={max(1, steps // num_blocks) * num_blocks}")
    if steps > gen_length:
        raise ValueError(f"steps ({steps}) cannot exceed gen_length ({gen_length}): each step commits at least one token")
    return num_blocks


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _resolve_token(name: str, given: int | None, model: LLaDAModel) -> int | None:
    return given if given is not None else getattr(model.config, name, None)


@torch.no_grad()
def generate(model: LLaDAModel, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: Remasking = "low_confidence", mask_id: int | None = None, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, eos_id: int | None = None, eot_id: int | None = None,
             generator: torch.Generator | None = None, progress: bool = False,
             on_block: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Sample answers with the reference reverse process.

    Args:
        model: the mask predictor.
        prompt: (B, P) prompt ids, left-padded when lengths differ (or (P,) for one prompt).
        attention_mask: optional (B, P) of 1/0 marking real prompt tokens (0 = left padding).
        steps: denoising steps in total (split evenly over the blocks).
        gen_length: answer length G.
        block_length: semi-autoregressive block size; gen_length (or more) decodes in one block.
        temperature: 0 for greedy; otherwise Gumbel-max sampling at this temperature.
        cfg_scale: unsupervised classifier-free guidance strength (0 = off).
        remasking: ``low_confidence`` commits the most confident predictions, ``random`` random ones.
        mask_id: the [MASK] id; None takes the model config's.
        logits_eos_inf: forbid predicting EOS (its logit set to -inf).
        confidence_eos_eot_inf: give EOS/EoT predictions zero confidence so they are committed last.
        eos_id, eot_id: token ids for the two options above; None takes the model config's.
        generator: randomness for temperature > 0 and random remasking.
        progress: show a progress bar over the steps.
        on_block: called as ``on_block(x, block_index)`` after each block is fully decoded (streaming).
    Returns:
        (B, P + G) prompt followed by the generated answer.
    """
    if remasking not in REMASKING_CHOICES:
        raise ValueError(f"unknown remasking {remasking!r}; choose one of {REMASKING_CHOICES}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    block_length = min(block_length, gen_length)  # a block longer than the answer is the whole answer
    num_blocks = validate_schedule(gen_length, block_length, steps)
    mask_id = _resolve_token("mask_token_id", mask_id, model)
    eos_id = _resolve_token("eos_token_id", eos_id, model)
    eot_id = _resolve_token("eot_token_id", eot_id, model)
    if logits_eos_inf and eos_id is None:
        raise ValueError("logits_eos_inf needs an EOS id: pass eos_id or set config.eos_token_id")
    if confidence_eos_eot_inf and (eos_id is None or eot_id is None):
        raise ValueError("confidence_eos_eot_inf needs EOS and EoT ids: pass eos_id/eot_id (see the tokenizer)")
    if prompt.dim() == 1:
        prompt = prompt[None, :]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (batch, length), got shape {tuple(prompt.shape)}")
    if attention_mask is not None and attention_mask.shape != prompt.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from prompt shape "
                         f"{tuple(prompt.shape)}")

    device = model.device
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt.to(device)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing is padded: the unmasked (flash) path, as the official model does
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device),
                                    torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)], dim=1)
    prompt_index = x != mask_id  # (B, P+G): the prompt (and its padding) for CFG's unconditional input
    steps_per_block = steps // num_blocks

    bar = tqdm(total=steps, desc="denoising", unit="step", disable=not progress, leave=False)
    for block in range(num_blocks):
        block_start = prompt_length + block * block_length
        block_end = block_start + block_length
        schedule = num_transfer_tokens(x[:, block_start:block_end] == mask_id, steps_per_block)  # (B, steps)
        for step in range(steps_per_block):
            mask_index = x == mask_id  # (B, P+G)
            logits = _guided_logits(model, x, attention_mask, prompt_index, cfg_scale, mask_id)  # (B, P+G, V)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # (B, P+G)
            if confidence_eos_eot_inf:
                logits[:, :, eos_id] = -torch.inf
                logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                probabilities = F.softmax(logits, dim=-1)
                x0_p = torch.gather(probabilities, dim=-1, index=x0[..., None]).squeeze(-1)  # (B, P+G)
            else:
                x0_p = torch.rand(x0.shape, device=device, generator=generator)
            x0_p[:, block_end:] = -torch.inf  # later blocks wait their turn
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(batch):
                _, chosen = torch.topk(confidence[row], k=int(schedule[row, step]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
            bar.update(1)
        if on_block is not None:
            on_block(x, block)
    bar.close()
    return x


def _guided_logits(model: LLaDAModel, x: torch.Tensor, attention_mask: torch.Tensor | None,
                   prompt_index: torch.Tensor, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Logits, with unsupervised classifier-free guidance when ``cfg_scale`` > 0.

    The unconditional input is the same sequence with the whole prompt replaced by [MASK];
    guided = un + (cfg_scale + 1)·(cond - un) (paper, Eq. 16).
    """
    if cfg_scale <= 0:
        return model(x, attention_mask=attention_mask).logits
    unconditional = x.clone()
    unconditional[prompt_index] = mask_id
    both = torch.cat([x, unconditional], dim=0)
    both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
    conditional, unconditional_logits = torch.chunk(model(both, attention_mask=both_mask).logits, 2, dim=0)
    return unconditional_logits + (cfg_scale + 1) * (conditional - unconditional_logits)
