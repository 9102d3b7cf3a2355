"""``llada info``, ``llada convert``, ``llada init`` and ``llada export``: checkpoints in the official layout."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from llada.cli.common import CliError, Command
from llada.model.checkpoint import read_config, save_model, verify_weight_files
from llada.model.config import PRESETS, preset
from llada.model.loading import checkpoint_sources, load, resolve_dtype
from llada.model.lora import is_adapter
from llada.model.tokenizer import TOKENIZER_FILES, Tokenizer, TokenizerError, tokenizer_files, train_tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.checkpoints import ADAPTER_DIR, MODEL_DIR
from llada.training.config import CHECKPOINTS


def run_info(model: str) -> dict:
    """Describe a checkpoint directory or a preset name: config, size, memory, files."""
    if model in PRESETS and not Path(model).exists():
        config, files = preset(model), {}
    else:
        config = read_config(model)
        files = {p.name for p in verify_weight_files(model)}
    info = {"config": asdict(config), "parameters": config.num_parameters(),
            "parameters_without_embedding": config.num_parameters(include_embedding=False),
            "forward_gflops_per_token_at_2048": round(config.flops_per_token(2048) / 1e9, 3),
            "weights_memory_gib": {name: round(config.memory_bytes(size) / 2**30, 3)
                                   for name, size in (("bf16", 2), ("fp32", 4))}}
    if files:
        info["weight_files"] = sorted(files)
        try:
            tokenizer = Tokenizer.from_pretrained(model)
            info["tokenizer"] = {"vocab_size": tokenizer.vocab_size, **asdict(tokenizer.ids),
                                 "chat_template": tokenizer.chat_template is not None}
        except TokenizerError as error:
            info["tokenizer"] = f"unavailable: {error}"
    return info


def run_convert(source: str, destination: str, dtype: str = "bf16", max_shard_size: str = "5GB") -> None:
    """Re-save a checkpoint with another dtype and/or shard size; tokenizer files are copied along."""
    target_dtype = resolve_dtype(dtype, torch.device("cpu"))
    model = LLaDAModel.from_pretrained(source, dtype=target_dtype)
    save_model(model, destination, max_shard_size=max_shard_size, extra_files=tokenizer_files(source))


def run_init(destination: str, preset_name: str = "tiny", tokenizer: str | None = None,
             train_tokenizer_on: Sequence[str] = (), vocab_size: int | None = None, seed: int = 0,
             dtype: str = "float32") -> None:
    """Create a randomly initialised checkpoint (weights + tokenizer) in the official layout.

    The tokenizer comes from an existing checkpoint (``tokenizer``) or is trained on text files; the
    model's vocabulary and special ids follow it.
    """
    if tokenizer:
        tok = Tokenizer.from_pretrained(tokenizer)
    elif train_tokenizer_on:
        texts = [Path(p).read_text(encoding="utf-8") for p in train_tokenizer_on]
        tok = train_tokenizer(texts, vocab_size=vocab_size or PRESETS[preset_name].vocab_size)
    else:
        raise CliError("init needs a tokenizer: --tokenizer DIR or --train-tokenizer-on FILE...")
    config = preset(preset_name, vocab_size=tok.vocab_size, embedding_size=tok.vocab_size, mask_token_id=tok.ids.mask,
                    eos_token_id=tok.ids.eos, pad_token_id=tok.ids.pad, eot_token_id=tok.ids.eot)
    torch.manual_seed(seed)
    model = LLaDAModel(config)
    with tempfile.TemporaryDirectory() as scratch:
        tok.save_pretrained(scratch)
        save_model(model, destination, dtype=resolve_dtype(dtype, torch.device("cpu")),
                   extra_files=[Path(scratch) / name for name in TOKENIZER_FILES])


def run_export(run_dir: str, destination: str, step: int | None = None, dtype: str = "bf16",
               max_shard_size: str = "5GB", merge_lora: bool = False) -> Path:
    """Export a training run's checkpoint (the latest, or ``step``) as a standalone checkpoint.

    A LoRA run's checkpoint holds an adapter: it is copied as is (PEFT's layout, usable with
    ``--model``), or with ``merge_lora`` added into its base model's weights (in float32, then cast
    to ``dtype``) and written in the official layout. ``run_dir`` may also be an adapter directory.
    """
    if is_adapter(run_dir):
        source = Path(run_dir)
    else:
        root = Path(run_dir) / CHECKPOINTS
        candidates = sorted(root.glob("step-*")) if root.is_dir() else []
        if step is not None:
            candidates = [c for c in candidates if c.name == f"step-{step:08d}"]
        if not candidates:
            raise CliError(f"no checkpoint{'' if step is None else f' for step {step}'} under {root}")
        source = candidates[-1] / ADAPTER_DIR if (candidates[-1] / ADAPTER_DIR).is_dir() else candidates[-1] / MODEL_DIR
    if not is_adapter(source):
        if merge_lora:
            raise CliError(f"{source} is a whole model, not a LoRA adapter: export it without --merge-lora")
        run_convert(str(source), destination, dtype=dtype, max_shard_size=max_shard_size)
    elif merge_lora:
        model, _ = load(source, "cpu", "fp32")  # the base in float32 with the adapter added
        save_model(model, destination, dtype=resolve_dtype(dtype, torch.device("cpu")), max_shard_size=max_shard_size,
                   extra_files=tokenizer_files(checkpoint_sources(source)[1]))
    else:
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{Path(destination).name}.", dir=Path(destination).parent))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
    return source


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory or preset name (" + ", ".join(PRESETS) + ")")


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or stored (default bf16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("destination")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--tokenizer", help="take the tokenizer from this checkpoint directory")
    parser.add_argument("--train-tokenizer-on", nargs="+", default=(), help="train a BPE tokenizer on these text files")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size when training a tokenizer")
    parser.add_argument("--dtype", default="float32", help="stored dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0)


def _init(args: argparse.Namespace) -> None:
    run_init(args.destination, preset_name=args.preset, tokenizer=args.tokenizer,
             train_tokenizer_on=args.train_tokenizer_on, vocab_size=args.vocab_size, seed=args.seed, dtype=args.dtype)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("destination")
    parser.add_argument("--step", type=int, help="which step (default: the latest)")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or stored (default bf16)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA run (or adapter directory): add the adapter into its base model's weights and "
                             "write a whole checkpoint (default: copy the adapter as is)")


def _export(args: argparse.Namespace) -> None:
    used = run_export(args.run_dir, args.destination, step=args.step, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, merge_lora=args.merge_lora)
    print(f"exported {used} -> {args.destination}")


def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="the cache root (default: $LLADA_CACHE_DIR, else ~/.cache/llada)")


def _cache_info(args: argparse.Namespace) -> None:
    from llada.engine.compile_cache import cache_root

    root = Path(args.dir) if args.dir else cache_root()
    sizes = {name: sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
             for name in ("compile", "inductor", "triton") if (root / name).is_dir()}
    engines = sorted({path.parent.name for path in (root / "compile").glob("*/artifacts-*.bin")})
    print(json.dumps({"root": str(root), "bytes": sizes, "compiled_engines": engines}, indent=2))


def _cache_clear(args: argparse.Namespace) -> None:
    from llada.engine.compile_cache import clear

    print(f"cleared the compile caches under {clear(Path(args.dir) if args.dir else None)}")


COMMANDS = [
    Command("cache info", "Show where compiled engines are cached and how much space the caches take.",
            "example:\n  llada cache info", _cache_arguments, _cache_info),
    Command("cache clear", "Delete the compile caches (the next --compile start compiles from scratch).",
            "example:\n  llada cache clear", _cache_arguments, _cache_clear),
    Command("info", "Show a checkpoint's (or preset's) config, parameter count and memory needs.",
            "examples:\n  llada info ckpt/\n  llada info 8b",
            _info_arguments, lambda args: print(json.dumps(run_info(args.model), indent=2))),
    Command("convert", "Re-save a checkpoint with another dtype or shard size.",
            "example:\n  llada convert fp32-ckpt/ bf16-ckpt/ --dtype bf16 --max-shard-size 2GB",
            _convert_arguments,
            lambda args: run_convert(args.source, args.destination, dtype=args.dtype,
                                     max_shard_size=args.max_shard_size)),
    Command("init", "Create a randomly initialised checkpoint with a tokenizer (for tests and demos).",
            "example:\n  llada init tiny-ckpt/ --preset tiny --train-tokenizer-on README.md --vocab-size 512",
            _init_arguments, _init),
    Command("export", "Export a training run's checkpoint in the official layout (or its LoRA adapter).",
            "examples:\n  llada export runs/demo checkpoints/demo --dtype bf16\n"
            "  llada export runs/lora-sft checkpoints/merged --merge-lora   # adapter + base -> one checkpoint",
            _export_arguments, _export),
]
