"""The ``llada`` model for lm-evaluation-harness: ELBO log-likelihoods and engine generation.

Importing this module registers the model under the name ``llada``; ``llada eval`` (or
``python -m llada.lm_eval_model``) imports it and runs lm-eval's command line, so that

    llada eval --model llada --model_args pretrained=CKPT,mc_num=64 --tasks llada_arithmetic_mc

works like ``lm_eval`` with the model available and the shipped offline tasks (``eval_tasks/``:
``llada_arithmetic``, ``llada_word_reversal``, their ``_mc`` variants and ``llada_counting_ppl``)
on the include path. In Python: ``import llada.lm_eval_model`` and then
``lm_eval.simple_evaluate(model="llada", model_args=...)``.

- ``loglikelihood``: the Monte-Carlo ELBO of the continuation given the context (``mc_num``
  samples, ``mc_batch_size`` per forward pass, ``cfg_scale``); one-token continuations are scored
  exactly in one pass, as the paper notes, ``mc_batch_size`` requests per pass. ``is_greedy`` is whether the model, given the context
  with the whole continuation masked, predicts every continuation token as its argmax.
- ``loglikelihood_rolling``: the ELBO of whole documents, in windows of ``max_length`` tokens.
- ``generate_until``: the engine (settings as model args), ``max_gen_toks`` rounded up to whole
  blocks, cut at the first stop sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from llada.cli import load
from llada.engine import Engine, GenerationSettings
from llada.likelihood import log_likelihood, packed_elbo_samples, padded_logits
from llada.model import LLaDAModel
from llada.tokenizer import Tokenizer


@register_model("llada")
class LLaDAEvalModel(LM):
    """lm-eval model args (all optional but ``pretrained``): dtype, mc_num, mc_batch_size (ELBO
    samples per forward pass, default 32), cfg_scale, seed, max_length, and the engine's gen_length,
    block_length, policy, steps, threshold, factor, cache, temperature, compile. lm-eval's own
    ``--device`` and ``--batch_size`` (prompts generated together) arrive as ``device``/``batch_size``."""

    def __init__(self, pretrained: str | tuple[LLaDAModel, Tokenizer], device: str | None = "auto", dtype: str = "auto", mc_num: int = 128,
                 mc_batch_size: int = 32, batch_size: int | str = 16, cfg_scale: float = 0.0, seed: int = 0, max_length: int | None = None,
                 gen_length: int = 256, block_length: int = 32, policy: str = "threshold", steps: int | None = None,
                 threshold: float = 0.9, factor: float = 1.0, cache: str = "dual", temperature: float = 0.0,
                 compile: bool = False, **ignored: Any) -> None:
        super().__init__()
        if isinstance(pretrained, tuple):  # an in-memory model, from Python (benchmarks, notebooks)
            self.model, self.tokenizer = pretrained
            self.path = "in-memory"
        else:
            self.model, self.tokenizer = load(pretrained, device or "auto", dtype)  # the command line's rules
            self.path = str(pretrained)
        self.mc_num, self.mc_batch_size, self.cfg_scale = int(mc_num), int(mc_batch_size), float(cfg_scale)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_sequence_length)
        self.generator = torch.Generator(device=self.model.device).manual_seed(int(seed))
        self.settings = GenerationSettings(gen_length=int(gen_length), block_length=int(block_length), policy=policy,
                                           steps=None if steps is None else int(steps), threshold=float(threshold),
                                           factor=float(factor), cache=cache, temperature=float(temperature),
                                           cfg_scale=self.cfg_scale)
        self.settings.validate()
        self.engine = Engine(self.model, compile=bool(compile) and str(compile).lower() != "false")

    # --- scoring ----------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (with BOS) and continuation ids; trailing context spaces move to the continuation,
        as lm-eval's own models do, so that " answer" is tokenized as the model saw it in training."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.tokenizer.encode(context), self.tokenizer.encode(continuation, add_special_tokens=False)

    @torch.no_grad()
    def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether the model, given each context with its whole continuation masked, predicts every
        continuation token as its argmax; the pairs share one left-padded forward pass."""
        mask_id = self.model.config.mask_token_id
        predicted = padded_logits(self.model, [context + [mask_id] * len(continuation)
                                               for context, continuation in pairs]).argmax(-1)
        return [predicted[i, predicted.shape[1] - len(continuation):].tolist() == continuation
                for i, (_, continuation) in enumerate(pairs)]

    def _score(self, context: list[int], continuation: list[int]) -> float:
        device = self.model.device
        estimate = log_likelihood(self.model, torch.tensor(context, device=device),
                                  torch.tensor(continuation, device=device), mc_num=self.mc_num,
                                  batch_size=min(self.mc_batch_size, self.mc_num), cfg_scale=self.cfg_scale,
                                  generator=self.generator)
        return estimate.log_likelihood

    def _score_packed(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """ELBO estimates of several requests whose ``mc_num`` samples fit one pass together: the
        estimates of ``_score`` one request at a time (same masks; equal up to rounding), in fewer passes."""
        device = self.model.device
        items = [(torch.tensor(context, device=device), torch.tensor(continuation, device=device))
                 for context, continuation in pairs]
        samples = packed_elbo_samples(self.model, items, self.mc_num, generator=self.generator)
        return [float(values.double().mean()) for values in samples]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for number, request in enumerate(requests):
            context, continuation = self._encode_pair(*request.args)
            if len(continuation) >= self.max_length:
                raise ValueError(f"loglikelihood request {number}: its continuation of {len(continuation)} tokens "
                                 f"leaves no room for context within max_length={self.max_length}")
            pairs.append((context[-(self.max_length - max(1, len(continuation))):], continuation))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm)
        # One-token continuations are exact in one forward pass: many requests share each pass.
        singles = [i for i, (_, continuation) in enumerate(pairs) if len(continuation) == 1]
        if self.cfg_scale > 0:
            singles = []  # guidance needs the unconditional pass per request: the general path below
        for start in range(0, len(singles), self.mc_batch_size):
            chunk = singles[start:start + self.mc_batch_size]
            for index, value in zip(chunk, self._score_single_tokens([pairs[i] for i in chunk])):
                results[index] = value
            bar.update(len(chunk))
        for index, (_, continuation) in enumerate(pairs):
            if not continuation:
                results[index] = (0.0, True)  # an empty continuation is certain
                bar.update(1)
        rest = [i for i, result in enumerate(results) if result is None]
        # Several requests per forward pass when their samples fit in one (not with guidance: it needs
        # a second pass); otherwise each request fills its own passes.
        per_pass = self.mc_batch_size // self.mc_num if self.cfg_scale == 0 else 0
        for start in range(0, len(rest), max(1, per_pass)):
            chunk = rest[start:start + max(1, per_pass)]
            chunk_pairs = [pairs[i] for i in chunk]
            scores = (self._score_packed(chunk_pairs) if per_pass >= 1 else
                      [self._score(context, continuation) for context, continuation in chunk_pairs])
            for index, score, greedy in zip(chunk, scores, self._greedy(chunk_pairs)):
                results[index] = (score, greedy)
            bar.update(len(chunk))
        bar.close()
        return results

    @torch.no_grad()
    def _score_single_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """log p(token | context) and whether it is the argmax, for one-token continuations, in one
        left-padded batch (padding hidden from attention)."""
        logits = padded_logits(self.model, [context + [self.model.config.mask_token_id]
                                            for context, _ in pairs])[:, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([continuation[0] for _, continuation in pairs], device=self.model.device)
        scores = log_probs.gather(1, targets[:, None]).squeeze(1).tolist()
        greedy = (logits.argmax(-1) == targets).tolist()
        return list(zip(scores, greedy))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = []
        bos = self.tokenizer.encode("")[:1] or [self.tokenizer.ids.eos]
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=bos[0], max_seq_len=self.max_length, context_len=1))
            results.append(sum(self._score(context, continuation) for context, continuation in windows
                               if continuation))
        return results

    # --- generation -------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str] = [""] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = {}
        for index, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            wanted = int(kwargs.get("max_gen_toks", self.settings.gen_length))
            block = self.settings.block_length
            gen_length = max(block, -(-wanted // block) * block)
            ids = self.tokenizer.encode(context)[-(self.max_length - gen_length):]
            groups.setdefault((gen_length,), []).append((index, ids, until))
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (gen_length,), items in groups.items():
            steps = self.settings.steps
            settings = GenerationSettings(**{**self.settings.__dict__, "gen_length": gen_length,
                                             "steps": None if steps is None else min(steps, gen_length)})
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                results = self.engine.generate([ids for _, ids, _ in chunk], settings, self.generator)
                for (index, _, until), result in zip(chunk, results):
                    text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
                    outputs[index] = _cut(text, until)
                bar.update(len(chunk))
        bar.close()
        return outputs

    # --- chat templates ---------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest stop sequence."""
    cut = min((text.find(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:cut]


TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``llada`` model registered and the shipped tasks included
    (``llada eval ...``)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
