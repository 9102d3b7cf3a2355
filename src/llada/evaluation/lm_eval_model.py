"""The ``llada`` model for lm-evaluation-harness, faithful to the official wrapper (``eval_llada.py``).

Importing this module registers the model under the name ``llada``; ``llada eval`` (or
``python -m llada.evaluation.lm_eval_model``) imports it and runs lm-eval's command line with the shipped
offline tasks (``tasks/``) on the include path next to any of the user's own (which win on a
clash of names), so that

    llada eval --model llada --model_args pretrained=CKPT,mc_num=128,cfg=0.5 --tasks arc_challenge --batch_size 8

runs as the official ``accelerate launch eval_llada.py --model llada_dist ...`` does. What follows the
official wrapper, and where it knowingly differs:

- ``loglikelihood``: the Monte-Carlo ELBO with ``mc_num`` samples, ``batch_size`` of them per forward
  pass (lm-eval's ``--batch_size``, as officially: it must divide ``mc_num``; a multiple of ``mc_num``
  above it packs several requests into one pass), unsupervised guidance ``cfg``; the continuation is
  tokenized as the official ``_encode_pair`` does (context and context + continuation, split at the
  context's length). One-token continuations are scored exactly in one pass (the official estimator
  returns the same value from ``mc_num`` identical samples). A context too long for ``max_length`` is
  cut from the left (the official code stops with an assertion).
- ``is_greedy``: the official ``suffix_greedy_prediction`` (one token at a time, most confident
  first), computed only with ``is_check_greedy`` (default True, as officially; False reports False,
  much faster). ``greedy_check=one_pass`` instead asks whether one parallel argmax pass predicts the
  whole continuation: an approximation, cheaper, not the official definition.
- ``generate_until``: the official sampler by default (``sampler=reference``: a full forward pass per
  step, ``gen_length``, ``steps``, ``block_length`` as model args with the official defaults of 1024
  each, ``remasking``, ``cfg``); the answer is decoded with special tokens, cut at the task's stop
  sequences, and cleaned of special tokens, as officially. ``sampler=engine`` uses the fast engine
  with the same settings. Every ``GenerationSettings`` field is a model arg under its own name
  (``llada.engine.options``). ``gen_batch_size`` prompts are decoded together (default 1 with
  the reference sampler, as officially; 16 with the engine).
- Unknown model args are an error that names them and lists the valid ones.
- Data parallel: started by ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1), each process
  takes every N-th request of each kind, and all results are gathered back in order; only the first
  process reports. Every request's randomness comes from its own generator, seeded from ``seed``
  and the request's task, document and index, so the results do not depend on the number of
  processes or on which requests share a pass.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from llada.diffusion.likelihood import log_likelihood, packed_elbo_samples, padded_logits, suffix_greedy
from llada.engine.generation import Decoder, batch_answers
from llada.engine.options import convert, setting_names, settings_from_options
from llada.model.loading import load
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel

# eval_llada.py's generation defaults: one block of 1024 tokens, decoded in 1024 steps.
OFFICIAL_GENERATION = {"gen_length": 1024, "block_length": 1024, "steps": 1024, "policy": "fixed"}
MODEL_ARGS = ("pretrained", "model_path", "device", "dtype", "max_length", "mask_id", "batch_size", "max_batch_size",
              "mc_num", "is_check_greedy", "greedy_check", "cfg", "sampler", "gen_batch_size", "seed", "compile",
              "deterministic")
_GREEDY_CHECKS = ("suffix", "one_pass")
_SAMPLERS = ("reference", "engine")
_DEFAULT_AUTO_BATCH = 32


def _int(name: str, value: Any) -> int:
    return convert(f"model arg {name}", value, int)


def _request_seed(seed: int, request: Any, occurrence: int) -> int:
    """A seed of a request's own: the same whichever process or pass the request lands in."""
    key = f"{seed}/{getattr(request, 'task_name', '')}/{getattr(request, 'doc_id', '')}/{getattr(request, 'idx', '')}"
    return int.from_bytes(hashlib.sha256(f"{key}/{occurrence}".encode()).digest()[:8], "little") >> 1


@register_model("llada")
class LLaDAEvalModel(LM):
    """lm-eval model args (official names where the official wrapper has them): pretrained (or the
    official model_path), device, dtype, max_length, mask_id (checked against the checkpoint),
    batch_size (MC samples per forward pass), mc_num, is_check_greedy, greedy_check, cfg, sampler,
    gen_batch_size, seed, compile, deterministic (the engine's batch-invariant mode: generated answers
    that do not depend on gen_batch_size; likelihood scoring is not covered), and every
    GenerationSettings field (gen_length, steps, block_length, remasking, policy, threshold, cache,
    temperature, logits_eos_inf, ...)."""

    def __init__(self, pretrained: str | tuple[LLaDAModel, Tokenizer] | None = None, model_path: str | None = None,
                 device: str | None = None, dtype: str = "auto", max_length: int | None = None,
                 mask_id: int | None = None, batch_size: int | str | None = None, max_batch_size: int | None = None,
                 mc_num: int = 128, is_check_greedy: bool = True, greedy_check: str = "suffix",
                 cfg: float | None = None, sampler: str = "reference", gen_batch_size: int | None = None,
                 seed: int = 0, compile: bool = False, deterministic: bool = False, **settings: Any) -> None:
        super().__init__()
        unknown = sorted(set(settings) - set(setting_names()))
        if unknown:
            raise ValueError(f"unknown llada model arg{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid: "
                             f"{', '.join(MODEL_ARGS)}, and the generation settings {', '.join(setting_names())}")
        self._init_processes()
        self.model, self.tokenizer, self.path = self._load(pretrained, model_path, device, dtype)
        if mask_id is not None and _int("mask_id", mask_id) != self.model.config.mask_token_id:
            raise ValueError(f"mask_id={mask_id} differs from the checkpoint's mask_token_id "
                             f"{self.model.config.mask_token_id}")
        self.mc_num = _int("mc_num", mc_num)
        if self.mc_num < 1:
            raise ValueError(f"mc_num must be >= 1, got {mc_num}")
        self.batch_size = self._samples_per_pass(batch_size, max_batch_size)
        self.max_length = _int("max_length", max_length or self.model.config.max_sequence_length)
        self.is_check_greedy = convert("model arg is_check_greedy", is_check_greedy, bool)
        if greedy_check not in _GREEDY_CHECKS:
            raise ValueError(f"greedy_check must be one of {', '.join(_GREEDY_CHECKS)}, got {greedy_check!r}")
        self.greedy_check = greedy_check
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(_SAMPLERS)}, got {sampler!r}")
        self.sampler = sampler
        if cfg is not None and settings.get("cfg_scale") is not None and float(cfg) != float(settings["cfg_scale"]):
            raise ValueError(f"cfg={cfg} and cfg_scale={settings['cfg_scale']} disagree; give one of them")
        if cfg is not None:
            settings["cfg_scale"] = cfg
        self.settings = settings_from_options({**OFFICIAL_GENERATION, **settings})
        self.cfg_scale = self.settings.cfg_scale
        if sampler == "reference" and self.settings.policy != "fixed":
            raise ValueError(f"sampler=reference decodes a fixed number of tokens per step; policy="
                             f"{self.settings.policy!r} needs sampler=engine")
        default_batch = 1 if sampler == "reference" else 16
        self.gen_batch_size = default_batch if gen_batch_size is None else _int("gen_batch_size", gen_batch_size)
        if self.gen_batch_size < 1:
            raise ValueError(f"gen_batch_size must be >= 1, got {gen_batch_size}")
        self.seed = _int("seed", seed)
        self.engine = Decoder(sampler, compile=convert("model arg compile", compile, bool),
                              deterministic=convert("model arg deterministic", deterministic, bool)).engine(self.model)

    # --- set-up -----------------------------------------------------------------------------------

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LLaDAEvalModel:
        """lm-eval's constructor path, refusing a model arg that is one of lm-eval's own flags (it
        would otherwise fail with "got multiple values for keyword argument")."""
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        for key in set(arg_dict) & set(extra):
            raise ValueError(f"{key} is set by lm-eval's --{key} flag (as with the official wrapper); "
                             f"remove it from --model_args")
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LLaDAEvalModel:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    def _init_processes(self) -> None:
        """Join the process group torchrun/accelerate set up (``WORLD_SIZE`` > 1). lm-eval itself is
        told there is one process (every process builds every request); requests are shared out here."""
        self.dp_rank, self.dp_world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                if backend == "nccl":  # NCCL's collectives run on the current device: one GPU per process
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group(backend=backend)
                atexit.register(dist.destroy_process_group)
            self.dp_rank, self.dp_world = dist.get_rank(), dist.get_world_size()

    def _load(self, pretrained: Any, model_path: str | None, device: str | None,
              dtype: str) -> tuple[LLaDAModel, Tokenizer, str]:
        if pretrained is not None and model_path is not None and str(pretrained) != str(model_path):
            raise ValueError(f"pretrained={pretrained} and model_path={model_path} disagree; give one of them")
        source = pretrained if pretrained is not None else model_path
        if source is None:
            raise ValueError("the llada model needs pretrained=CHECKPOINT_DIR (or the official model_path=)")
        if isinstance(source, tuple):  # an in-memory model, from Python (benchmarks, notebooks, tests)
            model, tokenizer = source
            return model, tokenizer, "in-memory"
        if self.dp_world > 1 and torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            device = "cuda"  # one GPU per process: this process's (LOCAL_RANK), not lm-eval's default cuda:0
        model, tokenizer = load(str(source), device or "auto", dtype)
        return model, tokenizer, str(source)

    def _samples_per_pass(self, batch_size: int | str | None, max_batch_size: int | None) -> int:
        """lm-eval's --batch_size, read as officially: Monte-Carlo samples per forward pass."""
        if batch_size is None or str(batch_size).startswith("auto"):
            cap = _int("max_batch_size", max_batch_size) if max_batch_size else _DEFAULT_AUTO_BATCH
            return max(d for d in range(1, min(cap, self.mc_num) + 1) if self.mc_num % d == 0)
        size = _int("batch_size", batch_size)
        if size < 1 or (size <= self.mc_num and self.mc_num % size) or (size > self.mc_num and size % self.mc_num):
            raise ValueError(f"batch_size={size} (Monte-Carlo samples per forward pass) must divide mc_num={self.mc_num}, "
                             f"or be a multiple of it to score several requests per pass")
        return size

    # --- sharing requests between processes -------------------------------------------------------

    def _shared(self, requests: list, run: Callable[[list, list[int]], list]) -> list:
        """``run(requests, seeds)`` on this process's share (every ``dp_world``-th request), the
        results of all processes gathered back in the requests' order."""
        counts: dict[int, int] = {}
        seeds = []
        for request in requests:  # repeats of one request are the same object: number its occurrences
            counts[id(request)] = counts.get(id(request), -1) + 1
            seeds.append(_request_seed(self.seed, request, counts[id(request)]))
        mine = list(range(self.dp_rank, len(requests), self.dp_world))
        results = run([requests[i] for i in mine], [seeds[i] for i in mine])
        if self.dp_world == 1:
            return results
        import torch.distributed as dist

        gathered: list = [None] * self.dp_world
        dist.all_gather_object(gathered, (mine, results))
        merged: list = [None] * len(requests)
        for indices, values in gathered:
            for index, value in zip(indices, values):
                merged[index] = value
        return merged

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.model.device).manual_seed(seed)

    # --- scoring ----------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the official ``_encode_pair``: trailing context spaces move to the continuation, and the
        continuation's ids are those of context + continuation after the context's ids."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids):]

    def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        if not self.is_check_greedy:
            return [False] * len(pairs)
        if self.greedy_check == "suffix":
            return suffix_greedy(self.model, pairs, cfg_scale=self.cfg_scale)
        mask_id = self.model.config.mask_token_id  # one_pass: every token the argmax of one pass
        predicted = padded_logits(self.model, [context + [mask_id] * len(continuation)
                                               for context, continuation in pairs]).argmax(-1)
        return [predicted[i, predicted.shape[1] - len(continuation):].tolist() == continuation
                for i, (_, continuation) in enumerate(pairs)]

    def _score(self, context: list[int], continuation: list[int], seed: int) -> float:
        device = self.model.device
        return log_likelihood(self.model, torch.tensor(context, device=device),
                              torch.tensor(continuation, device=device), mc_num=self.mc_num,
                              batch_size=min(self.batch_size, self.mc_num), cfg_scale=self.cfg_scale,
                              generator=self._generator(seed)).log_likelihood

    def _score_packed(self, pairs: list[tuple[list[int], list[int]]], seeds: list[int]) -> list[float]:
        """ELBO estimates of requests whose ``mc_num`` samples fit one pass together (equal to
        ``_score``'s up to rounding: same masks from the same per-request generators)."""
        device = self.model.device
        items = [(torch.tensor(context, device=device), torch.tensor(continuation, device=device))
                 for context, continuation in pairs]
        samples = packed_elbo_samples(self.model, items, self.mc_num,
                                      generator=[self._generator(seed) for seed in seeds])
        return [float(values.double().mean()) for values in samples]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._shared(requests, lambda mine, seeds: self._loglikelihood(mine, seeds, disable_tqdm))

    def _loglikelihood(self, requests: list, seeds: list[int], disable_tqdm: bool) -> list[tuple[float, bool]]:
        pairs = []
        for number, request in enumerate(requests):
            context, continuation = self._encode_pair(*request.args)
            if len(continuation) >= self.max_length:
                raise ValueError(f"loglikelihood request {number}: its continuation of {len(continuation)} tokens "
                                 f"leaves no room for context within max_length={self.max_length}")
            pairs.append((context[len(context) - min(len(context), self.max_length - len(continuation)):],
                          continuation))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm or self.dp_rank > 0)
        for index, (_, continuation) in enumerate(pairs):
            if not continuation:
                results[index] = (0.0, True)  # an empty continuation is certain
                bar.update(1)
        # One-token continuations are exact in one forward pass: batch_size requests share each pass.
        singles = [] if self.cfg_scale > 0 else [i for i, (_, c) in enumerate(pairs) if len(c) == 1]
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start:start + self.batch_size]
            for index, value in zip(chunk, self._score_single_tokens([pairs[i] for i in chunk])):
                results[index] = value
            bar.update(len(chunk))
        rest = [i for i, result in enumerate(results) if result is None]
        # Several requests per forward pass when batch_size holds their samples (not with guidance: it
        # needs a second pass); otherwise each request fills its own passes.
        per_pass = self.batch_size // self.mc_num if self.cfg_scale == 0 else 0
        for start in range(0, len(rest), max(1, per_pass)):
            chunk = rest[start:start + max(1, per_pass)]
            chunk_pairs, chunk_seeds = [pairs[i] for i in chunk], [seeds[i] for i in chunk]
            scores = (self._score_packed(chunk_pairs, chunk_seeds) if per_pass >= 1 else
                      [self._score(c, t, seed) for (c, t), seed in zip(chunk_pairs, chunk_seeds)])
            for index, score, greedy in zip(chunk, scores, self._greedy(chunk_pairs)):
                results[index] = (score, greedy)
            bar.update(len(chunk))
        bar.close()
        return results

    @torch.no_grad()
    def _score_single_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """log p(token | context) and whether it is the argmax (which, for one token, is the official
        greedy check too), in one left-padded batch (padding hidden from attention)."""
        logits = padded_logits(self.model, [context + [self.model.config.mask_token_id]
                                            for context, _ in pairs])[:, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([continuation[0] for _, continuation in pairs], device=self.model.device)
        scores = log_probs.gather(1, targets[:, None]).squeeze(1).tolist()
        greedy = (logits.argmax(-1) == targets).tolist() if self.is_check_greedy else [False] * len(pairs)
        return list(zip(scores, greedy))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        return self._shared(requests, lambda mine, seeds: self._rolling(mine, seeds, disable_tqdm))

    def _rolling(self, requests: list, seeds: list[int], disable_tqdm: bool) -> list[float]:
        results = []
        bos = self.tokenizer.encode("")[:1] or [self.tokenizer.ids.eos]
        for request, seed in tqdm(list(zip(requests, seeds)), desc="loglikelihood_rolling",
                                  disable=disable_tqdm or self.dp_rank > 0):
            (text,) = request.args
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=bos[0], max_seq_len=self.max_length, context_len=1))
            results.append(sum(self._score(context, continuation, seed + number)
                               for number, (context, continuation) in enumerate(windows) if continuation))
        return results

    # --- generation -------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        return self._shared(requests, lambda mine, seeds: self._generate(mine, seeds, disable_tqdm))

    def _generate(self, requests: list, seeds: list[int], disable_tqdm: bool) -> list[str]:
        gen_length = self.settings.gen_length
        room = self.max_length - gen_length
        if room < 1:
            raise ValueError(f"gen_length={gen_length} leaves no room for a prompt within max_length="
                             f"{self.max_length}; lower gen_length")
        outputs: list[str] = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.dp_rank > 0)
        for start in range(0, len(requests), self.gen_batch_size):
            chunk = requests[start:start + self.gen_batch_size]
            prompts = []
            for request in chunk:
                ids = self.tokenizer.encode(request.args[0])
                prompts.append(ids[max(0, len(ids) - room):])  # a prompt too long loses its beginning
            # Greedy decoding is the same in any batch; sampling draws from the first request's generator.
            answers = batch_answers(self.model, prompts, self.settings, self.engine, self._generator(seeds[start]))
            for request, answer in zip(chunk, answers):
                until = (request.args[1] or {}).get("until") or []
                outputs.append(self._clean(answer, [until] if isinstance(until, str) else list(until)))
            bar.update(len(chunk))
        bar.close()
        return outputs

    def _clean(self, answer: list[int], stops: list[str]) -> str:
        """As officially: decode with special tokens, cut at each stop sequence, drop special tokens."""
        mask_id = self.model.config.mask_token_id
        text = self.tokenizer.decode([token for token in answer if token != mask_id], skip_special_tokens=False)
        for stop in stops:
            if stop and stop in text:
                text = text.split(stop)[0]
        return self.tokenizer.decode(self.tokenizer.encode(text), skip_special_tokens=True)

    # --- chat templates ---------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line with the ``llada`` model registered and the shipped tasks on the
    include path, before any the user gives (``llada eval ...``)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    args_list = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    cli = HarnessCLI()
    sys.argv = ["lm_eval", *args_list]
    args = cli.parse_args()
    if hasattr(args, "include_path"):
        given = args.include_path
        paths = [] if not given else ([given] if isinstance(given, str) else list(given))
        args.include_path = [str(TASKS_DIR), *paths]  # later folders win: a user's task replaces a shipped one
    cli.execute(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
