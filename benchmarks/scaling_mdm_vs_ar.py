"""Masked diffusion against autoregression at equal compute, over model sizes (GPU).

The paper's scaling comparison at small scale. Data: ``scripts/prepare_scaling_data.py`` (English
prose and Python, held-out documents, 4-way continuation-choice items). For each size in ``SIZES``
the same network is trained from scratch twice on the same data with the same batch, length and
steps — masked diffusion (objective ``pretrain``) and left to right (``autoregressive``, causal
attention) — so both cost the same FLOPs (``ModelConfig.flops_per_token``). A size's steps are set
by its FLOPs budget (``BUDGETS``: 3e15 to 1e17, 33x). Measured per run:

- validation loss along training (the trainer's split of the training stream), which chooses the
  learning rate, and the loss curve against FLOPs;
- test likelihood on the held-out documents, nats per token: for the diffusion model the
  masked-diffusion bound (an upper bound on the negative log-likelihood), for the autoregressive
  model the exact negative log-likelihood — labelled as such everywhere;
- continuation choice (the data's ``choices.json``, ~2,000 items): log p(choice | context), a
  Monte-Carlo ELBO (``--mc-num`` samples) for the diffusion model, exact for the autoregressive one.
  Every choice has the same number of tokens; chance is 25%, the manifest's unigram baseline ~25%.

A run saves a checkpoint every tenth of its steps and on SIGTERM (``timeout``, a scheduler); the
same command, or the sweep, resumes it and counts its training time across the pieces, so a run can
outlast one time-limited command. Only a finished run writes its result file.

``report`` picks each (size, objective)'s rate by validation loss (with where between its
neighbours the optimum probably lies), fits test loss against FLOPs as a power law per objective
(log-log line) and states how much more compute the diffusion model needs to reach the
autoregressive model's loss, with a 95% set from the fit's scatter (Fieller's,
``inverse_prediction``) and the range over leave-one-size-out fits, and where the accuracy lines
cross (with a set from the accuracies' binomial errors, and with each size left out, each placed
against the runs), both in points and in log odds (``ACCURACY_SCALES``: straight lines in points
must break at the 100% ceiling). Runs keep each choice item's outcome, so the objectives' accuracy difference at a
size, and its change from one size to the next, are also given paired on the same items. ``--data``
adds a no-context baseline: the held-out loss of the training tokens' unigram frequencies.

    python scripts/prepare_scaling_data.py --out data/scaling
    python benchmarks/scaling_mdm_vs_ar.py sweep --data data/scaling --sizes xs,s --lrs 1e-3,3e-3 --seeds 0,1 \\
        --out-dir benchmarks/results/eval/scaling
    python benchmarks/scaling_mdm_vs_ar.py sweep --data data/scaling --sizes m,l --lrs 1e-3,3e-3 --parallel 1 ...
    python benchmarks/scaling_mdm_vs_ar.py report benchmarks/results/eval/scaling/*.json --plot docs/scaling_mdm_vs_ar.png
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from inverse_prediction import where_line_reaches
from process_pool import add_sweep_arguments, exit_unfinished, run_grid, write_result
from sample_statistics import outcome_string, outcomes, paired_difference, wilson
from tqdm.auto import tqdm

from llada.diffusion.likelihood import packed_elbo_samples
from llada.model.config import preset
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.checkpoints import checkpoint_dirs
from llada.training.config import METRICS_FILE, load_config
from llada.training.corpus import iter_jsonl
from llada.training.packing import PackedDataset
from llada.training.plot import read_metrics
from llada.training.trainer import Trainer, TrainingError

SIZES: dict[str, dict[str, int]] = {
    "xs": {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 704},
    "s": {"d_model": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 6, "mlp_hidden_size": 1024},
    "m": {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "mlp_hidden_size": 1376},
    "l": {"d_model": 640, "n_layers": 10, "n_heads": 10, "n_kv_heads": 10, "mlp_hidden_size": 1728},
}
BUDGETS = {"xs": 3e15, "s": 1e16, "m": 3e16, "l": 1e17}  # training FLOPs per run
OBJECTIVES = ("pretrain", "autoregressive")
LABELS = {"pretrain": "masked diffusion (ELBO bound)", "autoregressive": "autoregressive (exact NLL)"}


def steps_for(size: str, flops_per_token: float, tokens_per_step: int) -> int:
    return math.ceil(BUDGETS[size] / (flops_per_token * tokens_per_step))


@torch.no_grad()
def choice_scores(model: LLaDAModel, item: dict, autoregressive: bool, mc_num: int,
                  generator: torch.Generator) -> list[float]:
    """log p(choice | context) for each choice: exact under the causal model, the Monte-Carlo ELBO
    under the diffusion model."""
    context = torch.tensor(item["context"], device=model.device)
    choices = torch.tensor(item["choices"], device=model.device)
    if autoregressive:
        sequences = torch.cat([context.expand(len(choices), -1), choices], dim=1)
        logits = model(sequences, causal=True).logits[:, len(context) - 1:-1].float()
        return logits.log_softmax(-1).gather(2, choices[..., None]).squeeze(-1).sum(1).tolist()
    # The four choices' samples in one pass: the estimator (and draws) of log_likelihood with
    # batch_size=mc_num called on each choice in turn, at a quarter of the forward passes.
    samples = packed_elbo_samples(model, [(context, choice) for choice in choices], mc_num, generator=generator)
    return [float(values.double().mean()) for values in samples]


def downstream(model: LLaDAModel, items: list[dict], autoregressive: bool, mc_num: int) -> dict:
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(0)
    right: dict[str, list[bool]] = defaultdict(list)
    outcome = []
    for item in tqdm(items, desc="continuation choice", unit="item"):
        scores = choice_scores(model, item, autoregressive, mc_num, generator)
        outcome.append(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        right[item["source"]].append(outcome[-1])
    correct = sum(outcome)
    return {"items": len(items), "correct": correct, "accuracy": correct / len(items),
            "interval": wilson(correct, len(items)),
            "per_item": outcome_string(outcome),  # for paired comparisons on these items
            "by_source": {source: {"items": len(v), "accuracy": sum(v) / len(v)} for source, v in sorted(right.items())}}


def add_training_seconds(out_dir: Path, seconds: float) -> float:
    """Add one segment's training time to the run's total (a run may be stopped and resumed) and return
    the total."""
    file = out_dir / "training_seconds.json"
    total = (json.loads(file.read_text())["seconds"] if file.is_file() else 0.0) + seconds
    file.write_text(json.dumps({"seconds": total}) + "\n")
    return total


def rollbacks(out_dir: Path) -> int:
    """How many times the run went back to a checkpoint after a loss spike (each lowers its rate). The
    records are skipped steps, which ``read_metrics`` leaves out, so the file is read whole."""
    return sum(1 for _, record in iter_jsonl(out_dir / METRICS_FILE) if record.get("rollback"))


def run(args: argparse.Namespace) -> None:
    manifest = json.loads((args.data / "manifest.json").read_text())
    choices = (args.data / "choices.json").read_bytes()  # scored at the end; fingerprinted as read
    choices_sha256 = hashlib.sha256(choices).hexdigest()
    tokens_per_step = args.batch_size * args.seq_len
    vocabulary = Tokenizer.from_pretrained(args.data / "tokenizer").vocab_size
    network = preset(load_config(args.config).model.preset, vocab_size=vocabulary, embedding_size=vocabulary,
                     **SIZES[args.size])
    steps = args.steps or steps_for(args.size, network.flops_per_token(args.seq_len, training=True), tokens_per_step)
    tenth = max(1, steps // 10)  # evaluations and checkpoints
    # The name holds everything that sets the run's schedule and its data, so a quick check (--steps),
    # another batch or a rebuilt corpus never resumes into (or from) a study run.
    out_dir = args.runs / (f"{args.size}-{args.objective}-lr{args.lr:g}-seed{args.seed}-{steps}x{args.batch_size}"
                           f"x{args.seq_len}-{manifest['train_documents_sha256'][:8]}")
    if not checkpoint_dirs(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)  # a run that never saved starts over; one that did resumes
    overrides = [f"objective={args.objective}", f"model.tokenizer={args.data / 'tokenizer'}",
                 f"data.path={args.data / 'train'}", f"data.seq_len={args.seq_len}", "data.eval_fraction=0.005",
                 f"steps={steps}", f"batch_size={args.batch_size}", f"optim.lr={args.lr}",
                 f"optim.warmup_steps={max(1, steps // 20)}", f"seed={args.seed}", f"out_dir={out_dir}",
                 f"eval_every={tenth}", "eval_batches=8", f"save_every={tenth}",
                 "keep_last=1", "sample_every=0",
                 f"model.overrides={json.dumps(SIZES[args.size])}", f"compile={torch.cuda.is_available()}"]
    if args.objective == "autoregressive":
        overrides.append("data.random_length_probability=0")  # a causal model sees every prefix anyway
    trainer = Trainer(load_config(args.config, overrides))
    started = time.perf_counter()
    try:
        trainer.run()
    except TrainingError as error:  # diverged before its first checkpoint: a finished run, and a bad rate
        write_result(args.out, {"size": args.size, "objective": args.objective, "lr": args.lr, "seed": args.seed,
                                "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                "mc_num": args.mc_num, "diverged": str(error), "val_loss": None,
                                "data": {"train_documents_sha256": manifest["train_documents_sha256"],
                                         "choices_sha256": choices_sha256}})
        raise SystemExit(f"{out_dir}: diverged ({error}); recorded in {args.out}") from error
    seconds = add_training_seconds(out_dir, time.perf_counter() - started)
    if trainer.step < steps:  # SIGTERM (e.g. a time limit): the trainer saved; the next run resumes
        exit_unfinished(f"{out_dir}: stopped at step {trainer.step} of {steps} with a checkpoint; run again to resume")
    model = trainer.model
    flops_per_token = model.config.flops_per_token(args.seq_len, training=True)
    curve = [{"step": r["step"], "flops": flops_per_token * tokens_per_step * r["step"], "val_loss": r["eval_loss"]}
             for r in read_metrics(out_dir) if r.get("eval_loss") is not None]  # all segments of a resumed run
    heldout = PackedDataset(args.data / "heldout_tokens", args.seq_len)
    # Whole batches only: a last partial one would wrap around and count some sequences twice.
    test_loss = trainer.evaluate(heldout, batches=max(1, len(heldout) // trainer.micro_batch_size))["eval_loss"]
    items = json.loads(choices)
    result = {"size": args.size, "objective": args.objective, "lr": args.lr, "seed": args.seed, "steps": steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "architecture": SIZES[args.size],
              "parameters": model.config.num_parameters(),
              "non_embedding_parameters": model.config.num_parameters(include_embedding=False),
              "tokens": tokens_per_step * steps, "flops": flops_per_token * tokens_per_step * steps,
              "epochs": tokens_per_step * steps / manifest["train_tokens"], "train_seconds": round(seconds, 1),
              "rollbacks": rollbacks(out_dir), "lr_scale": trainer.lr_scale,  # below 1 after rollbacks
              "val_loss": curve[-1]["val_loss"] if curve else None, "test_loss": test_loss,
              "test_loss_kind": LABELS[args.objective], "mc_num": args.mc_num,
              "choice": downstream(model, items, args.objective == "autoregressive", args.mc_num), "curve": curve,
              "data": {**{k: manifest[k] for k in ("train_tokens", "train_documents_sha256", "tokenizer_sha256",
                                                   "unigram_baseline")},
                       "choices_sha256": choices_sha256},
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    write_result(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "choice")}), flush=True)


def items_sha256(data: Path) -> str:
    """The choice items' fingerprint: the same corpus can be paired with items built by other code."""
    return hashlib.sha256((data / "choices.json").read_bytes()).hexdigest()


def check_finished_runs(out_dir: Path, manifest: dict, choices_sha256: str, args: argparse.Namespace) -> None:
    """A sweep skips every point whose result file exists, so the results already in ``out_dir`` must come
    from the same corpus, items and settings; SystemExit naming the first that does not. (Results from
    before the items' fingerprint was recorded carry none and are checked on the rest.)"""
    wanted = {"batch_size": args.batch_size, "seq_len": args.seq_len, "mc_num": args.mc_num,
              "train_documents_sha256": manifest["train_documents_sha256"], "choices_sha256": choices_sha256}
    for path in sorted(out_dir.glob("*.json")) if out_dir.is_dir() else []:
        if path.name == "report.json":
            continue
        result = json.loads(path.read_text())
        found = {**{key: result.get(key) for key in ("batch_size", "seq_len", "mc_num")},
                 **{key: result.get("data", {}).get(key) for key in ("train_documents_sha256", "choices_sha256")}}
        found["choices_sha256"] = found["choices_sha256"] or choices_sha256
        if found != wanted:
            differ = {key: (found[key], wanted[key]) for key in wanted if found[key] != wanted[key]}
            raise SystemExit(f"{path} was made with other settings or data ({differ}, found -> wanted); "
                             f"use another --out-dir")


def sweep(args: argparse.Namespace) -> None:
    """Every (size, objective, rate, seed) as its own ``run`` process."""
    if unknown := set(args.sizes.split(",")) - set(SIZES):
        raise SystemExit(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")
    grid = {"size": args.sizes.split(","), "objective": args.objectives.split(","), "lr": args.lrs.split(","),
            "seed": args.seeds.split(",")}
    options = ["--data", str(args.data), "--runs", str(args.runs), "--mc-num", str(args.mc_num),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    check_finished_runs(args.out_dir, json.loads((args.data / "manifest.json").read_text()), items_sha256(args.data),
                        args)
    run_grid(__file__, grid, options, args.out_dir, args.parallel, args.gpus)


def power_law(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of log(loss) = intercept + slope * log(FLOPs), least squares."""
    slope, intercept = statistics.linear_regression([math.log(c) for c, _ in points], [math.log(v) for _, v in points])
    return intercept, slope


def compute_multiplier(diffusion: list[tuple[float, float]],
                       autoregressive: list[tuple[float, float]]) -> list[float | None]:
    """For each autoregressive (FLOPs, loss): the FLOPs the diffusion fit needs for that loss, divided
    by the autoregressive FLOPs; None where no FLOPs do (a fit that does not fall with compute, or a
    multiplier beyond 1e300)."""
    intercept, slope = power_law(diffusion)
    multipliers: list[float | None] = []
    for flops, loss in autoregressive:
        exponent = (math.log(loss) - intercept) / slope - math.log(flops) if slope < 0 else math.inf
        multipliers.append(math.exp(exponent) if exponent < 690 else None)
    return multipliers


def exp_or_none(exponent: float, base: float = math.e) -> float | None:
    """base ** exponent, or None beyond 1e300 (an interval's end that no float holds or study reaches)."""
    return base ** exponent if exponent * math.log10(base) < 300 else None


def multiplier_sets(diffusion: list[tuple[float, float]],
                    autoregressive: list[tuple[float, float]]) -> dict[str, list]:
    """For each autoregressive (FLOPs, loss): the 95% set of ``compute_multiplier``, from the diffusion
    power law's scatter about its points (Student's t on n - 2 degrees of freedom, so three sizes give
    one). ``compute_multiplier_interval``: the bounded set, None where it is not bounded (the fit's
    slope not clearly non-zero at that level), and then ``compute_multiplier_excluded`` is the range
    it leaves out (None if none). Both are None throughout with two sizes (no scatter to go on) or a
    fit that does not fall with compute (no multiplier). An end beyond 1e300 is None."""
    none = [None] * len(autoregressive)
    if len(diffusion) < 3 or power_law(diffusion)[1] >= 0:
        return {"compute_multiplier_interval": none, "compute_multiplier_excluded": list(none)}
    log_flops = [math.log(c) for c, _ in diffusion]
    log_losses = [math.log(v) for _, v in diffusion]
    sets: dict[str, list] = {"compute_multiplier_interval": [], "compute_multiplier_excluded": []}
    for flops, loss in autoregressive:
        reach = where_line_reaches(log_flops, log_losses, math.log(loss))
        for key, ends in zip(sets, (reach.interval, reach.excluded)):
            sets[key].append(None if ends is None else [exp_or_none(end - math.log(flops)) for end in ends])
    return sets


def mean_val_loss(runs: list[dict]) -> float:
    """The runs' mean validation loss; a run without a finite one (diverged) counts as infinitely bad."""
    losses = [r["val_loss"] for r in runs]
    return statistics.mean(losses) if all(v is not None and math.isfinite(v) for v in losses) else math.inf


def grouped_by_rate(results: list[dict]) -> dict[tuple[str, str], dict[float, list[dict]]]:
    grouped: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        grouped[result["size"], result["objective"]][result["lr"]].append(result)
    return grouped


def best_runs(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per (size, objective), the runs (all seeds) of the rate with the lowest mean validation loss; a
    (size, objective) whose every rate diverged has none."""
    chosen = {key: min(by_lr.values(), key=mean_val_loss) for key, by_lr in grouped_by_rate(results).items()}
    return {key: runs for key, runs in chosen.items() if math.isfinite(mean_val_loss(runs))}


def smallest_first(chosen: dict[tuple[str, str], list[dict]]) -> list[tuple[tuple[str, str], list[dict]]]:
    """``best_runs``'s entries by size (smallest budget first), then objective: the report's order."""
    return sorted(chosen.items(), key=lambda item: (BUDGETS[item[0][0]], item[0][1]))


def chosen_sizes(chosen: dict[tuple[str, str], list[dict]]) -> list[str]:
    """The sizes with a chosen rate for either objective, smallest first."""
    return sorted({size for size, _ in chosen}, key=BUDGETS.__getitem__)


def rates_at_the_edge(results: list[dict], chosen: dict[tuple[str, str], list[dict]]) -> list[str]:
    """The (size/objective)s whose chosen rate (``best_runs``) is the lowest or highest tried (or the only
    one): a better one may lie outside."""
    grouped = grouped_by_rate(results)
    edges = []
    for (size, objective), runs in chosen.items():
        rates = sorted(grouped[size, objective])
        if runs[0]["lr"] in (rates[0], rates[-1]):
            edges.append(f"{size}/{objective}: {runs[0]['lr']:g} of {rates}")
    return sorted(edges)


def rate_optima(results: list[dict], chosen: dict[tuple[str, str], list[dict]]) -> dict[str, float | None]:
    """Per (size/objective) whose chosen rate has a tried rate on each side: where a parabola through
    the three mean validation losses, against log10(rate), has its minimum. A sweep on a grid can only
    say which grid point won; this says where between the neighbours the optimum probably lies (and so
    which rates a larger size should try). Each point is its rate's mean over the seeds it has, which
    may differ between the three. None where a neighbour diverged (no finite loss) or on an exact tie
    (the chosen rate's loss is the lowest, so otherwise the parabola curves upwards). Smallest size
    first."""
    grouped = grouped_by_rate(results)
    optima: dict[str, float | None] = {}
    for (size, objective), runs in smallest_first(chosen):
        rates = sorted(grouped[size, objective])
        at = rates.index(runs[0]["lr"])
        if 0 < at < len(rates) - 1:
            points = [(math.log10(r), mean_val_loss(grouped[size, objective][r])) for r in rates[at - 1:at + 2]]
            optima[f"{size}/{objective}"] = parabola_minimum(points)
    return optima


def parabola_minimum(points: list[tuple[float, float]]) -> float | None:
    """10 ** x at the minimum of the parabola through three (x, y) points with distinct x; None if it
    opens downwards or is a line (no minimum), or if a point is infinite (a diverged rate)."""
    (x0, y0), (x1, y1), (x2, y2) = points
    if not all(math.isfinite(y) for y in (y0, y1, y2)):
        return None
    # Divided differences: y = y0 + d1 (x - x0) + d2 (x - x0)(x - x1); its derivative vanishes where
    # d1 + d2 (2x - x0 - x1) = 0.
    d1 = (y1 - y0) / (x1 - x0)
    d2 = ((y2 - y1) / (x2 - x1) - d1) / (x2 - x0)
    return 10 ** ((x0 + x1) / 2 - d1 / (2 * d2)) if d2 > 0 else None


# Accuracy lines are fitted on two scales. In points a straight line must break at 100%; a model
# nearer its ceiling gains fewer points for the same progress, so a gap in points narrows as the
# leader saturates even when both models cut their error at the same rate. In logits (log odds) a
# constant relative improvement of the odds is a straight line that never reaches 100%.
ACCURACY_SCALES = ("points", "logit")


def on_scale(row: dict, scale: str) -> tuple[float, float]:
    """A row's accuracy on ``scale`` with its standard error over the items: binomial in points; in
    logits the empirical logit log((k + 1/2) / (n - k + 1/2)) of k right of n, whose variance is
    1/(k + 1/2) + 1/(n - k + 1/2), finite at 0% and 100% too."""
    accuracy, items = row["accuracy"], row["items"]
    if scale == "points":
        return accuracy, math.sqrt(accuracy * (1 - accuracy) / items)
    if scale != "logit":
        raise ValueError(f"unknown accuracy scale {scale!r}; expected one of {ACCURACY_SCALES}")
    right, wrong = accuracy * items + 0.5, (1 - accuracy) * items + 0.5
    return math.log(right / wrong), math.sqrt(1 / right + 1 / wrong)


def accuracy_line(rows: list[dict], scale: str = "points") -> tuple[float, float]:
    """(intercept, slope per decade) of accuracy on ``scale`` against log10(FLOPs), least squares."""
    slope, intercept = statistics.linear_regression([math.log10(r["flops"]) for r in rows],
                                                    [on_scale(r, scale)[0] for r in rows])
    return intercept, slope


def accuracy_crossing(diffusion: tuple[float, float], autoregressive: tuple[float, float]) -> float | None:
    """The FLOPs where the two accuracy lines meet; None if they are parallel, or so nearly parallel
    that they meet beyond 1e±300 FLOPs (no float holds it, and no study could reach it)."""
    (a1, b1), (a2, b2) = diffusion, autoregressive
    if b1 == b2 or abs(decade := (a2 - a1) / (b1 - b2)) > 300:
        return None
    return 10 ** decade


def where_in_runs(flops: float | None, run_flops: list[float]) -> str:
    """Whether a crossing lies ahead of the runs (the model behind is catching up), among them, or
    behind them (the lines move apart over the runs: the one behind falls further behind)."""
    if flops is None:
        return "parallel: no crossing"
    if flops < min(run_flops):
        return "below the smallest run: the lines move apart"
    if flops <= max(run_flops):
        return "within the runs"
    return "beyond the largest run: the one behind is catching up (extrapolated)"


def shared_sizes(rows: list[dict]) -> list[str]:
    """The sizes with a result for both objectives, smallest first."""
    return sorted(set.intersection(*({r["size"] for r in rows if r["objective"] == o} for o in OBJECTIVES)),
                  key=BUDGETS.__getitem__)


def crossings(rows: list[dict], sizes: list[str], scale: str = "points") -> dict:
    """Where the accuracy lines on ``scale`` cross, fitted on ``sizes`` (those both objectives have);
    with three or more, also with each size left out in turn (each with its place against the runs,
    since crossings on different sides of the runs mean different things and make no range). Keys
    start ``accuracy_`` in points and ``accuracy_logit_`` in logits."""

    def crossing(kept: list[str]) -> dict:
        mine = [r for r in rows if r["size"] in kept]
        lines = [accuracy_line([r for r in mine if r["objective"] == o], scale) for o in OBJECTIVES]
        flops = accuracy_crossing(*lines)
        return {"flops": flops, "where": where_in_runs(flops, [r["flops"] for r in mine]), "lines": lines}

    prefix = "accuracy_" if scale == "points" else f"accuracy_{scale}_"
    whole = crossing(sizes)
    summary: dict = {f"{prefix}lines": {o: {"intercept": a, "slope_per_decade": b}
                                        for o, (a, b) in zip(OBJECTIVES, whole["lines"])},
                     f"{prefix}crossing_flops": whole["flops"], f"{prefix}crossing_where": whole["where"],
                     **{prefix + key: value for key, value in crossing_interval(rows, sizes, scale).items()}}
    if len(sizes) >= 3:
        summary[f"{prefix}crossing_leave_one_out"] = [
            {"left_out": left, **{k: v for k, v in crossing([s for s in sizes if s != left]).items() if k != "lines"}}
            for left in sizes]
    return summary


def accuracy_gap(by_key: dict[tuple[str, str], dict], size: str, scale: str) -> tuple[float, float]:
    """The autoregressive minus the diffusion accuracy at ``size`` on ``scale``, and its standard error
    with the two objectives' outcomes treated as independent."""
    (diffusion, diffusion_error), (autoregressive, autoregressive_error) = (
        on_scale(by_key[size, o], scale) for o in OBJECTIVES)
    return autoregressive - diffusion, math.hypot(diffusion_error, autoregressive_error)


def crossing_interval(rows: list[dict], sizes: list[str], scale: str = "points") -> dict:
    """Where the accuracy lines on ``scale`` cross, with its 95% set: where the line of the gap
    (autoregressive minus diffusion, per size) reaches 0, given each gap's standard error over the
    items (``on_scale``). It treats the two objectives' outcomes as independent, which overstates the
    error (they are the same items), and ignores that every size shares the items and that seeds
    differ. It assumes the straight lines are right, so it covers sampling noise, not misfit.

    ``crossing_interval``: the bounded set, in FLOPs (an end beyond 1e300 is None); None when the
    gap's slope is not clearly non-zero, and then ``crossing_excluded`` is the range of FLOPs the set
    leaves out (None if it leaves none)."""
    by_key = {(r["size"], r["objective"]): r for r in rows}
    gaps, errors = zip(*(accuracy_gap(by_key, size, scale) for size in sizes))
    reach = where_line_reaches([math.log10(by_key[size, "pretrain"]["flops"]) for size in sizes], list(gaps), 0.0,
                               list(errors))

    def in_flops(ends: tuple[float, float] | None) -> list[float | None] | None:
        return None if ends is None else [exp_or_none(end, 10.0) for end in ends]

    return {"crossing_interval": in_flops(reach.interval), "crossing_excluded": in_flops(reach.excluded)}


def paired_accuracy_differences(chosen: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Per size and seed where both objectives' chosen runs kept their per-item outcomes: autoregressive
    minus diffusion accuracy on the same items (``difference``), with the paired standard error (the
    items' own difficulty cancels, so it is tighter than two separate intervals suggest). Runs are
    paired by seed number; a seed only one objective has, or a run from before outcomes were kept, is
    left out."""
    differences = []
    for size in chosen_sizes(chosen):
        by_seed = [{r["seed"]: r["choice"].get("per_item") for r in chosen.get((size, o), [])} for o in OBJECTIVES]
        for seed in sorted(set(by_seed[0]) & set(by_seed[1])):
            diffusion, autoregressive = by_seed[0][seed], by_seed[1][seed]
            if diffusion and autoregressive:
                mean, stderr = paired_difference(outcomes(diffusion), outcomes(autoregressive))
                differences.append({"size": size, "seed": seed, "difference": mean, "stderr": stderr})
    return differences


def paired_gap_changes(chosen: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """How the autoregressive lead in accuracy changes from one size to the next, paired item by item:
    per item, (autoregressive - diffusion) at the larger size minus the same at the smaller, each
    objective's outcome averaged over its chosen runs' seeds. ``change`` < 0: the gap narrows. The
    items are the same at every size, so their own difficulty cancels, which two sizes' separate
    gaps cannot do; ``stderr`` is over the items only (seed-to-seed variation enters only through
    the averages). Only sizes whose chosen runs of both objectives all kept per-item outcomes count,
    and each is compared with the next smaller such size."""
    def item_gaps(size: str) -> list[float] | None:
        means = []
        for objective in OBJECTIVES:
            texts = [r["choice"].get("per_item") for r in chosen.get((size, objective), [])]
            if not texts or not all(texts):
                return None
            if len({len(t) for t in texts}) > 1:
                raise ValueError(f"{size}/{objective}: seeds scored different numbers of items "
                                 f"({sorted({len(t) for t in texts})})")
            means.append([statistics.fmean(column) for column in zip(*(outcomes(t) for t in texts))])
        return [autoregressive - diffusion for diffusion, autoregressive in zip(*means)]

    gaps = [(size, g) for size in chosen_sizes(chosen) if (g := item_gaps(size)) is not None]
    changes = []
    for (smaller, before), (larger, after) in itertools.pairwise(gaps):
        change, stderr = paired_difference(before, after)
        changes.append({"from": smaller, "to": larger, "change": change, "stderr": stderr})
    return changes


def check_same_items(results: list[dict]) -> None:
    """Paired figures compare runs item by item, so every run must have been scored on the same items;
    ValueError naming two that were not. (Runs from before the fingerprint was recorded carry none.)"""
    first: dict[str, str] = {}
    for r in results:
        if fingerprint := r.get("data", {}).get("choices_sha256"):
            first.setdefault(fingerprint, f"{r['size']}/{r['objective']} lr {r['lr']:g} seed {r['seed']}")
    if len(first) > 1:
        raise ValueError(f"these results were scored on different choice items: {sorted(first.values())}")


def report(results: list[dict]) -> dict:
    check_same_items(results)
    chosen = best_runs(results)
    rows = []
    for (size, objective), runs in smallest_first(chosen):
        accuracies = [r["choice"]["accuracy"] for r in runs]
        losses = [r["test_loss"] for r in runs]
        rows.append({"size": size, "objective": objective, "lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs],
                     "flops": runs[0]["flops"], "epochs": runs[0]["epochs"],
                     "rollbacks": sum(r.get("rollbacks", 0) for r in runs),
                     "non_embedding_parameters": runs[0]["non_embedding_parameters"],
                     "test_loss": statistics.mean(losses), "test_loss_kind": LABELS[objective],
                     "test_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
                     "accuracy": statistics.mean(accuracies), "interval_seed0": runs[0]["choice"]["interval"],
                     "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                     "items": runs[0]["choice"]["items"]})
    summary: dict = {"rows": rows, "lr_by_size": {f"{s}/{o}": runs[0]["lr"] for (s, o), runs in chosen.items()},
                     "rate_at_edge_of_sweep": rates_at_the_edge(results, chosen),
                     "rate_optimum_estimates": rate_optima(results, chosen),
                     "paired_accuracy_differences": paired_accuracy_differences(chosen),
                     "paired_gap_changes": paired_gap_changes(chosen),
                     "diverged_runs": sorted(f"{r['size']}/{r['objective']} lr {r['lr']:g} seed {r['seed']}"
                                             for r in results if r.get("diverged"))}
    points = {o: [(r["flops"], r["test_loss"]) for r in rows if r["objective"] == o] for o in OBJECTIVES}
    if all(len(points[o]) >= 2 for o in OBJECTIVES):
        summary["power_law"] = {o: dict(zip(("log_intercept", "slope"), power_law(points[o]))) for o in OBJECTIVES}
        summary["compute_multiplier"] = compute_multiplier(points["pretrain"], points["autoregressive"])
        summary.update(multiplier_sets(points["pretrain"], points["autoregressive"]))
        if len(points["pretrain"]) >= 3:  # the spread when one size at a time is left out of the fit
            spread = [m for i in range(len(points["pretrain"])) for m in
                      compute_multiplier(points["pretrain"][:i] + points["pretrain"][i + 1:], points["autoregressive"])]
            summary["compute_multiplier_range"] = [min(spread), max(spread)] if None not in spread else None
    by_key = {(r["size"], r["objective"]): r for r in rows}
    sizes = shared_sizes(rows)
    # The ratio, not the difference, is what a common power-law slope keeps constant.
    summary["loss_ratio_by_size"] = {
        size: by_key[size, "pretrain"]["test_loss"] / by_key[size, "autoregressive"]["test_loss"] for size in sizes}
    # The autoregressive lead per size on both scales (see ACCURACY_SCALES), each ± its standard error.
    summary["accuracy_gap_by_size"] = {size: {scale: dict(zip(("gap", "stderr"), accuracy_gap(by_key, size, scale)))
                                              for scale in ACCURACY_SCALES} for size in sizes}
    if len(sizes) >= 2:
        summary["accuracy_sizes"] = sizes
        for scale in ACCURACY_SCALES:
            summary.update(crossings(rows, sizes, scale))
    return summary


def unigram_test_loss(data: Path) -> float:
    """Nats per token of the held-out tokens under the training tokens' frequencies (add-one smoothed):
    the loss of a model that ignores all context, a reference both objectives should beat. It is an
    exact NLL, so it compares directly with the autoregressive NLL and with the diffusion bound."""
    vocabulary = Tokenizer.from_pretrained(data / "tokenizer").vocab_size
    log_frequency = PackedDataset(data / "train", 1).unigram_log_probabilities(vocabulary)
    heldout = PackedDataset(data / "heldout_tokens", 1).token_counts(vocabulary)
    return float(-(heldout * log_frequency).sum() / heldout.sum())


def plot(results: list[dict], summary: dict, output: Path, unigram: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, task_axis, gap_axis) = plt.subplots(1, 3, figsize=(17, 5.5))
    colours = dict(zip(SIZES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    chosen = best_runs(results)
    for (size, objective), runs in chosen.items():
        style = "-" if objective == "pretrain" else "--"
        curve = runs[0]["curve"]
        loss_axis.plot([p["flops"] for p in curve], [p["val_loss"] for p in curve], style, color=colours[size],
                       alpha=0.7, label=f"{size} ({runs[0]['non_embedding_parameters'] / 1e6:.0f}M) "
                       f"{LABELS[objective].split(' (')[0]}")
    for objective, marker in (("pretrain", "o"), ("autoregressive", "s")):
        rows = [r for r in summary["rows"] if r["objective"] == objective]
        loss_axis.plot([r["flops"] for r in rows], [r["test_loss"] for r in rows], marker, color="black",
                       fillstyle="full" if marker == "o" else "none", label=f"test: {LABELS[objective]}")
        task_axis.errorbar([r["flops"] for r in rows], [100 * r["accuracy"] for r in rows],
                           # the mean over seeds, ± half the width of one seed's 95% interval on these items
                           yerr=[50 * (r["interval_seed0"][1] - r["interval_seed0"][0]) for r in rows],
                           fmt=marker + ("-" if objective == "pretrain" else "--"), capsize=3, color="black",
                           fillstyle="full" if marker == "o" else "none", label=LABELS[objective].split(" (")[0])
        if objective in summary.get("power_law", {}):  # a straight line on these axes: its two ends suffice
            fit = summary["power_law"][objective]
            ends = [min(r["flops"] for r in rows), max(r["flops"] for r in rows)]
            loss_axis.plot(ends, [math.exp(fit["log_intercept"]) * c ** fit["slope"] for c in ends],
                           "-" if objective == "pretrain" else "--", color="black", linewidth=0.8,
                           label=f"test fit: {LABELS[objective].split(' (')[0]}, slope {fit['slope']:.3f}")
    if "unigram_test_loss" in summary:
        loss_axis.axhline(summary["unigram_test_loss"], color="grey", linewidth=0.8, linestyle=":",
                          label=f"test: unigram frequencies, no context ({summary['unigram_test_loss']:.2f})")
    loss_axis.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="nats / token",
                  title="Validation curves (best rate) and held-out test loss")
    task_axis.axhline(25, color="grey", linewidth=0.8, linestyle=":", label="chance 25%")
    if unigram is not None:
        task_axis.axhline(100 * unigram, color="tab:red", linewidth=0.8, linestyle=":",
                          label=f"unigram baseline {100 * unigram:.1f}%")
    task_axis.set(xscale="log", xlabel="training FLOPs", ylabel="accuracy (%)")
    task_axis.set_title(f"Continuation choice, {summary['rows'][0]['items']} items "
                        f"(seed mean, ± one seed's 95% interval)", fontsize=10)
    gap_by_size = summary.get("accuracy_gap_by_size", {})
    if gap_by_size:  # the lead in log odds, where a constant relative gain of the odds is a straight line
        flops = {r["size"]: r["flops"] for r in summary["rows"]}
        sizes = list(gap_by_size)
        gap_axis.errorbar([flops[size] for size in sizes], [gap_by_size[size]["logit"]["gap"] for size in sizes],
                          yerr=[1.96 * gap_by_size[size]["logit"]["stderr"] for size in sizes], fmt="D", capsize=3,
                          color="black", label="autoregressive minus diffusion (± 95%)")
        if "accuracy_logit_lines" in summary:
            lines = summary["accuracy_logit_lines"]
            ends = [min(flops.values()), max(flops.values())]
            gap_axis.plot(ends, [sum(sign * (lines[o]["intercept"] + lines[o]["slope_per_decade"] * math.log10(c))
                                     for sign, o in ((-1, "pretrain"), (1, "autoregressive"))) for c in ends],
                          color="black", linewidth=0.8, label="difference of the fitted lines")
    gap_axis.axhline(0, color="grey", linewidth=0.8, linestyle=":", label="equal accuracy")
    gap_axis.set(xscale="log", xlabel="training FLOPs", ylabel="difference in log odds of a right answer")
    gap_axis.set_title("The autoregressive lead in log odds", fontsize=10)
    loss_axis.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    task_axis.legend(fontsize=7)
    gap_axis.legend(fontsize=7)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="train and score one size x objective x rate x seed")
    one.add_argument("--data", type=Path, default=Path("data/scaling"))
    one.add_argument("--size", choices=list(SIZES), required=True)
    one.add_argument("--objective", choices=OBJECTIVES, required=True)
    one.add_argument("--lr", type=float, required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--batch-size", type=int, default=64)
    one.add_argument("--seq-len", type=int, default=512)
    one.add_argument("--steps", type=int, help="override the size's budget (a quick check, not the study)")
    one.add_argument("--mc-num", type=int, default=32, help="ELBO samples per diffusion score")
    one.add_argument("--config", default="configs/demo_pretrain.yaml", help="recipe the runs start from")
    one.add_argument("--runs", type=Path, default=Path("runs/scaling"))
    one.add_argument("--out", type=Path, required=True)
    many = commands.add_parser("sweep", help="runs of every size x objective x rate x seed, several at a time")
    add_sweep_arguments(many, data="data/scaling", runs="runs/scaling", lrs="1e-3,3e-3", parallel=2)
    many.add_argument("--sizes", default=",".join(SIZES))
    many.add_argument("--mc-num", type=int, default=32)
    many.add_argument("--batch-size", type=int, default=64, help="sequences per step (the same for both objectives)")
    many.add_argument("--seq-len", type=int, default=512)
    summary = commands.add_parser("report")
    summary.add_argument("results", type=Path, nargs="+")
    summary.add_argument("--out", type=Path)
    summary.add_argument("--plot", type=Path)
    summary.add_argument("--data", type=Path, help="the corpus folder: adds the unigram baseline's test loss")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "sweep":
        sweep(args)
    else:
        results = [json.loads(path.read_text()) for path in args.results if path.name != "report.json"]
        try:
            result = report(results)
        except ValueError as error:  # results that cannot be compared: say which, without a traceback
            raise SystemExit(f"report: {error}") from error
        if args.data:
            result["unigram_test_loss"] = unigram_test_loss(args.data)
        print(json.dumps(result, indent=1))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        if args.plot:
            plot(results, result, args.plot, results[0]["data"]["unigram_baseline"])


if __name__ == "__main__":
    main()
