"""``llada generate``, ``llada chat`` and ``llada score``: answers and likelihoods from a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from llada.cli.common import (
    CliError,
    Command,
    add_model,
    add_runtime,
    add_sampling,
    atomic_text_writer,
    decoder_from_args,
    settings_from_args,
)
from llada.diffusion.infilling import infill_text
from llada.diffusion.likelihood import log_likelihood
from llada.diffusion.sampling import REMASKING_CHOICES, Remasking
from llada.engine.answer_text import AnswerText, answer_text
from llada.engine.generation import DEFAULT_DECODER, Decoder, answer_ids
from llada.engine.settings import GenerationSettings
from llada.model.loading import load
from llada.model.tokenizer import Message
from llada.training.corpus import iter_jsonl
from llada.training.sft_data import checked_messages


def run_generate(model: str, prompt: str, settings: GenerationSettings | None = None, decoder: Decoder = DEFAULT_DECODER,
                 chat: bool = True, device: str = "auto", dtype: str = "auto", seed: int = 0,
                 show_prompt: bool = False) -> str:
    """Generate one answer for ``prompt`` and return its text."""
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    messages: list[Message] = [{"role": "user", "content": prompt}]
    ids = tokenizer.encode_chat(messages) if chat else tokenizer.encode(prompt)
    generator = torch.Generator(device=net.device).manual_seed(seed)
    answer = answer_ids(net, ids, settings or GenerationSettings(), decoder.sampler, decoder.engine(net), generator)
    text = answer_text(tokenizer, answer)
    return (prompt + text) if show_prompt else text


def run_infill(model: str, text: str, steps: int | None = None, temperature: float = 0.0,
               remasking: Remasking = "low_confidence", device: str = "auto", dtype: str = "auto",
               seed: int = 0, question: str | None = None) -> str:
    """``text`` with its ``[MASK]`` / ``[MASK*N]`` gaps filled by the model (diffusion/infilling.py).

    With ``question``, ``text`` is the assistant's answer to it (chat template) and only the answer is
    returned; otherwise ``text`` is raw text.
    """
    net, tokenizer = load(model, device, dtype)
    generator = torch.Generator(device=net.device).manual_seed(seed)
    try:
        return infill_text(net, tokenizer, text, question, steps=steps, temperature=temperature,
                           remasking=remasking, generator=generator)
    except ValueError as error:
        raise CliError(str(error)) from error


CHAT_ROLES = ("system", "user", "assistant")
GENERATE_BATCH_SIZE = 16  # ``llada generate --input``'s prompts per batch (the option itself defaults to None)


def run_generate_file(model: str, input: str, output: str | None = None, settings: GenerationSettings | None = None,
                      decoder: Decoder = DEFAULT_DECODER, batch_size: int = GENERATE_BATCH_SIZE, chat: bool = True,
                      device: str = "auto", dtype: str = "auto", seed: int = 0) -> int:
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
    engine = decoder.engine(net)
    stream, commit = atomic_text_writer(Path(output)) if output else (sys.stdout, lambda: None)
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
        if "messages" in record:
            try:
                messages = checked_messages(record["messages"], "messages")
            except ValueError as error:
                raise CliError(f"{path}:{number}: {error}") from error
            if roles := sorted({m["role"] for m in messages} - set(CHAT_ROLES)):
                raise CliError(f"{path}:{number}: unknown role {roles[0]!r}; messages take the roles {CHAT_ROLES}")
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


def run_chat(model: str, settings: GenerationSettings | None = None, decoder: Decoder = DEFAULT_DECODER,
             device: str = "auto", dtype: str = "auto", seed: int = 0, system: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Multi-turn chat on the terminal (or the given streams); the answer is printed as its beginning is decided."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    settings = settings or GenerationSettings()
    torch.manual_seed(seed)
    net, tokenizer = load(model, device, dtype)
    generator = torch.Generator(device=net.device).manual_seed(seed)
    engine = decoder.engine(net)
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
        reply = answer_text(tokenizer, answer_ids(net, ids, settings, decoder.sampler, engine, generator,
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
    stream, commit = atomic_text_writer(Path(output)) if output else (sys.stdout, lambda: None)
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


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options of the other input mode: silently ignoring them would hide a mistaken command."""
    if args.prompt is not None:
        given = [flag for flag, value in (("--output", args.output), ("--batch-size", args.batch_size)) if value is not None]
        if given:
            parser.error(f"{' and '.join(given)} go with --input (a JSONL file of prompts), not --prompt")
    elif args.show_prompt:
        parser.error("--show-prompt goes with --prompt; with --input every output line keeps its input line's fields")


def _sampling(args: argparse.Namespace) -> dict:
    """The keyword arguments ``run_generate``, ``run_generate_file`` and ``run_chat`` share."""
    return {"model": args.model, "settings": settings_from_args(args), "decoder": decoder_from_args(args),
            "device": args.device, "dtype": args.dtype, "seed": args.seed}


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--input", help='JSONL file of {"prompt": ...} or {"messages": [...]} lines to answer')
    parser.add_argument("--output", help="with --input: JSONL file to write (default: standard output)")
    # None when not given, so that a value given with --prompt (where it means nothing) is refused.
    parser.add_argument("--batch-size", type=int,
                        help=f"with --input: prompts decoded together (default {GENERATE_BATCH_SIZE})")
    parser.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    parser.add_argument("--show-prompt", action="store_true", help="with --prompt: print the prompt before the answer")
    add_runtime(parser)


def _generate(args: argparse.Namespace) -> None:
    if args.input:
        run_generate_file(input=args.input, output=args.output, chat=not args.no_chat,
                          batch_size=GENERATE_BATCH_SIZE if args.batch_size is None else args.batch_size,
                          **_sampling(args))
    else:
        print(run_generate(prompt=args.prompt, chat=not args.no_chat, show_prompt=args.show_prompt, **_sampling(args)))


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling(parser)
    parser.add_argument("--system", help="optional system message")
    add_runtime(parser)


def _infill_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("text", help="text with gaps: [MASK] is one token, [MASK*N] is N tokens")
    parser.add_argument("--question", help="the text is the answer to this chat question (chat template); "
                                           "prints the answer only")
    parser.add_argument("--steps", type=int, help="denoising steps (default: one per masked token)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--remasking", choices=REMASKING_CHOICES, default="low_confidence")
    add_runtime(parser)


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--input", required=True, help="JSONL file with 'prompt' and 'answer' per line")
    parser.add_argument("--output", help="JSONL file to write (default: standard output)")
    parser.add_argument("--mc-num", type=int, default=128, help="Monte-Carlo samples per pair (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    parser.add_argument("--cfg-scale", type=float, default=0.0)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_runtime(parser)


def _score(args: argparse.Namespace) -> None:
    run_score(args.model, args.input, args.output, mc_num=args.mc_num, batch_size=args.batch_size,
              cfg_scale=args.cfg_scale, chat=args.chat, device=args.device, dtype=args.dtype, seed=args.seed)


COMMANDS = [
    Command("generate", "Generate an answer to a prompt (the fast engine by default).",
            "examples:\n  llada generate --model ckpt/ --prompt 'What is a diffusion model?' --gen-length 64\n"
            "  llada generate --model ckpt/ --prompt 'Hi' --policy threshold --threshold 0.8 --cache dual\n"
            "  llada generate --model ckpt/ --prompt 'Hi' --sampler reference --steps 64   # the official algorithm\n"
            "  llada generate --model ckpt/ --input prompts.jsonl --output answers.jsonl --batch-size 32",
            _generate_arguments, _generate, check=_check_generate),
    Command("chat", "Interactive multi-turn chat; answers appear block by block.",
            "example:\n  llada chat --model ckpt/ --gen-length 128 --block-length 32 --threshold 0.9",
            _chat_arguments, lambda args: run_chat(system=args.system, **_sampling(args))),
    Command("infill", "Fill gaps anywhere in a text, or in the answer to a question, from the words on both sides.",
            "examples:\n  llada infill 'To be, or not to be, [MASK*2] is the question:'\n"
            "  llada infill --question 'Sort alphabetically: storm, crown, night, ocean' 'crown,[MASK*2], ocean, storm'",
            _infill_arguments, lambda args: print(run_infill(args.model, args.text, args.steps, args.temperature,
                                                             args.remasking, args.device, args.dtype, args.seed,
                                                             args.question))),
    Command("score", "Monte-Carlo ELBO log-likelihood of answers given prompts (JSONL in, JSONL out).",
            "input lines look like {\"prompt\": \"The capital of France is\", \"answer\": \" Paris\"}\n"
            "example:\n  llada score --model ckpt/ --input pairs.jsonl --output scored.jsonl --mc-num 64",
            _score_arguments, _score),
]
