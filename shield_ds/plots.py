"""PNG plots (matplotlib, Agg backend) for every report (evaluate, analysis, experiment, the demo report):
annotated heatmaps, per-layer bar plots, and `save_figure` (atomic) for the figures they draw themselves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shield_ds.io import atomic_path  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path) -> None:
    """Save a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
            path: str | Path, *, title: str = "", annotations: Sequence[Sequence[str]] | None = None,
            vmin: float | None = 0.0, vmax: float | None = 1.0, cmap: str = "Reds",
            colorbar_label: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """An annotated heatmap; NaN cells are left blank (grey)."""
    data = np.asarray(values, dtype=float).reshape(len(row_labels), len(col_labels))
    width = max(4.0, 1.1 * len(col_labels) + 2.5)
    height = max(3.0, 0.55 * len(row_labels) + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    lo = np.nanmin(data) if vmin is None and np.isfinite(data).any() else (vmin or 0.0)
    hi = np.nanmax(data) if vmax is None and np.isfinite(data).any() else (vmax if vmax is not None else 1.0)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            text = annotations[i][j] if annotations is not None else ("" if math.isnan(data[i, j]) else f"{data[i, j]:.2f}")
            dark = not math.isnan(data[i, j]) and hi > lo and (data[i, j] - lo) / (hi - lo) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def grouped_bars(series: dict[str, Sequence[float]], path: str | Path, *, xlabel: str = "layer",
                 ylabel: str = "neurons", title: str = "") -> None:
    """One group of bars per x position (e.g. layer), one bar per series (e.g. neuron set)."""
    names = list(series)
    length = max((len(v) for v in series.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * length * max(1, min(len(names), 4)) + 2), 3.5))
    width = 0.8 / max(len(names), 1)
    x = np.arange(length)
    for k, name in enumerate(names):
        values = np.zeros(length)
        values[: len(series[name])] = series[name]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width=width, label=name)
    ax.set_xticks(x if length <= 40 else x[:: max(1, length // 20)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(names) > 1:
        ax.legend(fontsize=7, ncol=2 if len(names) > 6 else 1)
    save_figure(fig, path)
