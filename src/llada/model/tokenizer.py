"""Tokenizer files and the chat format, as the Hugging Face ecosystem reads them.

Loads ``tokenizer.json`` with the ``tokenizers`` library and the special tokens and Jinja chat
template from ``tokenizer_config.json`` / ``special_tokens_map.json``, so prompts are tokenized exactly
as the official LLaDA tokenizer does. Also trains small byte-level BPE tokenizers with the special
tokens a LLaDA model needs (for demos and tests). Knows nothing about the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files ``directory`` holds, to copy along with a checkpoint."""
    return [Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]

MASK_TOKEN = "<|mdm_mask|>"
EOT_TOKEN = "<|eot_id|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, HEADER_START, HEADER_END, EOT_TOKEN, MASK_TOKEN)

# The LLaDA-8B-Instruct chat format: each turn is
#   <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT(trimmed)<|eot_id|>
# with the BOS token before the first turn and an open assistant header as the generation prompt.
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

Message = dict[str, str]

# Stands in for a special-token string inside message content while the chat template renders: a
# private-use character (Unicode keeps it out of real text) around the string's number.
_HIDDEN = "\ue000{}\ue001"
_HIDDEN_PATTERN = re.compile("\ue000([0-9]+)\ue001")


class TokenizerError(ValueError):
    """Tokenizer files are missing or lack something a LLaDA model needs."""


def _token_content(value: Any) -> str | None:
    """Special tokens appear as plain strings or as {"content": ...} objects in HF files."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def dialogue_to_pairs(messages: Sequence[Message]) -> list[tuple[list[Message], Message]]:
    """Split a multi-turn dialogue into (history, assistant reply) pairs, one per assistant turn.

    The paper trains on an n-turn dialogue as n single-turn samples whose prompt is everything before
    the reply; this does that split.
    """
    return [(list(messages[:i]), message) for i, message in enumerate(messages) if message.get("role") == "assistant"]


@dataclass
class SpecialIds:
    """Ids of the tokens a LLaDA model needs; None where the tokenizer has no such token."""

    mask: int
    eos: int
    eot: int | None
    bos: int | None
    pad: int | None


class Tokenizer:
    """A LLaDA tokenizer: text <-> ids, special-token ids by name, and the chat template."""

    def __init__(self, backend: FastTokenizer, config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.special_tokens = {key: _token_content(self.config.get(key)) for key in
                               ("bos_token", "eos_token", "pad_token", "mask_token", "eot_token")}
        self.special_tokens["mask_token"] = self.special_tokens["mask_token"] or MASK_TOKEN
        self.special_tokens["eot_token"] = self.special_tokens["eot_token"] or EOT_TOKEN
        self.ids = SpecialIds(mask=self._required_id("mask_token"), eos=self._required_id("eos_token"),
                              eot=self._optional_id("eot_token"), bos=self._optional_id("bos_token"),
                              pad=self._optional_id("pad_token"))
        self.chat_template: str | None = self.config.get("chat_template")

    def _optional_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    def _required_id(self, key: str) -> int:
        token = self.special_tokens.get(key)
        token_id = None if token is None else self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"the tokenizer has no {key.replace('_', ' ')} ({token or 'not configured'}); "
                                 f"a LLaDA tokenizer needs it in tokenizer.json and tokenizer_config.json")
        return token_id

    # --- files -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and its config files from a checkpoint directory."""
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} is missing; a checkpoint directory needs its tokenizer files "
                                 f"({', '.join(TOKENIZER_FILES)})")
        try:
            backend = FastTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the tokenizers library raises a bare Exception on malformed files
            raise TokenizerError(f"{tokenizer_file} could not be read: {error}") from error
        config: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):  # the config file wins on conflicts
            file = directory / name
            if file.is_file():
                try:
                    config.update(json.loads(file.read_text()))
                except json.JSONDecodeError as error:
                    raise TokenizerError(f"{file} is not valid JSON: {error}") from error
        if not config:
            raise TokenizerError(f"{directory} has neither {TOKENIZER_CONFIG_FILE} nor {SPECIAL_TOKENS_FILE}: "
                                 f"the special tokens (EOS, mask) are unknown")
        return cls(backend, config)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        special = {key: value for key, value in self.special_tokens.items()
                   if value is not None and key in ("bos_token", "eos_token", "pad_token")}
        _atomic_write(directory / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        _atomic_write(directory / TOKENIZER_CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False))
        _atomic_write(directory / SPECIAL_TOKENS_FILE, json.dumps(special, indent=2, ensure_ascii=False))

    # --- text ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def vocab_sha256(self) -> str:
        """A fingerprint of what each id means (the token-to-id map): tokenized data records it, so that
        training can refuse data made with another tokenizer even when sizes and EOS ids agree."""
        vocabulary = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            add_special_tokens: apply the tokenizer's post-processor (as HF does; e.g. a leading BOS).
            split_special_tokens: a special token's string in ``text`` (``<|eot_id|>``, the mask token)
                is ordinary text, not that token (as HF's ``split_special_tokens``): for untrusted text.
        """
        backend = self._splitting_backend if split_special_tokens else self.backend
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def _splitting_backend(self) -> FastTokenizer:
        # A copy, so that the flag never changes how the shared backend encodes (threads use both at once).
        backend = FastTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    @functools.cached_property
    def _special_strings(self) -> re.Pattern[str]:
        """Matches every special token's string, and the placeholder's opening character."""
        strings = sorted((t.content for t in self.backend.get_added_tokens_decoder().values() if t.special),
                         key=len, reverse=True)
        return re.compile("|".join([*map(re.escape, strings), "\ue000"]))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor such as a row of ``generate``'s output)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the tokenizer's Jinja chat template, as ``transformers`` does.

        Raises TokenizerError if the tokenizer has no template or a message is malformed.
        """
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json; use plain prompts")
        _check_messages(messages)
        try:
            return _compile_template(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                **{key: value for key, value in self.special_tokens.items() if value is not None})
        except TemplateError as error:
            raise TokenizerError(f"chat template failed: {error}") from error

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    split_special_tokens: bool = False) -> list[int]:
        """Ids of the rendered chat; the template already holds BOS, so no post-processor is applied.

        ``split_special_tokens``: special-token strings in the messages' content are ordinary text
        (for untrusted messages); only those the template itself writes are special tokens. Content
        without such strings gives exactly the ids of the plain rendering.
        """
        if not split_special_tokens:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
        _check_messages(messages)
        # Render with each special string of the content replaced by a numbered placeholder; then the
        # template's text is encoded as usual and each hidden string as plain text, in its place.
        hidden: list[str] = []

        def hide(match: re.Match[str]) -> str:
            hidden.append(match[0])
            return _HIDDEN.format(len(hidden) - 1)

        rendered = self.apply_chat_template([{**m, "content": self._special_strings.sub(hide, m["content"])}
                                             for m in messages], add_generation_prompt)
        pieces = _HIDDEN_PATTERN.split(rendered)  # text, number, text, number, ..., text
        numbers = [int(n) for n in pieces[1::2]]
        if numbers != list(range(len(hidden))):
            raise TokenizerError("the chat template rewrote the message content, so special-token strings in it "
                                 "cannot be kept as text")
        ids = self.encode(pieces[0], add_special_tokens=False)
        for number, text in zip(numbers, pieces[2::2]):
            ids += self.encode(hidden[number], add_special_tokens=False, split_special_tokens=True)
            ids += self.encode(text, add_special_tokens=False)
        return ids


def _check_messages(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise TokenizerError(f"message {i} must be an object with string 'role' and 'content', got {message!r}")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    # Cached: compiling the template costs far more than rendering it (SFT data renders it per sample).
    # The same environment settings transformers uses, so templates written for it render identically.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(template)


def _atomic_write(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    split_digits: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer with LLaDA's special tokens and chat template.

    Special tokens take the first ids; the vocabulary is ``vocab_size`` entries in all. Byte-level
    means any UTF-8 text round-trips exactly. ``split_digits`` makes every digit its own token (as
    LLaMA's tokenizers do): merged digit groups ("23", "456") would give each number an arbitrary
    spelling, which is what keeps a small model from learning column arithmetic.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (special tokens + bytes)")
    backend = FastTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "eot_token": EOT_TOKEN,
        "chat_template": LLADA_CHAT_TEMPLATE,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    return Tokenizer(backend, config)
