"""Masked diffusion against autoregression at equal compute, over several model sizes (GPU).

The paper's scaling claim at small scale: for each model size, train the same network on the same
data for the same number of tokens twice — once with the masked-diffusion objective, once left to
right (objective ``autoregressive``, causal attention) — so both runs cost the same FLOPs (counted
identically, by ``ModelConfig.flops_per_token``). Compare

- the held-out likelihood bound, in nats per token, along training: the masked-diffusion bound
  (the pretraining loss on held-out sequences, an upper bound on the negative log-likelihood) and
  the autoregressive model's exact negative log-likelihood;
- a downstream task at the end: WordNet definitions the models read in pretraining, asked as
  4-way multiple choice ("word:" followed by the right gloss or a random other one), scored by the
  conditional log-likelihood — a Monte-Carlo ELBO for the diffusion model, exact for the
  autoregressive one. Chance is 25%; sums of log-likelihoods favour short answers, and always
  picking the answer of fewest tokens scores 28.5% on the default 200 questions (printed and drawn).

and plot both against training FLOPs (one colour per size, solid = diffusion, dashed = autoregressive).

    python scripts/prepare_demo_data.py --out data/demo --tokenizer-vocab 8192
    python benchmarks/scaling_mdm_vs_ar.py --out-dir benchmarks/results/eval/scaling \
        --plot docs/scaling_mdm_vs_ar.png
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from llada.diffusion.likelihood import log_likelihood
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.config import load_config
from llada.training.trainer import Trainer

# Changes to the demo preset: the former demo shape (d_model 384, 6 layers, 6 heads, MLP 1024) and
# about 0.4x and 2.4x its non-embedding parameters.
SIZES: dict[str, dict[str, int]] = {
    "s": {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 704},
    "m": {"d_model": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 6, "mlp_hidden_size": 1024},
    "l": {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "mlp_hidden_size": 1376},
}
OBJECTIVES = ("pretrain", "autoregressive")
HELD_OUT_GLOSS_FRACTION = 0.05  # the pretraining split's held-out tail lies in the last ~2% of the glosses


def gloss_questions(glosses_file: Path, count: int, seed: int = 0) -> list[dict]:
    """4-way questions about glosses from the trained part of the gloss file (distractors: other glosses)."""
    pairs = [line.split(": ", 1) for line in glosses_file.read_text(encoding="utf-8").splitlines() if ": " in line]
    trained = pairs[: int(len(pairs) * (1 - HELD_OUT_GLOSS_FRACTION))]
    rng = random.Random(seed)
    questions = []
    for word, gloss in rng.sample(trained, count):
        choices = [gloss] + [other for _, other in rng.sample(trained, 3)]
        rng.shuffle(choices)
        questions.append({"word": word, "choices": choices, "label": choices.index(gloss)})
    return questions


@torch.no_grad()
def answer_log_likelihood(model: LLaDAModel, prompt: list[int], answer: list[int], autoregressive: bool,
                          mc_num: int, generator: torch.Generator) -> float:
    """log p(answer | prompt): exact under the causal model, the Monte-Carlo ELBO under the diffusion model."""
    prompt_t = torch.tensor(prompt, device=model.device)
    answer_t = torch.tensor(answer, device=model.device)
    if not autoregressive:
        return log_likelihood(model, prompt_t, answer_t, mc_num=mc_num, batch_size=mc_num, generator=generator).log_likelihood
    sequence = torch.cat([prompt_t, answer_t])[None]
    logits = model(sequence, causal=True).logits[0, len(prompt) - 1:-1].float()
    return float(logits.log_softmax(-1).gather(1, answer_t[:, None]).sum())


def downstream_accuracy(model: LLaDAModel, tokenizer: Tokenizer, questions: list[dict], autoregressive: bool,
                        mc_num: int) -> float:
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(0)
    correct = 0
    for question in questions:
        prompt = tokenizer.encode(f"{question['word']}:", add_special_tokens=False)
        scores = [answer_log_likelihood(model, prompt, tokenizer.encode(f" {choice}", add_special_tokens=False),
                                        autoregressive, mc_num, generator) for choice in question["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == question["label"])
    return correct / len(questions)


def run_one(size: str, objective: str, args: argparse.Namespace, questions: list[dict]) -> dict:
    overrides = [f"objective={objective}", f"steps={args.steps}", f"batch_size={args.batch_size}",
                 f"data.seq_len={args.seq_len}", f"out_dir={args.runs}/{size}-{objective}",
                 f"eval_every={args.eval_every}", f"eval_batches={args.eval_batches}", "save_every=0",
                 "sample_every=0", f"optim.warmup_steps={max(1, args.steps // 20)}",
                 f"model.overrides={json.dumps(SIZES[size])}"]
    if objective == "autoregressive":
        overrides.append("data.random_length_probability=0")  # a causal model sees every prefix anyway
    overrides += args.set
    config = load_config(args.config, overrides)
    # A run without its result file starts over: resuming checkpoints of other settings would mix budgets.
    shutil.rmtree(config.out_dir, ignore_errors=True)
    trainer = Trainer(config)
    start = time.perf_counter()
    records = trainer.run()
    seconds = time.perf_counter() - start
    model = trainer.model
    flops_per_token = model.config.flops_per_token(args.seq_len, training=True)
    tokens_per_step = args.batch_size * args.seq_len
    curve = [{"step": r["step"], "flops": flops_per_token * tokens_per_step * r["step"], "eval_loss": r["eval_loss"]}
             for r in records if r.get("eval_loss") is not None]
    accuracy = downstream_accuracy(model, trainer.tokenizer, questions, objective == "autoregressive", args.mc_num)
    result = {"size": size, "objective": objective, "parameters": model.config.num_parameters(),
              "non_embedding_parameters": model.config.num_parameters(include_embedding=False),
              "tokens": tokens_per_step * args.steps, "flops": curve[-1]["flops"] if curve else None,
              "train_seconds": seconds, "final_eval_loss": curve[-1]["eval_loss"] if curve else None,
              "gloss_mc_accuracy": accuracy, "curve": curve}
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def budget(settings: dict) -> dict:
    """What a run's numbers depend on (not which sizes an invocation runs, nor where checkpoints go)."""
    return {k: v for k, v in settings.items() if k not in ("sizes", "runs")}


def plot(results: list[dict], output: Path, shortest: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, task_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(SIZES, ("tab:blue", "tab:orange", "tab:green")))
    for result in results:
        style = "-" if result["objective"] == "pretrain" else "--"
        label = f"{result['size']} ({result['non_embedding_parameters'] / 1e6:.1f}M) " + (
            "diffusion" if result["objective"] == "pretrain" else "autoregressive")
        curve = result["curve"]
        loss_axis.plot([p["flops"] for p in curve], [p["eval_loss"] for p in curve], style,
                       color=colours[result["size"]], label=label)
        task_axis.plot([result["flops"]], [100 * result["gloss_mc_accuracy"]], "o" if style == "-" else "s",
                       color=colours[result["size"]], label=label, fillstyle="full" if style == "-" else "none")
    for objective, marker in (("pretrain", "-"), ("autoregressive", "--")):
        points = sorted((r["flops"], 100 * r["gloss_mc_accuracy"]) for r in results if r["objective"] == objective)
        task_axis.plot(*zip(*points), marker, color="grey", alpha=0.5)
    loss_axis.set(xscale="log", xlabel="training FLOPs", ylabel="held-out NLL bound (nats/token)",
                  title="Held-out likelihood (diffusion: ELBO bound; AR: exact)")
    task_axis.axhline(25, color="grey", linewidth=0.8, linestyle=":")
    task_axis.axhline(100 * shortest, color="tab:red", linewidth=0.8, linestyle=":")
    task_axis.annotate(f"fewest-token answer: {100 * shortest:.1f}%", (0.02, 100 * shortest + 0.3),
                       xycoords=("axes fraction", "data"), fontsize=7, color="tab:red")
    task_axis.set(xscale="log", xlabel="training FLOPs", ylabel="accuracy (%)",
                  title="Definitions, 4-way multiple choice (chance 25%)")
    loss_axis.legend(fontsize=7)
    task_axis.legend(fontsize=7)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo_pretrain.yaml", help="recipe the runs start from")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--mc-num", type=int, default=32, help="ELBO samples per diffusion score")
    parser.add_argument("--glosses", default="data/demo/corpus/wordnet_glosses.txt")
    parser.add_argument("--runs", default="runs/scaling")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--out-dir", required=True,
                        help="one JSON per run; runs already there are read, not repeated")
    parser.add_argument("--plot", help="PNG figure")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")
    questions = gloss_questions(Path(args.glosses), args.questions)
    settings = {k: v for k, v in vars(args).items() if k not in ("plot", "out_dir")}
    tokenizer = Tokenizer.from_pretrained(load_config(args.config).model.tokenizer)
    shortest = sum(min(range(4), key=lambda i: len(tokenizer.encode(" " + q["choices"][i], add_special_tokens=False)))
                   == q["label"] for q in questions) / len(questions)
    print(f"always picking the gloss of fewest tokens scores {shortest:.1%} (chance 25%): sums of log-likelihoods "
          f"favour short answers", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for size in sizes:
        for objective in OBJECTIVES:
            path = out_dir / f"{size}-{objective}.json"
            if path.is_file():  # done by an earlier invocation: the study can be spread over several
                stored = json.loads(path.read_text())
                if budget(stored["settings"]) != budget(settings):
                    raise SystemExit(f"{path} was made with other settings ({stored['settings']}); use another "
                                     f"--out-dir or delete it")
                results.append(stored["result"])
                continue
            result = run_one(size, objective, args, questions)
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            path.write_text(json.dumps({"settings": settings, "architecture": SIZES[size], "device": device,
                                        "result": result}, indent=1))
            results.append(result)
    if args.plot:
        plot(results, Path(args.plot), shortest)

if __name__ == "__main__":
    main()
