"""What the command families share: the table entry of a subcommand, user-facing errors, atomic
output files, and the flag groups for the model, sampling and runtime (with the one mapping from
sampling flags to ``GenerationSettings``)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from llada.diffusion.sampling import REMASKING_CHOICES
from llada.engine.decoding import POLICIES
from llada.engine.generation import SAMPLERS
from llada.engine.options import setting_names, settings_from_options
from llada.engine.settings import CACHE_MODES, GenerationSettings
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
    add_model(parser)
    parser.add_argument("--sampler", choices=SAMPLERS, default="engine",
                        help="engine (fast, default) or reference (the official algorithm, a full forward per step)")
    parser.add_argument("--gen-length", type=int, default=128, help="answer length in tokens (default 128)")
    parser.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block size (default 32)")
    parser.add_argument("--policy", choices=POLICIES,
                        help="tokens committed per step: threshold (engine default), factor, or fixed "
                             "(--steps in total; the reference sampler's rule)")
    parser.add_argument("--steps", type=int, help="fixed policy: denoising steps in total (default: gen length)")
    parser.add_argument("--threshold", type=float, default=0.9, help="threshold policy: confidence τ (default 0.9)")
    parser.add_argument("--factor", type=float, default=1.0, help="factor policy: f (default 1)")
    parser.add_argument("--cache", choices=CACHE_MODES, default="dual",
                        help="engine KV cache: dual (default), prefix, or none (exact: a full forward per step)")
    parser.add_argument("--refresh-every", type=int, default=0,
                        help="engine: also refresh the cache every N steps within a block (default 0: block starts)")
    parser.add_argument("--keep-prompt", action="store_true",
                        help="engine, prefix/dual cache: encode the prompt once; later refreshes recompute the "
                             "answer only (faster refreshes, one more approximation; docs/engine.md)")
    parser.add_argument("--reuse-decided", action="store_true",
                        help="engine, dual cache: block steps recompute only undecided (and just decided) "
                             "positions; fewer queries per step for large batches (an approximation; docs/engine.md)")
    parser.add_argument("--no-early-stop", action="store_true",
                        help="engine: decode every block even after the answer has ended")
    parser.add_argument("--compile", action="store_true",
                        help="engine: torch.compile the block steps and refreshes (GPU; the first call of a "
                             "shape compiles for tens of seconds)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default 0 = off)")
    parser.add_argument("--remasking", choices=REMASKING_CHOICES, default="low_confidence")
    parser.add_argument("--logits-eos-inf", action="store_true",
                        help="never propose the end-of-text token (the official setting for some benchmarks)")
    parser.add_argument("--confidence-eos-eot-inf", action="store_true",
                        help="never commit end-of-text/end-of-turn tokens by confidence (the official setting "
                             "for some benchmarks)")


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """GenerationSettings from the sampling flags (one flag per setting, through the shared mapping);
    --steps alone selects the fixed policy."""
    options = {name: getattr(args, name) for name in setting_names() if hasattr(args, name)}
    options["policy"] = args.policy or ("fixed" if args.steps is not None or args.sampler == "reference" else "threshold")
    options["early_stop"] = not args.no_early_stop
    return settings_from_options(options)


def add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), stored, bf16, fp16, fp32; "
                        "int8 or fp8: auto with the block weights quantized (less memory; see docs/engine.md)")
    parser.add_argument("--seed", type=int, default=0)


