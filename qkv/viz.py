"""Pictures of attention with matplotlib (Agg backend: works headless)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure atomically: a half-written PNG never replaces a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_heads(weights: torch.Tensor, query_labels: Sequence[str], key_labels: Sequence[str],
               path: str | os.PathLike, *, title: str = "") -> Path:
    """A grid of heatmaps, one per head. weights (H, T, S); rows are queries, columns keys."""
    if weights.dim() != 3:
        raise ValueError(f"weights must have shape (H, T, S), got {tuple(weights.shape)}")
    H, T, S = weights.shape
    if len(query_labels) != T or len(key_labels) != S:
        raise ValueError(f"need {T} query labels and {S} key labels, got {len(query_labels)} and {len(key_labels)}")
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    cell = max(2.5, 0.28 * max(T, S))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(weights[h].detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}")
        ax.set_xticks(range(S), key_labels, rotation=90, fontsize=8)
        ax.set_yticks(range(T), query_labels, fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_head(weights: torch.Tensor, labels: Sequence[str], path: str | os.PathLike, *, title: str = "",
              max_tokens: int = 120) -> Path:
    """One head's weights (T, T) over a token sequence; long sequences show their last max_tokens."""
    if weights.dim() != 2:
        raise ValueError(f"weights must have shape (T, S), got {tuple(weights.shape)}")
    T = weights.shape[0]
    start = max(0, T - max_tokens)
    shown = weights[start:, start:].detach().float().cpu().numpy()
    labels = [repr(t)[1:-1] if t.isspace() or not t.isprintable() else t for t in labels[start:]]
    size = max(4.0, 0.12 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shown, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title or "attention weights")
    return _save(fig, path)


def plot_curves(records: Sequence[dict], path: str | os.PathLike, *, metric: str = "loss", title: str = "") -> Path:
    """Training and validation ``metric`` against step, from metrics.jsonl records."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        points = [(r["step"], r[metric]) for r in records if r.get("split") == split and metric in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=f"{split} {metric}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} during training")
    return _save(fig, path)
