"""One mapping from user options to :class:`~llada.engine.engine.GenerationSettings`, built from the dataclass.

Options arrive as strings (lm-eval's ``--model_args``, ``key=value`` lists) or as parsed values (the
command line's flags, JSON). Every field of ``GenerationSettings`` is an option under its own name,
converted to the field's type; a new setting is a new field, nothing else. Unknown names are an
error that lists the valid ones, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from llada.engine.settings import GenerationSettings

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def setting_names() -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(GenerationSettings))


def setting_types() -> dict[str, Any]:
    """Each setting's type (bool, int, float, a Literal of its choices, or an Optional of these)."""
    return typing.get_type_hints(GenerationSettings)


def convert(name: str, value: Any, kind: Any) -> Any:
    """``value`` (a string from a command line, or already parsed) as the type ``kind`` (bool, int,
    float, str, a Literal or an Optional of these), raising ValueError that names ``name``."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in arguments and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return convert(name, value, inner)
    if origin is typing.Literal:
        text = value if isinstance(value, str) else str(value)
        if text not in arguments:
            raise ValueError(f"{name} must be one of {', '.join(map(str, arguments))}; got {value!r}")
        return text
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is str:
        return str(value)
    raise TypeError(f"setting {name} has a type this mapping does not handle: {kind!r}")


def settings_from_options(options: Mapping[str, Any], base: GenerationSettings | None = None) -> GenerationSettings:
    """``base`` (default: ``GenerationSettings()``) with ``options`` ({setting name: value}) applied
    and validated. A value of None keeps the base's value for settings that cannot be None.

    Raises:
        ValueError: an unknown name (the valid ones listed), a value of the wrong type, or settings
            that do not go together (``GenerationSettings.validate``).
    """
    base = base or GenerationSettings()
    hints = setting_types()
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise ValueError(f"unknown generation setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"valid: {', '.join(setting_names())}")
    changes = {}
    for name, value in options.items():
        nullable = type(None) in typing.get_args(hints[name])
        if value is None and not nullable:
            continue
        changes[name] = convert(name, value, hints[name])
    settings = dataclasses.replace(base, **changes)
    settings.validate()
    return settings
