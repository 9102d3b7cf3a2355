"""What the command families share: the table entry of a subcommand, user-facing errors, atomic
output files, and the flag groups for the model, sampling and runtime (with the one mapping from
sampling flags to ``GenerationSettings``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from llada.engine.generation import SAMPLERS, Decoder
from llada.engine.options import setting_names, setting_types, settings_from_options
from llada.engine.settings import GenerationSettings
from llada.model.loading import DEMO_MODEL


@dataclass(frozen=True)
class Command:
    """One subcommand: ``name`` (``"data tokenize"`` for a command of a group), its help and examples,
    the function that adds its flags, and the typed function that runs it on the parsed flags."""

    name: str
    help: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    # Flags that make no sense together, refused before any work (as parser errors, exit status 2).
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None


class CliError(ValueError):
    """A user-facing error (a bad value given on the command line or in an input file): printed
    without a traceback, exit status 2."""



def atomic_text_writer(path: Path) -> tuple[TextIO, Callable[[], None]]:
    """A file handle writing to a temporary file and a function that renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    stream = os.fdopen(handle, "w", encoding="utf-8")

    def commit() -> None:
        stream.close()
        os.replace(temporary, path)

    return stream, commit


def add_model(parser: argparse.ArgumentParser) -> None:
    if DEMO_MODEL.is_dir():
        parser.add_argument("--model", default=str(DEMO_MODEL),
                            help=f"checkpoint directory in the official layout (default: the demo model, {DEMO_MODEL})")
    else:
        parser.add_argument("--model", required=True, help="checkpoint directory (official LLaDA layout)")


def add_sampling(parser: argparse.ArgumentParser) -> None:
    """The model, the sampler, ``--compile``, ``--deterministic``, and one flag per ``GenerationSettings``
    field, made from the field (name, type, default, help): a new setting is a new field, and its flag follows."""
    add_model(parser)
    parser.add_argument("--sampler", choices=SAMPLERS, default="engine",
                        help="engine (fast, default) or reference (the official algorithm, a full forward per step)")
    parser.add_argument("--compile", action="store_true",
                        help="engine: torch.compile the block steps and refreshes (GPU; the first call of a "
                             "shape compiles for seconds; compiled code is cached, see `llada cache`)")
    parser.add_argument("--deterministic", action="store_true",
                        help="engine: batch-invariant numerics, so that an answer is the same bits whatever the "
                             "batch and the other prompts (slower; not with --compile)")
    hints = setting_types()
    for setting in dataclasses.fields(GenerationSettings):
        name, kind, help_text = setting.name, hints[setting.name], setting.metadata["help"]
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            if setting.default:
                parser.add_argument("--no-" + flag[2:], dest=name, action="store_false",
                                    help=setting.metadata["off"])
            else:
                parser.add_argument(flag, action="store_true", help=help_text)
            continue
        options: dict = {"help": help_text}
        inner = [argument for argument in typing.get_args(kind) if argument is not type(None)]
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            options["type"] = inner[0]
        else:
            options["type"] = kind
        # The policy's default depends on the other flags (settings_from_args); the rest are the dataclass's.
        options["default"] = None if name == "policy" else setting.default
        parser.add_argument(flag, **options)


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """GenerationSettings from the sampling flags (one flag per setting, through the shared mapping);
    --steps alone, or the reference sampler, selects the fixed policy."""
    options = {name: getattr(args, name) for name in setting_names() if hasattr(args, name)}
    options["policy"] = args.policy or ("fixed" if args.steps is not None or args.sampler == "reference" else "threshold")
    return settings_from_options(options)


def decoder_from_args(args: argparse.Namespace) -> Decoder:
    """The sampler and the engine's options from ``--sampler``, ``--compile`` and ``--deterministic``."""
    return Decoder(args.sampler, compile=args.compile, deterministic=args.deterministic)


def add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), stored, bf16, fp16, fp32; "
                        "int8 or fp8: auto with the block weights quantized (less memory; see docs/engine.md)")
    parser.add_argument("--seed", type=int, default=0)


