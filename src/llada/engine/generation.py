"""One call for "answer these prompt ids" with either sampler, as the command line and server use it.

``sampler="engine"`` (the default) runs ``llada.engine.engine`` with the given ``GenerationSettings``;
``sampler="reference"`` runs the reference sampler (``sampling.generate``, the official algorithm),
which supports the fixed policy with a full forward pass per step only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from llada.diffusion.sampling import generate
from llada.engine.engine import Engine
from llada.engine.settings import GenerationSettings
from llada.model.transformer import LLaDAModel, left_pad

Sampler = Literal["engine", "reference"]
SAMPLERS: tuple[str, ...] = ("engine", "reference")


@dataclass(frozen=True)
class Decoder:
    """Which sampler decodes, and how the engine runs: the choices every generating command
    (``generate``, ``chat``, ``eval humaneval``) takes together, passed as one value.

    ``compile`` and ``deterministic`` are the engine's (``Engine``); the reference sampler has neither.
    """

    sampler: Sampler = "engine"
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")

    def engine(self, model: LLaDAModel) -> Engine | None:
        """An engine for ``model`` with these options; None for the reference sampler."""
        if self.sampler != "engine":
            return None
        return Engine(model, compile=self.compile, deterministic=self.deterministic)


DEFAULT_DECODER = Decoder()
"""The engine with its defaults (frozen, so one shared value serves as every default argument)."""


def reference_settings_error(settings: GenerationSettings) -> str | None:
    """Why the reference sampler cannot run ``settings`` (None if it can)."""
    if settings.policy != "fixed":
        return (f"the reference sampler commits a fixed number of tokens per step: policy {settings.policy!r} "
                "needs the engine (or use policy 'fixed')")
    return None


@torch.no_grad()
def batch_answers(model: LLaDAModel, prompts: list[list[int]], settings: GenerationSettings, engine: Engine | None,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt's whole answer (``gen_length`` ids; after an engine's early stop, its tail is
    end-of-text): from ``engine`` in one batch, or, without one, from the reference sampler with
    the prompts left-padded into one batch, the padding hidden from attention."""
    if engine is not None:
        return [result.answer.tolist() for result in engine.generate(prompts, settings, generator)]
    if (problem := reference_settings_error(settings)) is not None:
        raise ValueError(problem)
    ids, keep = left_pad(prompts, model.config.mask_token_id)
    out = generate(model, ids.to(model.device), attention_mask=keep.to(model.device), steps=settings.total_steps,
                   gen_length=settings.gen_length, block_length=settings.block_length,
                   temperature=settings.temperature, cfg_scale=settings.cfg_scale, remasking=settings.remasking,
                   logits_eos_inf=settings.logits_eos_inf, confidence_eos_eot_inf=settings.confidence_eos_eot_inf,
                   generator=generator)
    return out[:, ids.shape[1]:].tolist()


def answer_ids(model: LLaDAModel, prompt_ids: list[int], settings: GenerationSettings, sampler: Sampler = "engine",
               engine: Engine | None = None, generator: torch.Generator | None = None,
               on_update: Callable[[list[int]], None] | None = None) -> list[int]:
    """The answer's token ids (all ``gen_length`` of them) for one prompt.

    Args:
        on_update: called with the answer so far (undecided positions hold the mask id) after every
            step (engine) or block (reference sampler).
        engine: reuse this engine (it keeps compiled graphs between calls); one is made otherwise.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    prompt = torch.tensor([prompt_ids], device=model.device)
    if sampler == "reference":
        if (problem := reference_settings_error(settings)) is not None:
            raise ValueError(problem)

        def on_block(x: torch.Tensor, block: int) -> None:
            if on_update is not None:
                on_update(x[0, len(prompt_ids):].tolist())

        out = generate(model, prompt, steps=settings.total_steps, gen_length=settings.gen_length,
                       block_length=settings.block_length, temperature=settings.temperature,
                       cfg_scale=settings.cfg_scale, remasking=settings.remasking,
                       logits_eos_inf=settings.logits_eos_inf, confidence_eos_eot_inf=settings.confidence_eos_eot_inf,
                       generator=generator, on_block=on_block)
        return out[0, len(prompt_ids):].tolist()
    engine = engine or Engine(model)
    run = engine.start(prompt, settings, generator)
    if on_update is None:
        while run.advance():
            pass
    else:
        while (update := run.step()) is not None:
            on_update(update.answer[0].tolist())
    return run.results()[0].answer.tolist()
