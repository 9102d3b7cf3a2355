"""Training curves to PNG: loss (and held-out loss), learning rate and throughput of one or more runs.

Reads each run's ``metrics.jsonl`` (or a ``.jsonl`` file given directly). Several runs share the axes,
which is how runs are compared (e.g. one GPU against two). Needs matplotlib (``pip install 'llada[plot]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llada.training.config import METRICS_FILE
from llada.training.corpus import iter_jsonl


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
    """Draw loss, learning rate and tokens/s against the step for each run into one PNG; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'llada[plot]'") from error
    labels = list(labels) if labels else [Path(s).name for s in sources]
    if len(labels) != len(sources):
        raise ValueError(f"{len(labels)} labels for {len(sources)} runs")
    figure, (loss_axis, lr_axis, speed_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    for source, label in zip(sources, labels):
        records = read_metrics(source)
        steps = [r["step"] for r in records]
        line, = loss_axis.plot(steps, [r["loss"] for r in records], marker=".", label=label)
        evaluated = [r for r in records if r.get("eval_loss") is not None]
        if evaluated:
            loss_axis.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], linestyle="--",
                           color=line.get_color(), label=f"{label} (held out)")
        lr_axis.plot(steps, [r["lr"] for r in records], label=label)
        speed_axis.plot(steps, [r["tokens_per_s"] for r in records], marker=".", label=label)
    for axis, name in ((loss_axis, "loss (nats/token)"), (lr_axis, "learning rate"), (speed_axis, "tokens/s")):
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
