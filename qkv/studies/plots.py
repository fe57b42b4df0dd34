"""Line and bar charts for the study reports (matplotlib, headless, written atomically via qkv.viz)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from qkv.viz import _save, plt


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, *,
              title: str, xlabel: str, ylabel: str, logy: bool = False, logx: bool = False) -> Path:
    """One line per name: series[name] = (xs, ys)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def panels(plots: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Side-by-side line plots; each dict has series, xlabel, ylabel, title and optional logy/logx."""
    fig, axes = plt.subplots(1, len(plots), figsize=(5.2 * len(plots), 4.0), squeeze=False)
    for ax, spec in zip(axes[0], plots):
        for name, (xs, ys) in spec["series"].items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
        ax.set(title=spec.get("title", ""), xlabel=spec["xlabel"], ylabel=spec["ylabel"])
        if spec.get("logy"):
            ax.set_yscale("log")
        if spec.get("logx"):
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def grouped_bars(groups: Sequence[str], values: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                 title: str, ylabel: str) -> Path:
    """Bars of each name's value per group (e.g. BLEU per source-length bucket)."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    width = 0.8 / max(len(values), 1)
    for i, (name, ys) in enumerate(values.items()):
        ax.bar([g + i * width for g in range(len(groups))], list(ys), width=width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
