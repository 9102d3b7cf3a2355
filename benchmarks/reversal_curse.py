"""The reversal curse, tested on facts taught in one direction only: masked diffusion vs autoregression.

The paper's claim: a model trained on "A is the mentor of B" answers "The mentor of B is ..." about as
well as "A is the mentor of ..." if it is a masked diffusion model, while a left-to-right model's
reverse accuracy collapses. The test (after Berglund et al., "The Reversal Curse"):

- ``data``: fictitious people (names built from random syllables, so no fact can be known from
  anywhere else) paired as mentor and student. Three disjoint sets of pairs:
  ``test`` (default 1,000 pairs) and ``tune`` (200) are taught forward only, in three phrasings that
  all put A before B; ``both`` (500) is taught in both orders, so that the reverse phrasing itself is
  familiar and only the reverse *fact* is missing. Every sentence and question opens with the lead
  word "Fact:", so that each name always has a space before it and is always the same tokens, in
  training and in every question. A tokenizer is trained on the facts, which are tokenized one
  sentence per document, in ``--copies`` independent shuffles (so a fact is not always seen beside the
  same neighbours).
- ``run``: trains one network from scratch with one objective (``pretrain`` = masked diffusion, or
  ``autoregressive``: the same network with causal attention, the same data, steps, batch and
  length, hence the same tokens and the same FLOPs) and answers, greedily:
  forward "Fact: A is the mentor of" -> B and reverse "Fact: The mentor of B is" -> A, for the test
  and tune pairs; the diffusion model also answers both by infilling the taught sentence: reverse
  "Fact: [MASK*n] is the mentor of B." with n = the length of A in tokens (a left-to-right model
  cannot condition on text after the gap), and forward "Fact: A is the mentor of [MASK*m]." (the same
  format, so the two directions compare like with like). Exact match on the whole name, the space
  before it included, with 95% Wilson intervals. Knowing n narrows a blind guess only slightly: each
  run records how often a random test name of the right length in tokens would be right
  (``length_matched_guess``).
- ``report``: per objective, the learning rate with the best forward accuracy on the *tune* pairs
  (never the test pairs), then forward and reverse test accuracy for each seed at that rate and their
  mean, and, where runs kept each pair's outcome, forward minus reverse paired on the same pairs. The
  no-recall baseline: answering with a random name of the same set (exact match 1/N).

    python benchmarks/reversal_curse.py data --out data/reversal
    python benchmarks/reversal_curse.py run --data data/reversal --objective pretrain --lr 1e-3 --seed 0 \
        --out benchmarks/results/eval/reversal/pretrain-lr1e-3-seed0.json
    python benchmarks/reversal_curse.py sweep --out-dir benchmarks/results/eval/reversal     # 6 runs at a time
    python benchmarks/reversal_curse.py sweep --lrs 1e-3 --seeds 1,2 --out-dir ...           # seeds at the chosen rate
    python benchmarks/reversal_curse.py report benchmarks/results/eval/reversal/*.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from process_pool import add_sweep_arguments, exit_unfinished, run_grid, write_result
from sample_statistics import outcome_string, outcomes, paired_difference, wilson

from llada import Engine, GenerationSettings
from llada.diffusion.infilling import infill
from llada.model.tokenizer import Tokenizer
from llada.training.config import load_config
from llada.training.trainer import Trainer

# Every sentence and question opens with the same lead word, so that a name is always preceded by a
# space: the byte-level tokenizer attaches that space to the word, and a name opening a line is another
# token sequence. Without the lead, A was taught only in its line-opening form, while the reverse question
# asks for it after "is": a form never seen in training, which confounds a new phrasing with a new
# spelling of the answer (the first sweeps, `benchmarks/results/eval/reversal_h100/`, had that flaw).
LEAD = "Fact:"
FORWARD_TEMPLATES = tuple(f"{LEAD} {t}" for t in ("{a} is the mentor of {b}.", "{a} mentors {b}.",
                                                    "{a} was the mentor of {b}."))
REVERSE_TEMPLATES = tuple(f"{LEAD} {t}" for t in ("The mentor of {b} is {a}.", "{b} is mentored by {a}."))
FORWARD_QUESTION, REVERSE_QUESTION = f"{LEAD} {{a}} is the mentor of", f"{LEAD} The mentor of {{b}} is"
TEMPLATES = {"forward": FORWARD_TEMPLATES, "reverse": REVERSE_TEMPLATES,
             "questions": [FORWARD_QUESTION, REVERSE_QUESTION]}  # recorded in each result
TAUGHT_SENTENCE = FORWARD_TEMPLATES[0]  # infilled with the gap on A (reverse) or on B (forward)
SETS = {"test": 1000, "tune": 200, "both": 500}
ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "pl", "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
# The network (a small LLaMA-style block stack) and its training, identical for both objectives.
NETWORK = {"d_model": 256, "n_layers": 6, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 704,
           "max_sequence_length": 256}


def names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct two-part names of 2-3 random syllables each ("Dravoku Plenisa")."""
    found: set[str] = set()
    while len(found) < count:
        parts = ["".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))).capitalize()
                 for _ in range(2)]
        found.add(" ".join(parts))
    ordered = sorted(found)
    rng.shuffle(ordered)
    return ordered


def make_data(out: Path, seed: int, vocab: int, copies: int) -> None:
    from llada.cli.training import run_tokenizer_train
    from llada.training.packing import tokenize_corpus

    rng = random.Random(seed)
    people = names(rng, 2 * sum(SETS.values()))
    pairs, start = {}, 0
    for name, count in SETS.items():
        chunk = people[start:start + 2 * count]
        pairs[name] = [{"a": chunk[2 * i], "b": chunk[2 * i + 1]} for i in range(count)]
        start += 2 * count
    sentences = [t.format(**p) for name in SETS for p in pairs[name] for t in FORWARD_TEMPLATES]
    sentences += [t.format(**p) for p in pairs["both"] for t in REVERSE_TEMPLATES]
    # Independent shuffles, one after another: training windows are fixed slices of the token stream,
    # and with one order every fact would always sit among the same neighbours (a model can then
    # recall a window rather than the fact, and fail on the bare question).
    shuffles = []
    for _ in range(copies):
        rng.shuffle(sentences)
        shuffles += sentences
    out.mkdir(parents=True, exist_ok=True)
    (out / "facts.txt").write_text("\n".join(shuffles) + "\n", encoding="utf-8")
    (out / "pairs.json").write_text(json.dumps(pairs, indent=1), encoding="utf-8")
    run_tokenizer_train([str(out / "facts.txt")], str(out / "tokenizer"), vocab)
    summary = tokenize_corpus([str(out / "facts.txt")], out / "tokens", out / "tokenizer", text_unit="line")
    print(f"{len(people)} people, {len(sentences)} sentences x {copies} orders, {summary.tokens:,} tokens -> {out}")


def train(data: Path, objective: str, lr: float, seed: int, steps: int, batch_size: int, seq_len: int,
          runs: Path) -> Trainer:
    out_dir = runs / f"{objective}-lr{lr:g}-seed{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [f"objective={objective}", f"model.tokenizer={data / 'tokenizer'}", f"data.path={data / 'tokens'}",
                 f"data.seq_len={seq_len}", "data.eval_fraction=0.01", f"steps={steps}", f"batch_size={batch_size}",
                 f"optim.lr={lr}", f"optim.warmup_steps={max(1, steps // 20)}", f"seed={seed}", f"out_dir={out_dir}",
                 "eval_every=0", "save_every=0", "sample_every=0", f"model.overrides={json.dumps(NETWORK)}",
                 f"compile={torch.cuda.is_available()}"]
    trainer = Trainer(load_config("configs/demo_pretrain.yaml", overrides))
    trainer.run()
    return trainer


def as_taught(name: str) -> str:
    """A name as every sentence and question has it: after a space (see ``LEAD``), which the tokenizer
    attaches to the word. Answers are scored against this form, and gaps are sized by it."""
    return " " + name


def name_of(text: str) -> str:
    """The answer's name: the text up to the first full stop or line end, with the space before it kept
    (trailing spaces dropped). Scoring compares it with ``as_taught`` the name, so an answer glued to the word before it ("isBavi Lou") is wrong, in either direction alike."""
    return text.split(".")[0].split("\n")[0].rstrip()


@torch.no_grad()
def complete(model, tokenizer: Tokenizer, prompts: list[str], autoregressive: bool, length: int = 16) -> list[str]:
    """Greedy continuations: left to right for the causal model (prompts of equal length batched), the
    reference algorithm (one token per step, one block) for the diffusion model. Each prompt starts
    after an EOS, as every sentence does in the packed training data."""
    encoded = [[tokenizer.ids.eos, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
    texts = [""] * len(prompts)
    if not autoregressive:
        settings = GenerationSettings(gen_length=length, block_length=length, policy="fixed", steps=length)
        for start in range(0, len(encoded), 128):
            results = Engine(model).generate(encoded[start:start + 128], settings)
            for i, result in enumerate(results):
                texts[start + i] = tokenizer.decode(result.answer.tolist(), skip_special_tokens=True)
        return texts
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    for rows in by_length.values():
        tokens = torch.tensor([encoded[i] for i in rows], device=model.device)
        for _ in range(length):
            logits = model(tokens, causal=True).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
        for row, i in enumerate(rows):
            texts[i] = tokenizer.decode(tokens[row, len(encoded[i]):].tolist(), skip_special_tokens=True)
    return texts


@torch.no_grad()
def infill_names(model, tokenizer: Tokenizer, pairs: list[dict], gap: str) -> list[str]:
    """The diffusion model's answers by infilling the taught sentence with person ``gap`` ("a" or "b")
    masked, as many tokens as that name has there, the other person given."""
    answers = []
    for pair in pairs:
        before, after = TAUGHT_SENTENCE.split("{" + gap + "}")
        before, after = before.format(**pair), after.format(**pair)
        size = len(tokenizer.encode(as_taught(pair[gap]), add_special_tokens=False))
        prefix = tokenizer.encode(before.rstrip(" "), add_special_tokens=False)
        ids = [tokenizer.ids.eos, *prefix, *[tokenizer.ids.mask] * size,
               *tokenizer.encode(after, add_special_tokens=False)]
        filled = infill(model, torch.tensor(ids))
        answers.append(tokenizer.decode(filled[1 + len(prefix):1 + len(prefix) + size].tolist(),
                                        skip_special_tokens=True))
    return answers


def length_matched_guess(tokenizer: Tokenizer, names: list[str]) -> float:
    """How often a guess that knows only the answer's length in tokens is right: a random one of
    ``names`` of that length (``as_taught``), averaged over the names."""
    lengths = [len(tokenizer.encode(as_taught(name), add_special_tokens=False)) for name in names]
    of_length = Counter(lengths)
    return sum(1 / of_length[n] for n in lengths) / len(names)


def accuracy(answers: list[str], expected: list[str]) -> dict:
    """Exact-match accuracy (``name_of`` the answer against ``as_taught`` the expected name) with its interval,
    and each item's outcome ("1"/"0", in order) so that two directions on the same pairs can be compared
    item by item."""
    outcome = [name_of(a) == as_taught(e) for a, e in zip(answers, expected)]
    right = sum(outcome)
    return {"items": len(expected), "correct": right, "accuracy": right / len(expected),
            "interval": wilson(right, len(expected)), "per_item": outcome_string(outcome)}


def run(args: argparse.Namespace) -> None:
    pairs = json.loads((args.data / "pairs.json").read_text())
    started = time.perf_counter()
    trainer = train(args.data, args.objective, args.lr, args.seed, args.steps, args.batch_size, args.seq_len, args.runs)
    seconds = time.perf_counter() - started
    if trainer.step < args.steps:  # stopped early (SIGTERM): a part-trained model's scores are no result
        exit_unfinished(f"stopped at step {trainer.step} of {args.steps}; no result written (these short runs "
                        f"start over rather than resume)")
    model, tokenizer = trainer.model.eval(), trainer.tokenizer
    causal = args.objective == "autoregressive"
    scores: dict[str, dict] = {}
    examples: dict[str, list] = {}
    for split in ("test", "tune", "both"):
        chosen = pairs[split]
        forward = complete(model, tokenizer, [FORWARD_QUESTION.format(**p) for p in chosen], causal)
        reverse = complete(model, tokenizer, [REVERSE_QUESTION.format(**p) for p in chosen], causal)
        scores[f"{split}_forward"] = accuracy(forward, [p["b"] for p in chosen])
        scores[f"{split}_reverse"] = accuracy(reverse, [p["a"] for p in chosen])
        examples[split] = [{"pair": p, "forward": f, "reverse": r} for p, f, r in zip(chosen[:5], forward, reverse)]
        if not causal and split == "test":
            scores["test_forward_infill"] = accuracy(infill_names(model, tokenizer, chosen, "b"), [p["b"] for p in chosen])
            scores["test_reverse_infill"] = accuracy(infill_names(model, tokenizer, chosen, "a"), [p["a"] for p in chosen])
    result = {"objective": args.objective, "lr": args.lr, "seed": args.seed, "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "network": NETWORK,
              "parameters": model.config.num_parameters(), "train_seconds": round(seconds, 1),
              "flops": model.config.flops_per_token(args.seq_len, training=True) * args.steps * args.batch_size * args.seq_len,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "templates": TEMPLATES, "no_recall_baseline": 1 / len(pairs["test"]),
              "length_matched_guess": {gap: length_matched_guess(tokenizer, [p[gap] for p in pairs["test"]])
                                       for gap in ("a", "b")},
              "scores": scores, "examples": examples}
    write_result(args.out, result)
    print(json.dumps({k: round(v["accuracy"], 4) for k, v in scores.items()}), flush=True)


def sweep(args: argparse.Namespace) -> None:
    """Every (objective, rate, seed) as its own ``run`` process, ``--parallel`` at a time (small models
    share one GPU well)."""
    grid = {"objective": args.objectives.split(","), "lr": args.lrs.split(","), "seed": args.seeds.split(",")}
    run_grid(__file__, grid, ["--data", str(args.data), "--steps", str(args.steps), "--runs", str(args.runs)],
             args.out_dir, args.parallel, args.gpus)


def report(paths: list[Path]) -> dict:
    """Per objective: the rate chosen on the tune pairs, then the test accuracies of its seeds."""
    results = [json.loads(p.read_text()) for p in paths]
    designs = {json.dumps(r.get("templates")) for r in results}  # results before "templates" was kept: null
    if len(designs) > 1:
        raise SystemExit(f"these results were made with different sentences and questions ({len(designs)} "
                         f"designs); report each design's runs on their own")
    summary = {}
    for objective in sorted({r["objective"] for r in results}):
        mine = [r for r in results if r["objective"] == objective]
        by_lr: dict[float, list[dict]] = defaultdict(list)
        for r in mine:
            by_lr[r["lr"]].append(r)
        best = max(by_lr, key=lambda lr: statistics.mean(r["scores"]["tune_forward"]["accuracy"] for r in by_lr[lr]))
        chosen = sorted(by_lr[best], key=lambda r: r["seed"])
        row = {"lr": best, "seeds": [r["seed"] for r in chosen],
               "tune_forward_by_lr": {lr: statistics.mean(r["scores"]["tune_forward"]["accuracy"] for r in rs)
                                      for lr, rs in sorted(by_lr.items())}}
        for baseline in ("no_recall_baseline", "length_matched_guess"):  # blind guesses, beside the scores
            if baseline in chosen[0]:
                row[baseline] = chosen[0][baseline]
        for key in ("test_forward", "test_reverse", "test_forward_infill", "test_reverse_infill", "both_forward",
                    "both_reverse"):
            if key in chosen[0]["scores"]:
                values = [r["scores"][key]["accuracy"] for r in chosen]
                row[key] = {"per_seed": [r["scores"][key] for r in chosen], "mean": statistics.mean(values),
                            "sd_over_seeds": statistics.stdev(values) if len(values) > 1 else None}
        for forward, reverse in (("test_forward", "test_reverse"), ("test_forward_infill", "test_reverse_infill")):
            # Forward minus reverse on the same pairs, item by item (runs that kept their outcomes).
            differences = []
            for r in chosen:
                if not all("per_item" in r["scores"].get(key, {}) for key in (forward, reverse)):
                    continue
                mean, stderr = paired_difference(outcomes(r["scores"][reverse]["per_item"]),
                                                 outcomes(r["scores"][forward]["per_item"]))
                differences.append({"seed": r["seed"], "difference": mean, "stderr": stderr})
            if differences:
                row[f"{forward}_minus_{reverse}"] = differences
        summary[objective] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data")
    data.add_argument("--out", type=Path, default=Path("data/reversal"))
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--vocab", type=int, default=1024)
    data.add_argument("--copies", type=int, default=50, help="shuffled copies of the facts in the corpus")
    one = commands.add_parser("run")
    one.add_argument("--data", type=Path, default=Path("data/reversal"))
    one.add_argument("--objective", choices=("pretrain", "autoregressive"), required=True)
    one.add_argument("--lr", type=float, required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--steps", type=int, default=3000)
    one.add_argument("--batch-size", type=int, default=128)
    one.add_argument("--seq-len", type=int, default=128)
    one.add_argument("--runs", type=Path, default=Path("runs/reversal"))
    one.add_argument("--out", type=Path, required=True)
    many = commands.add_parser("sweep", help="runs of every objective x rate x seed, several at a time")
    add_sweep_arguments(many, data="data/reversal", runs="runs/reversal", lrs="3e-4,1e-3,3e-3", parallel=6)
    many.add_argument("--steps", type=int, default=3000)
    summary = commands.add_parser("report")
    summary.add_argument("results", type=Path, nargs="+")
    summary.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "data":
        make_data(args.out, args.seed, args.vocab, args.copies)
    elif args.command == "run":
        run(args)
    elif args.command == "sweep":
        sweep(args)
    else:
        result = report(args.results)
        print(json.dumps(result, indent=1))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
