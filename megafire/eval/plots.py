"""Plots of the length-generalization figure: log perplexity against evaluation length.

One line per run (encoding), the training length marked with a vertical line; the x axis
is log2 of the length so 1x, 2x, 4x, ... are evenly spaced, as in the FIRE paper's figures.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes / CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_length_generalization(results: dict[str, dict[int, float]], train_length: int | None,
                               path: str | Path, title: str = "Length generalization") -> Path:
    """results: run name -> {eval length: perplexity}. Writes a PNG and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, by_length in sorted(results.items()):
        lengths = sorted(int(k) for k in by_length)
        ppl = [by_length[k] if k in by_length else by_length[str(k)] for k in lengths]
        ax.plot(lengths, [math.log(p) for p in ppl], marker="o", label=name)
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1)
        ax.text(train_length, ax.get_ylim()[1], " train length", va="top", ha="left", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("log perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_passkey_heatmap(accuracy: dict[int, dict[float, float]], path: str | Path,
                         title: str = "Passkey retrieval") -> Path:
    """accuracy: length -> {depth fraction: accuracy}. Writes a PNG heatmap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = sorted(int(k) for k in accuracy)
    depths = sorted({float(d) for row in accuracy.values() for d in row})
    grid = [[accuracy[length].get(d, float("nan")) for length in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.5 * len(depths)), dpi=120)
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if v == v:
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write atomically (temp name, then rename): a reader never sees half a PNG. A figure
    with a layout engine of its own keeps it (e.g. room left for a legend under the panels)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
