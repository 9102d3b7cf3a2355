"""The ``llada`` command line: a table of subcommands, each a typed function in its family's module.

Subcommands: generate, chat, score, serve, eval, info, convert, init, cache, data tokenize, data sft, tokenizer train,
train, export, plot. Run ``llada SUBCOMMAND --help`` for examples. A new subcommand is one ``Command``
in the ``COMMANDS`` list of its family's module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llada.cli import checkpoints, generation, serving, training
from llada.cli.common import CliError, Command
from llada.cli.evaluation import EVAL_HELP, PASSTHROUGH
from llada.model.checkpoint import CheckpointError
from llada.model.tokenizer import TokenizerError
from llada.training.corpus import CorpusError

COMMANDS: list[Command] = [*generation.COMMANDS, *serving.COMMANDS, *checkpoints.COMMANDS, *training.COMMANDS]
GROUPS = {"data": "Prepare training data (tokenize corpora, build SFT pairs).", "tokenizer": "Train tokenizers.",
          "cache": "Inspect or clear the compile cache of --compile engines."}
# Errors a user can cause (bad values, files, checkpoints): one line on stderr and exit status 2, no traceback.
# (TrainingError is a RuntimeError.)
USER_ERRORS = (CliError, CheckpointError, CorpusError, TokenizerError, ValueError, OSError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every table command (``eval`` only listed: its arguments go to ``PASSTHROUGH``)."""
    parser = argparse.ArgumentParser(prog="llada", description="Large Language Diffusion Models: generate, chat, "
                                     "score and manage LLaDA checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for entry in COMMANDS:
        *group, name = entry.name.split()
        where = commands
        if group:
            if group[0] not in groups:
                groups[group[0]] = commands.add_parser(group[0], help=GROUPS[group[0]]).add_subparsers(
                    dest=f"{group[0]}_command", required=True)
            where = groups[group[0]]
        sub = where.add_parser(name, help=entry.help, description=entry.help, epilog=entry.epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        entry.add_arguments(sub)
        sub.set_defaults(entry=entry, parser=sub)
    commands.add_parser("eval", help=EVAL_HELP, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, run in sorted(PASSTHROUGH.items(), key=lambda item: -len(item[0])):
        if tuple(argv[:len(words)]) == words:
            return run(argv[len(words):])
    args = build_parser().parse_args(argv)
    entry: Command = args.entry
    if entry.check is not None:
        entry.check(args.parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        entry.run(args)
    except USER_ERRORS as error:
        print(f"llada {entry.name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user asked to stop, a traceback would only hide that
        print(f"\nllada {entry.name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
