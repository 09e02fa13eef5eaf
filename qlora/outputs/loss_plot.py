"""training_loss.png: a run's training and held-out loss per optimizer step, drawn from its metadata.json alone
(a PTQ sibling draws its source's run, which its metadata carries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


PLOT_FILE = "training_loss.png"


def pyplot():
    """matplotlib's pyplot on the Agg backend: the project's charts are files, drawn with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_block(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The `training` block of a run's metadata, or of the source run of a PTQ sibling; None when there is none."""
    source = (metadata.get("source") or {}).get("metadata") or {}
    return metadata.get("training") or source.get("training") or None


def loss_series(training: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """{"train": (steps, losses), "held-out": (steps, losses)} as recorded. A run recorded before steps were
    kept has a train curve logged every `logging_steps` and its held-out loss after the last step only."""
    losses = list(training.get("loss_curve") or [])
    steps = list(training.get("loss_steps") or [])
    if len(steps) != len(losses):  # no steps recorded: the losses were logged at equal intervals up to the end
        last = training.get("steps") or len(losses)
        steps = [round(last * (i + 1) / len(losses)) for i in range(len(losses))]
    series = {"train": (steps, losses)}
    eval_losses, eval_steps = list(training.get("eval_loss_curve") or []), list(training.get("eval_loss_steps") or [])
    if not eval_losses and training.get("eval_loss") is not None:
        eval_losses, eval_steps = [training["eval_loss"]], [training.get("steps")]
    if eval_losses and len(eval_steps) == len(eval_losses):
        series["held-out"] = (eval_steps, eval_losses)
    return series


def write_loss_plot(directory: str | Path, metadata: dict[str, Any]) -> Path | None:
    """Draw training_loss.png into `directory`; None (nothing written) when the metadata records no loss."""
    training = training_block(metadata)
    if not training or not training.get("loss_curve"):
        return None
    plt = pyplot()
    series = loss_series(training)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, (steps, losses)), style in zip(series.items(), ({"marker": "."}, {"marker": "o", "linestyle": "--"})):
        ax.plot(steps, losses, label=f"{label} loss", **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per completion token)")
    dataset = (metadata.get("dataset") or {}).get("name")
    ax.set_title(f"{Path(str(metadata.get('base_model', ''))).name} {metadata.get('peft') or ''} on {dataset}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(directory) / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
