"""Training curves to PNG: loss (and held-out loss), learning rate and throughput of one or more runs,
and for post-training runs the reward (RL) or reward accuracy (preference optimization).

Reads each run's ``metrics.jsonl`` (or a ``.jsonl`` file given directly). Several runs share the axes,
which is how runs are compared (e.g. one GPU against two). Needs matplotlib (``pip install 'llada[plot]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llada.training.config import METRICS_FILE
from llada.training.corpus import iter_jsonl

REWARD_KEYS = ("reward_mean", "reward_accuracy")  # RL, then preference optimization


def read_metrics(source: str | Path) -> list[dict]:
    """The step records of a run directory (its metrics.jsonl) or of a metrics file; skipped steps left out."""
    path = Path(source)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: is {source} a training run directory?")
    records = [record for _, record in iter_jsonl(file) if not record.get("skipped")]
    if not records:
        raise ValueError(f"{file} has no step records")
    return records


def plot_runs(sources: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None,
              title: str | None = None) -> Path:
    """Draw loss, learning rate, tokens/s (and a reward, for post-training) against the step for each run
    into one PNG; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'llada[plot]'") from error
    labels = list(labels) if labels else [Path(s).name for s in sources]
    if len(labels) != len(sources):
        raise ValueError(f"{len(labels)} labels for {len(sources)} runs")
    runs = [read_metrics(source) for source in sources]
    # Post-training runs get a fourth panel: RL's mean reward, or a preference run's reward accuracy.
    reward_key = next((key for key in REWARD_KEYS if any(key in r for records in runs for r in records)), None)
    figure, axes = plt.subplots(1, 4 if reward_key else 3, figsize=(20 if reward_key else 15, 4.2))
    loss_axis, lr_axis, speed_axis = axes[:3]
    for records, label in zip(runs, labels):
        steps = [r["step"] for r in records]
        line, = loss_axis.plot(steps, [r["loss"] for r in records], marker=".", label=label)
        evaluated = [r for r in records if r.get("eval_loss") is not None]
        if evaluated:
            loss_axis.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], linestyle="--",
                           color=line.get_color(), label=f"{label} (held out)")
        lr_axis.plot(steps, [r["lr"] for r in records], label=label)
        speed_axis.plot(steps, [r["tokens_per_s"] for r in records], marker=".", label=label)
        if reward_key:
            rewarded = [r for r in records if reward_key in r]
            axes[3].plot([r["step"] for r in rewarded], [r[reward_key] for r in rewarded], marker=".", label=label)
            held_out = [r for r in records if f"eval_{reward_key}" in r]
            if held_out:
                axes[3].plot([r["step"] for r in held_out], [r[f"eval_{reward_key}"] for r in held_out],
                             linestyle="--", label=f"{label} (held out)")
    names = [(loss_axis, "loss (nats/token)"), (lr_axis, "learning rate"), (speed_axis, "tokens/s")]
    if reward_key:
        names.append((axes[3], reward_key.replace("_", " ")))
    for axis, name in names:
        axis.set_xlabel("step")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    loss_axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
