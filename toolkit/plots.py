"""The report's figures, each a PNG file in the run folder: accuracy against latency (with the accuracy budget
selection applied and the Pareto front), throughput per stage, confusion matrices, training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SELECTED, OTHER, BUDGET = "#c2410c", "#2563eb", "#16a34a"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, accuracy) points no other point beats on both, by increasing latency."""
    front, best = [], -np.inf
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((latency, accuracy))
            best = accuracy
    return front


def accuracy_latency(rows: list[dict[str, Any]], budget: tuple[float, float] | None, path: Path) -> Path | None:
    """Accuracy (%) against batch-1 p50, marker area by size; the band is the accuracy selection accepted."""
    rows = [r for r in rows if r["accuracy"] is not None and r["latency_p50_ms"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    if budget is not None:
        ax.axhspan(budget[0], budget[1], color=BUDGET, alpha=0.12, label="accuracy budget of `select`")
    front = pareto_front([(r["latency_p50_ms"], 100 * r["accuracy"]) for r in rows])
    ax.plot(*zip(*front, strict=True), color="#555", lw=1, ls="--", drawstyle="steps-post", label="Pareto front")
    biggest = max((r["size_mb"] or 1.0) for r in rows)
    for i, row in enumerate(rows):
        xy = (row["latency_p50_ms"], 100 * row["accuracy"])
        colour = SELECTED if row["selected"] else OTHER
        ax.scatter(*xy, s=60 + 900 * (row["size_mb"] or 0) / biggest, alpha=0.55, color=colour,
                   edgecolors="k" if row["selected"] else "none")  # fmt: skip
        label = f"{row['stage']}" + (" (busy!)" if row.get("busy") else "")
        ax.annotate(label, xy, xytext=(8, 12 - 12 * (i % 3)), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.set(xlabel="batch-1 latency p50 (ms, log scale)", ylabel="accuracy (%)",
           title="accuracy vs latency (area: size on disk; orange: selected)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def throughput(rows: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r["throughput_per_s"]]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    names = [r["stage"] + (" (busy!)" if r.get("busy") else "") for r in rows]
    ax.barh(names, [r["throughput_per_s"] for r in rows], color=[SELECTED if r["selected"] else OTHER for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel=f"texts/s at batch {rows[0].get('batch') or 'N'}", title="throughput per stage")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def confusion(matrices: dict[str, np.ndarray], labels: list[str], path: Path) -> Path | None:
    """One heatmap per model (rows: true class, columns: predicted), counts written in the cells."""
    if not matrices:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices) + 0.6, 3.6), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > matrix.max() / 2 else "black")  # fmt: skip
        ticks = range(len(labels))
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=name)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_yticklabels(labels)
    return _save(fig, path)


def training_curves(
    histories: dict[str, list[dict[str, float]]], path: Path, reference: tuple[str, float] | None = None
) -> Path | None:
    """Training loss and validation accuracy per epoch, one line per training stage; `reference` (a name and a
    validation accuracy, the fine-tuned teacher's best) as a dashed line that the students' curves are read
    against."""
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return None
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, history in histories.items():
        epochs = [row["epoch"] for row in history]
        loss_ax.plot(epochs, [row.get("train_loss") for row in history], marker="o", label=name)
        acc_ax.plot(epochs, [100 * row["accuracy"] for row in history], marker="o", label=name)
    if reference is not None:
        acc_ax.axhline(100 * reference[1], color="grey", linestyle="--", linewidth=1, label=f"{reference[0]} (best)")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
