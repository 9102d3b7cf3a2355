"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions``, checked field by field.

A body becomes a ``Job``: prompt ids, ``GenerationSettings`` and how to answer. Every problem is an
``APIError`` naming the field, so a client learns what to fix: wrong JSON types, values out of range,
unknown fields, OpenAI options this server cannot honour (``n`` > 1, ``top_p`` < 1, ...), prompts or
answers beyond the server's limits. Parsing is by hand rather than through pydantic models so that
the error bodies are OpenAI's, and an unknown key is an error rather than silently dropped.

``max_tokens`` becomes the answer canvas ``gen_length``, rounded up to a multiple of
``block_length`` (the engine decodes whole blocks); the answer is cut to ``max_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from llada.decoding import POLICIES
from llada.engine import CACHE_MODES, GenerationSettings
from llada.sampling import REMASKING_CHOICES
from llada.server.config import ServerConfig
from llada.server.errors import APIError
from llada.tokenizer import Tokenizer, TokenizerError

Kind = Literal["chat", "completion"]

# OpenAI options accepted only at the value that means "off" (anything else would be silently wrong).
_NEUTRAL = {"n": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "best_of": 1,
            "echo": False}
_IGNORED = ("user",)  # accepted and not used
_ROLES = ("system", "user", "assistant")
_MAX_STOP = 4  # as the OpenAI API
_MAX_TEMPERATURE = 2.0  # as the OpenAI API


@dataclass
class Job:
    """One checked completion request."""

    kind: Kind
    prompt: list[int]
    settings: GenerationSettings  # gen_length = max_tokens rounded up to a multiple of block_length
    max_tokens: int  # answer tokens returned at most
    stop: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage (non-streaming answers always carry usage)
    denoising: bool  # one chunk per step with the whole canvas (needs stream)
    seed: int | None


class _Fields:
    """A request body whose fields are taken one by one; what is left at the end is unknown."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_type")
        self.rest = dict(body)

    def take(self, name: str) -> Any:
        return self.rest.pop(name, None)

    def integer(self, name: str, low: int, high: int | None = None, default: int | None = None) -> int | None:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(name, "an integer", value)
        if value < low or (high is not None and value > high):
            raise APIError(400, f"{name} must be between {low} and {high}, got {value}" if high is not None
                           else f"{name} must be >= {low}, got {value}", name, "invalid_value")
        return value

    def number(self, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise _type_error(name, "a number", value)
        if value < low or value > high or (low_open and value == low):
            interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise APIError(400, f"{name} must be in {interval}, got {value}", name, "invalid_value")
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _type_error(name, "a boolean", value)
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise _type_error(name, "a string", value)
        if value not in choices:
            raise APIError(400, f"{name} must be one of {', '.join(choices)}; got {value!r}", name, "invalid_value")
        return value

    def finish(self) -> None:
        for name in _IGNORED:
            value = self.take(name)
            if value is not None and not isinstance(value, str):
                raise _type_error(name, "a string", value)
        for name, neutral in _NEUTRAL.items():
            value = self.take(name)
            if value is not None and (isinstance(value, bool) != isinstance(neutral, bool) or value != neutral):
                raise APIError(400, f"{name}={value!r} is not supported by this server (only {neutral!r})", name,
                               "unsupported_value")
        if self.rest:
            name = min(self.rest)
            raise APIError(400, f"unrecognized request argument: {name}", name, "unknown_parameter")


def _type_error(name: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"{name} must be {expected}, got {type(value).__name__} {value!r}"[:300], name,
                    "invalid_type")


def parse_job(kind: Kind, body: Any, tokenizer: Tokenizer, config: ServerConfig, max_sequence_length: int) -> Job:
    """Check a chat or completion body and build its ``Job``.

    Raises:
        APIError: 400 naming the field at fault; 404 for another model's name.
    """
    fields = _Fields(body)
    model = fields.take("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model is not None and model != config.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                       "model", "model_not_found")
    prompt, prompt_field = (_chat_prompt(fields, tokenizer), "messages") if kind == "chat" else \
        (_completion_prompt(fields, tokenizer), "prompt")
    stream = fields.boolean("stream")
    include_usage = False
    options = fields.take("stream_options")
    if options is not None:
        if not stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "stream_options must be an object with only 'include_usage'", "stream_options",
                           "invalid_value")
        include_usage = options.get("include_usage") is True
    denoising = fields.boolean("denoising")
    if denoising and not stream:
        raise APIError(400, "denoising=true streams every step: it needs stream=true", "denoising", "invalid_value")
    settings, max_tokens = _settings(fields, kind, config)
    stop = _stop(fields.take("stop"))
    seed = fields.integer("seed", -2**63, 2**64 - 1)
    fields.finish()
    if not prompt:
        raise APIError(400, f"the {prompt_field} tokenize to nothing; the model needs at least one prompt token",
                       prompt_field, "invalid_value")
    if len(prompt) > config.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most "
                       f"{config.max_prompt_tokens}", prompt_field, "context_length_exceeded")
    if len(prompt) + settings.gen_length > max_sequence_length:
        raise APIError(400, f"the prompt ({len(prompt)} tokens) and the answer canvas ({settings.gen_length} "
                       f"tokens) exceed the model's context of {max_sequence_length} tokens; shorten the prompt or "
                       f"lower max_tokens", prompt_field, "context_length_exceeded")
    return Job(kind=kind, prompt=prompt, settings=settings, max_tokens=max_tokens, stop=stop, stream=stream,
               include_usage=include_usage, denoising=denoising, seed=seed)


def _chat_prompt(fields: _Fields, tokenizer: Tokenizer) -> list[int]:
    messages = fields.take("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {role, content} objects", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    plain = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _type_error(where, "an object", message)
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise APIError(400, f"{where} has unsupported keys: {', '.join(sorted(unknown))}", where,
                           "unknown_parameter")
        role = message.get("role")
        if role not in _ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}", f"{where}.role",
                           "invalid_value")
        plain.append({"role": role, "content": _text_content(message.get("content"), f"{where}.content")})
    try:
        return tokenizer.encode_chat(plain)
    except TokenizerError as error:
        raise APIError(400, str(error), "messages", "invalid_value") from error


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or an array of text parts (this model reads text only)", where,
                   "invalid_type")


def _completion_prompt(fields: _Fields, tokenizer: Tokenizer) -> list[int]:
    """A string, or token ids; a one-element array of either is the same (more prompts: one request each)."""
    prompt = fields.take("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt", "invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise APIError(400, "one prompt per request: send the prompts as separate (concurrent) requests", "prompt",
                       "unsupported_value")
    raise APIError(400, "prompt must be a string or an array of token ids", "prompt",
                   "missing_required_parameter" if prompt is None else "invalid_type")


def _settings(fields: _Fields, kind: Kind, config: ServerConfig) -> tuple[GenerationSettings, int]:
    """The request's decoding settings over the server's defaults, and its max_tokens."""
    base = config.settings
    max_tokens = None
    if kind == "chat":
        max_tokens = fields.integer("max_completion_tokens", 1, config.max_gen_length)
    max_tokens = fields.integer("max_tokens", 1, config.max_gen_length) if max_tokens is None else max_tokens
    max_tokens = base.gen_length if max_tokens is None else max_tokens
    block_length = fields.integer("block_length", 1, config.max_gen_length, base.block_length)
    gen_length = -(-max_tokens // block_length) * block_length
    if gen_length > config.max_gen_length:
        raise APIError(400, f"max_tokens {max_tokens} rounded up to a multiple of block_length ({block_length}) is "
                       f"{gen_length}, above this server's limit of {config.max_gen_length}", "max_tokens",
                       "invalid_value")
    steps = fields.integer("steps", 1, config.max_steps)
    policy = fields.choice("policy", POLICIES, None) or ("fixed" if steps is not None else base.policy)
    steps = base.steps if steps is None else steps
    if policy == "fixed":
        blocks, total = gen_length // block_length, gen_length if steps is None else steps
        if not blocks <= total <= gen_length or total % blocks:
            raise APIError(400, f"steps must be a multiple of the number of blocks ({blocks}) between {blocks} and "
                           f"the canvas length {gen_length} (max_tokens rounded up to block_length), got {total}",
                           "steps", "invalid_value")
    settings = dataclasses.replace(
        base, gen_length=gen_length, block_length=block_length, policy=policy, steps=steps,
        temperature=fields.number("temperature", 0.0, _MAX_TEMPERATURE, base.temperature),
        threshold=fields.number("threshold", 0.0, 1.0, base.threshold),
        # beyond block_length + 1 every confidence passes the factor rule: the whole block at once
        factor=fields.number("factor", 0.0, block_length + 1.0, base.factor, low_open=True),
        cfg_scale=fields.number("cfg_scale", 0.0, 100.0, base.cfg_scale),
        remasking=fields.choice("remasking", REMASKING_CHOICES, base.remasking),
        cache=fields.choice("cache", CACHE_MODES, base.cache))
    return settings, max_tokens


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", stop)
    if len(stops) > _MAX_STOP or not all(stops):
        raise APIError(400, f"stop takes at most {_MAX_STOP} non-empty strings", "stop", "invalid_value")
    return stops
