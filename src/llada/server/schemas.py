"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions``, checked field by field.

A body becomes a ``Job``: prompt ids, ``GenerationSettings`` and how to answer. Every problem is an
``APIError`` naming the field, so a client learns what to fix: wrong JSON types, values out of range,
unknown fields, OpenAI options this server cannot honour (``n`` > 1, ``top_p`` < 1, ``tools``, ...:
accepted only at the values that ask for nothing), prompts or answers beyond the server's limits.
Parsing is by hand rather than through pydantic models so that the error bodies are OpenAI's, and an
unknown key is an error rather than silently dropped.

Prompts are bounded before they are tokenized: at most ``MAX_CHARS_PER_TOKEN`` characters per token
of ``max_prompt_tokens`` (real text averages about 4), so a huge prompt costs no tokenizer time.

``max_tokens`` becomes the answer canvas ``gen_length``, rounded up to a multiple of
``block_length`` (the engine decodes whole blocks); the answer is cut to ``max_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from llada.engine.decoding import POLICIES
from llada.engine.options import setting_types
from llada.engine.settings import GenerationSettings
from llada.model.tokenizer import Message, Tokenizer, TokenizerError
from llada.server.config import ServerConfig
from llada.server.errors import APIError, model_not_found

Kind = Literal["chat", "completion"]


def _one_of(*values: Any) -> Callable[[Any], bool]:
    """Equal to one of ``values``, with booleans and numbers kept apart (``0 != False`` here)."""
    return lambda value: any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


# OpenAI fields common clients send that this server cannot honour: accepted (like null) only at the
# values that ask for nothing, since anything else would be silently wrong. name -> (accepts, which values).
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_one_of(1), "1"),
    "top_p": (_one_of(1), "1"),
    "presence_penalty": (_one_of(0), "0"),
    "frequency_penalty": (_one_of(0), "0"),
    "logit_bias": (_one_of({}), "{}"),
    "logprobs": (_one_of(False), "false"),
}
_NEUTRAL_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "top_logprobs": (_one_of(0), "0"),
    "response_format": (_one_of({"type": "text"}), '{"type": "text"}'),
    "tools": (_one_of([]), "[]"),
    "tool_choice": (_one_of("none"), '"none"'),
    "parallel_tool_calls": (_one_of(True, False), "true or false (there are no tools)"),
    "store": (_one_of(False), "false (nothing is stored)"),
    "metadata": (_string_map, "an object of strings (it is not used)"),
    "service_tier": (_one_of("auto", "default"), '"auto" or "default"'),
}
_NEUTRAL_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_one_of(1), "1"),
    "echo": (_one_of(False), "false"),
    "suffix": (_one_of(), "null"),
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # -> template role
MAX_STOP = 4  # stop strings per request, as the OpenAI API
MAX_STOP_CHARS = 256  # characters per stop string: each step compares every stop's prefixes with the text's end
MAX_CHARS_PER_TOKEN = 16  # prompts longer than max_prompt_tokens * this are refused before tokenizing
_MAX_TEMPERATURE = 2.0  # as the OpenAI API
# Settings a request may set besides the canvas ones (max_tokens, block_length, steps, policy, factor,
# checked together in _settings), with the bounds of numeric ones. Their types and choices come from
# GenerationSettings itself; a new per-request setting is one line here. The others (keep_prompt,
# reuse_decided, refresh_every, early_stop) are the server's, from its command line.
_REQUEST_SETTINGS: dict[str, tuple[float, float] | None] = {
    "temperature": (0.0, _MAX_TEMPERATURE), "threshold": (0.0, 1.0), "cfg_scale": (0.0, 100.0),
    "remasking": None, "cache": None, "logits_eos_inf": None, "confidence_eos_eot_inf": None}


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
        """The field's value (None when absent: JSON null and a missing field mean the same), now known."""
        return self.rest.pop(name, None)

    def integer(self, name: str, low: int, high: int | None = None, default: int | None = None) -> int | None:
        """An integer in [low, high]; a float such as 8.0 is refused, since the OpenAI API refuses it too."""
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
        """A finite number in [low, high] (or (low, high]); booleans are not numbers here, unlike in Python."""
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
        """A JSON boolean; 0, 1 and "true" are refused rather than guessed at."""
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _type_error(name, "a boolean", value)
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
        """One of ``choices``; the error lists them, so that the client can fix the request."""
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise _type_error(name, "a string", value)
        if value not in choices:
            raise APIError(400, f"{name} must be one of {', '.join(choices)}; got {value!r}", name, "invalid_value")
        return value

    def setting(self, name: str, kind: Any, default: Any, bounds: tuple[float, float] | None) -> Any:
        """A generation setting of type ``kind`` (from ``GenerationSettings``): a JSON boolean, one of a
        Literal's choices, or a number within ``bounds``."""
        if kind is bool:
            return self.boolean(name, default)
        if typing.get_origin(kind) is Literal:
            return self.choice(name, typing.get_args(kind), default)
        if kind is float and bounds is not None:
            return self.number(name, bounds[0], bounds[1], default)
        raise TypeError(f"no request rule for the setting {name} of type {kind!r}")

    def finish(self, kind: Kind) -> None:
        """Check the OpenAI fields accepted at their neutral values, then refuse whatever is left (unknown)."""
        neutral = {**_NEUTRAL, **(_NEUTRAL_CHAT if kind == "chat" else _NEUTRAL_COMPLETION)}
        for name, (accepts, values) in neutral.items():
            value = self.take(name)
            if value is not None and not accepts(value):
                raise APIError(400, f"{name}={json.dumps(value)[:100]} is not supported by this server (only "
                               f"{values})", name, "unsupported_value")
        if self.rest:
            name = min(self.rest)
            raise APIError(400, f"unrecognized request argument: {name}", name, "unknown_parameter")


def _type_error(name: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"{name} must be {expected}, got {type(value).__name__} {value!r}"[:300], name,
                    "invalid_type")


def parse_job(kind: Kind, body: Any, tokenizer: Tokenizer, config: ServerConfig, max_sequence_length: int) -> Job:
    """Check a chat or completion body and build its ``Job``; tokenizing comes last, after every cheap check.

    Message contents and prompt strings are tokenized with special-token strings as plain text, so a
    client cannot write ``<|eot_id|>`` or the mask token into the prompt as the real token. Tokenizing
    can take a while on a long prompt: call this off the event loop.

    Raises:
        APIError: 400 naming the field at fault; 404 for another model's name.
    """
    fields = _Fields(body)
    model = fields.take("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model is not None and model != config.model_name:
        raise model_not_found(model, config.model_name)
    max_chars = config.max_prompt_tokens * MAX_CHARS_PER_TOKEN
    prompt = _chat_messages(fields, max_chars) if kind == "chat" else _completion_prompt(fields, max_chars)
    stream = fields.boolean("stream")
    include_usage = _include_usage(fields.take("stream_options"), stream)
    denoising = fields.boolean("denoising")
    if denoising and not stream:
        raise APIError(400, "denoising=true streams every step: it needs stream=true", "denoising", "invalid_value")
    settings, max_tokens = _settings(fields, kind, config)
    stop = _stop(fields.take("stop"))
    seed = fields.integer("seed", -2**63, 2**64 - 1)
    user = fields.take("user")
    if user is not None and not isinstance(user, str):
        raise _type_error("user", "a string", user)
    fields.finish(kind)
    ids, prompt_field = _tokenize(prompt, tokenizer), "messages" if kind == "chat" else "prompt"
    if not ids:
        raise APIError(400, f"the {prompt_field} tokenize to nothing; the model needs at least one prompt token",
                       prompt_field, "invalid_value")
    if len(ids) > config.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                       f"{config.max_prompt_tokens}", prompt_field, "context_length_exceeded")
    if len(ids) + settings.gen_length > max_sequence_length:
        raise APIError(400, f"the prompt ({len(ids)} tokens) and the answer canvas ({settings.gen_length} "
                       f"tokens) exceed the model's context of {max_sequence_length} tokens; shorten the prompt or "
                       f"lower max_tokens", prompt_field, "context_length_exceeded")
    return Job(kind=kind, prompt=ids, settings=settings, max_tokens=max_tokens, stop=stop, stream=stream,
               include_usage=include_usage, denoising=denoising, seed=seed)


def _include_usage(options: Any, stream: bool) -> bool:
    """``stream_options.include_usage``: whether a stream ends with a usage chunk."""
    if options is None:
        return False
    if not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options must be an object with only 'include_usage'", "stream_options",
                       "invalid_value")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _type_error("stream_options.include_usage", "a boolean", include_usage)
    return bool(include_usage)


def _too_long(field: str, chars: int, max_chars: int) -> APIError:
    return APIError(400, f"the {field} have {chars} characters; this server accepts at most {max_chars} "
                    f"({MAX_CHARS_PER_TOKEN} per token of its {max_chars // MAX_CHARS_PER_TOKEN}-token prompt limit)",
                    field, "context_length_exceeded")


def _chat_messages(fields: _Fields, max_chars: int) -> list[Message]:
    """The messages as {role, content} strings for the chat template (``developer`` is ``system`` there)."""
    messages = fields.take("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {role, content} objects", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    plain, chars = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _type_error(where, "an object", message)
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise APIError(400, f"{where} has unsupported keys: {', '.join(sorted(unknown))}", where,
                           "unknown_parameter")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}", f"{where}.role",
                           "invalid_value")
        content = _text_content(message.get("content"), f"{where}.content")
        chars += len(content)
        if chars > max_chars:
            raise _too_long("messages", chars, max_chars)
        plain.append({"role": _ROLES[role], "content": content})
    return plain


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or an array of text parts (this model reads text only)", where,
                   "invalid_type")


def _completion_prompt(fields: _Fields, max_chars: int) -> str | list[int]:
    """A string, or token ids; a one-element array of either is the same (more prompts: one request each)."""
    prompt = fields.take("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if len(prompt) > max_chars:
            raise _too_long("prompt", len(prompt), max_chars)
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise APIError(400, "one prompt per request: send the prompts as separate (concurrent) requests", "prompt",
                       "unsupported_value")
    raise APIError(400, "prompt must be a string or an array of token ids", "prompt",
                   "missing_required_parameter" if prompt is None else "invalid_type")


def _tokenize(prompt: list[Message] | str | list[int], tokenizer: Tokenizer) -> list[int]:
    """Prompt ids: chat messages through the template, a string as text, token ids as they are (checked)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, split_special_tokens=True)
    if prompt and isinstance(prompt[0], int):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt", "invalid_value")
        return prompt
    try:
        return tokenizer.encode_chat(prompt, split_special_tokens=True)
    except TokenizerError as error:
        raise APIError(400, str(error), "messages", "invalid_value") from error


def _settings(fields: _Fields, kind: Kind, config: ServerConfig) -> tuple[GenerationSettings, int]:
    """The request's decoding settings over the server's defaults, and its max_tokens."""
    base = config.settings
    max_tokens = fields.integer("max_tokens", 1, config.max_gen_length)
    if kind == "chat":  # the newer name; clients may send both, which must then agree
        newer = fields.integer("max_completion_tokens", 1, config.max_gen_length)
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise APIError(400, f"max_tokens ({max_tokens}) and max_completion_tokens ({newer}) differ; send one of "
                           f"them", "max_tokens", "invalid_value")
        max_tokens = newer if max_tokens is None else max_tokens
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
    types = setting_types()
    settings = dataclasses.replace(
        base, gen_length=gen_length, block_length=block_length, policy=policy, steps=steps,
        # beyond block_length + 1 every confidence passes the factor rule: the whole block at once
        factor=fields.number("factor", 0.0, block_length + 1.0, base.factor, low_open=True),
        **{name: fields.setting(name, types[name], getattr(base, name), bounds)
           for name, bounds in _REQUEST_SETTINGS.items()})
    # The server's keep_prompt and reuse_decided refine the cached modes (reuse_decided the dual cache
    # only); a request for another mode drops them.
    settings = dataclasses.replace(settings, keep_prompt=settings.keep_prompt and not settings.cache_behaviour.exact,
                                   reuse_decided=settings.reuse_decided and settings.cache_behaviour.sparse)
    return settings, max_tokens


def _stop(stop: Any) -> list[str]:
    """Up to ``MAX_STOP`` non-empty strings of at most ``MAX_STOP_CHARS`` characters each."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", stop)
    if len(stops) > MAX_STOP or not all(stops):
        raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings", "stop", "invalid_value")
    if max(len(s) for s in stops) > MAX_STOP_CHARS:
        raise APIError(400, f"each stop string may have at most {MAX_STOP_CHARS} characters, got one of "
                       f"{max(len(s) for s in stops)}", "stop", "invalid_value")
    return stops
