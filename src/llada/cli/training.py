"""``llada data tokenize``, ``data sft``, ``data preference``, ``data prompts``, ``llada tokenizer train``,
``llada train`` and ``llada plot``: from text files to a trained model and its curves."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from llada.cli.common import Command
from llada.model.tokenizer import Tokenizer, train_tokenizer
from llada.training.config import load_config
from llada.training.corpus import CorpusIssue, expand_inputs, read_documents
from llada.training.packing import tokenize_corpus
from llada.training.plot import plot_runs
from llada.training.preference_data import build_preference_data
from llada.training.prompt_data import build_prompt_data
from llada.training.sft_data import build_sft_data


def run_tokenizer_train(inputs: Sequence[str], output: str, vocab_size: int, text_field: str = "text",
                        text_unit: str = "file", on_error: str = "fail", split_digits: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer (LLaDA special tokens and chat template) on local text files."""
    skipped: list[CorpusIssue] = []

    def texts():
        for path in tqdm(expand_inputs(inputs), desc="reading", unit="file"):
            for record in read_documents(path, text_field, text_unit, on_error, skipped.append):
                yield record.text

    tokenizer = train_tokenizer(texts(), vocab_size=vocab_size, split_digits=split_digits)
    tokenizer.save_pretrained(output)
    for issue in skipped:
        logging.getLogger(__name__).warning("skipped %s", issue)
    return tokenizer


def _tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files or glob patterns (quote globs)")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (e.g. a checkpoint)")
    parser.add_argument("--output", required=True, help="output directory (a rerun resumes)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default text)")
    parser.add_argument("--text-unit", choices=("file", "line"), default="file",
                        help="plain text: one document per file (default) or per line")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="bad records: stop (default) or skip and count them")
    parser.add_argument("--workers", type=int, help="processes (default: CPU count)")


def _tokenize(args: argparse.Namespace) -> None:
    summary = tokenize_corpus(args.inputs, args.output, args.tokenizer, text_field=args.text_field,
                              text_unit=args.text_unit, on_error=args.on_error, workers=args.workers)
    print(f"{summary.files} files ({summary.reused} reused from an earlier run), {summary.documents:,} "
          f"documents, {summary.tokens:,} tokens from {summary.text_bytes:,} bytes of text, "
          f"{summary.skipped} records skipped, {summary.seconds:.1f} s -> {args.output}")


def _sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="JSONL files or glob patterns")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer files and chat template")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-length", type=int, default=4096, help="longest prompt + answer (default 4096)")
    parser.add_argument("--overlong", choices=("drop", "truncate"), default="drop")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument("--messages-field", default="messages")


def _sft(args: argparse.Namespace) -> None:
    summary = build_sft_data(args.inputs, args.output, args.tokenizer, max_length=args.max_length,
                             overlong=args.overlong, on_error=args.on_error, messages_field=args.messages_field)
    print(json.dumps(asdict(summary)))


def _preference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="JSONL files or glob patterns")
    parser.add_argument("--tokenizer", required=True, help="directory with the tokenizer files and chat template")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-length", type=int, default=4096,
                        help="longest prompt + answer; longer pairs are dropped (default 4096)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")


def _preference(args: argparse.Namespace) -> None:
    summary = build_preference_data(args.inputs, args.output, args.tokenizer, max_length=args.max_length,
                                    on_error=args.on_error)
    print(json.dumps(asdict(summary)))


def _prompts(args: argparse.Namespace) -> None:
    summary = build_prompt_data(args.inputs, args.output, args.tokenizer, max_length=args.max_length,
                                on_error=args.on_error)
    print(json.dumps(asdict(summary)))


def _tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files or glob patterns")
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--text-unit", choices=("file", "line"), default="file")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument("--no-split-digits", action="store_true",
                        help="let BPE merge digits into multi-digit tokens (default: one token per digit)")


def _tokenizer(args: argparse.Namespace) -> None:
    tok = run_tokenizer_train(args.inputs, args.output, args.vocab_size, text_field=args.text_field,
                              text_unit=args.text_unit, on_error=args.on_error,
                              split_digits=not args.no_split_digits)
    shortfall = "" if tok.vocab_size == args.vocab_size else \
        f" (of {args.vocab_size} asked for: the text has no more frequent merges)"
    print(f"trained a {tok.vocab_size}-token tokenizer{shortfall} -> {args.output}")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (see configs/); omitted = all defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set optim.lr=3e-4 (repeatable)")


def _train(args: argparse.Namespace) -> None:
    # Imported here: the trainer pulls in torch.distributed's checkpointing (~0.7 s), which every other
    # command would otherwise pay at start-up.
    from llada.training.trainer import train

    records = train(load_config(args.config, args.set))
    if records:
        print(json.dumps(records[-1]))


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--output", help="PNG path (default: RUN/curves.png for one run, curves.png otherwise)")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run")
    parser.add_argument("--title")


def _plot(args: argparse.Namespace) -> None:
    one_run = len(args.runs) == 1 and Path(args.runs[0]).is_dir()
    default = Path(args.runs[0]) / "curves.png" if one_run else Path("curves.png")
    print(plot_runs(args.runs, args.output or default, labels=args.labels, title=args.title))


COMMANDS = [
    Command("data tokenize", "Tokenize text/JSONL/Parquet files into packed token shards (resumable).",
            "examples:\n  llada data tokenize 'corpus/**/*.txt' --tokenizer ckpt/ --output data/pretrain\n"
            "  llada data tokenize web.jsonl --text-field text --on-error skip --tokenizer ckpt/ --output data/web",
            _tokenize_arguments, _tokenize),
    Command("data sft", "Turn chat JSONL into prompt/answer token pairs for supervised fine-tuning.",
            "input lines look like {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, "
            "{\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n"
            "example:\n  llada data sft chats.jsonl --tokenizer ckpt/ --output data/sft --max-length 2048",
            _sft_arguments, _sft),
    Command("data preference", "Turn preference JSONL (a prompt, a chosen and a rejected answer) into token "
            "triples for DPO / VRPO.",
            "input lines look like {\"prompt\": \"What is 2+3?\", \"chosen\": \"5\", \"rejected\": \"6\"} "
            "(or \"messages\": [...] instead of \"prompt\")\n"
            "example:\n  llada data preference pairs.jsonl --tokenizer ckpt/ --output data/pairs --max-length 1024",
            _preference_arguments, _preference),
    Command("data prompts", "Turn prompt JSONL (with the fields the rewards check) into chat-formatted prompts "
            "for RL (grpo).",
            "input lines look like {\"prompt\": \"What is 2+3?\", \"answer\": \"5\"} (or \"messages\": [...]); "
            "every field reaches the rewards\n"
            "example:\n  llada data prompts questions.jsonl --tokenizer ckpt/ --output data/prompts",
            _preference_arguments, _prompts),
    Command("tokenizer train", "Train a byte-level BPE tokenizer with LLaDA's special tokens and chat template.",
            "example:\n  llada tokenizer train 'texts/*.txt' --vocab-size 16384 --output my-tokenizer/",
            _tokenizer_arguments, _tokenizer),
    Command("train", "Pretrain, fine-tune (SFT, LoRA), align (DPO, VRPO, GRPO) or train the autoregressive "
            "baseline from a YAML recipe.",
            "examples:\n  llada train configs/demo_pretrain.yaml\n"
            "  llada train configs/demo_pretrain.yaml --set optim.lr=1e-3 --set steps=200 --set out_dir=runs/try",
            _train_arguments, _train),
    Command("plot", "Draw loss, learning-rate and throughput curves of training runs to a PNG.",
            "examples:\n  llada plot runs/demo\n  llada plot runs/one-gpu runs/two-gpu --labels '1 GPU' '2 GPUs' "
            "--output compare.png",
            _plot_arguments, _plot),
]
