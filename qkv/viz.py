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


# -- attention of any family (qkv.attention_maps.AttentionSet), long inputs included ---------------
def readable(label: str) -> str:
    """A token as a tick label: whitespace made visible, matplotlib's mathtext ($) escaped."""
    shown = {" ": "␣", "\n": "\\n", "\t": "\\t"}.get(label, label)
    if not shown.isprintable():
        shown = repr(shown)[1:-1]
    return shown.replace("$", r"\$")


def bin_tokens(weights: torch.Tensor, queries: Sequence[str], keys: Sequence[str], max_tokens: int):
    """Fit (H, T, S) weights into at most max_tokens rows and columns by binning neighbours.

    A cell of the result is a block of consecutive queries x keys: the mean over its queries of
    the summed weight on its keys, so each row still sums to 1. Labels become "i:token" of the
    block's first token. Returns (weights, query labels, key labels, note); note is "" when no
    binning was needed.
    """
    H, T, S = weights.shape
    qb, kb = math.ceil(T / max_tokens), math.ceil(S / max_tokens)
    if qb == 1 and kb == 1:
        return weights, list(queries), list(keys), ""
    w = weights.float()
    w = torch.nn.functional.pad(w, (0, -S % kb, 0, -T % qb))  # (H, T', S') multiples of the bins
    w = w.view(H, w.shape[1] // qb, qb, w.shape[2] // kb, kb)  # (H, T/qb, qb, S/kb, kb)
    counts = torch.tensor([min(qb, T - i) for i in range(0, T, qb)], dtype=w.dtype)  # real queries per bin
    w = w.sum(dim=(2, 4)) / counts[None, :, None]  # (H, T/qb, S/kb)

    def labels(tokens, b):
        return [f"{i}:{tokens[i]}" if b > 1 else tokens[i] for i in range(0, len(tokens), b)]

    note = f"binned: a cell is {qb} queries x {kb} keys ({T} x {S} tokens)"
    return w, labels(queries, qb), labels(keys, kb), note


def _ticks(ax, queries: Sequence[str], keys: Sequence[str], *, fontsize: float, most: int = 64) -> None:
    """Tick labels, thinned to at most ``most`` per axis so that they stay readable."""
    for axis, labels, rotation in ((ax.xaxis, keys, 90), (ax.yaxis, queries, 0)):
        step = max(1, math.ceil(len(labels) / most))
        axis.set_ticks(range(0, len(labels), step), [readable(t) for t in labels[::step]], fontsize=fontsize,
                       rotation=rotation)


def plot_attention(aset, path: str | os.PathLike, *, kind: str | None = None, layer: int | None = None,
                   head: int | None = None, max_tokens: int = 96) -> Path:
    """One layer of an AttentionSet group: every head (and their mean) in a grid, or one head large.

    kind: "encoder", "decoder" or "cross" (default: cross-attention, i.e. the source-target
    alignment, when there is one); layer: default the last one collected. Inputs longer than
    ``max_tokens`` are binned (see ``bin_tokens``), so 1,000 tokens still make a readable picture.
    """
    group = aset.group(kind)
    layer = max(group.layers) if layer is None else layer
    if layer not in group.layers:
        raise ValueError(f"layer {layer} was not collected; layers: {sorted(group.layers)}")
    weights = group.layers[layer]  # (H, T, S)
    if head is not None and not 0 <= head < weights.shape[0]:
        raise ValueError(f"head {head} does not exist: layer {layer} has {weights.shape[0]} heads")
    single = head is not None
    if single:
        weights = weights[head:head + 1]
    w, queries, keys, note = bin_tokens(weights, group.queries, group.keys, max_tokens)
    panels = [(f"head {head}", w[0])] if single else [(f"head {h}", w[h]) for h in range(len(w))]
    if not single and len(w) > 1:
        panels.append(("mean of heads", w.mean(dim=0)))
    n = max(len(queries), len(keys))
    side = min(9.0, max(4.0, 0.16 * n)) if single else min(5.0, max(2.6, 0.09 * n))
    fontsize = 8 if single else max(4.0, 7 - n / 24)
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    aspect = len(queries) / max(len(keys), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows * min(max(aspect, 0.5), 2.0) + 0.6),
                             squeeze=False)
    for ax, (name, matrix) in zip(axes.flat, panels):
        image = ax.imshow(matrix.cpu().numpy(), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        _ticks(ax, queries, keys, fontsize=fontsize, most=max_tokens if single else 64)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if single:
        fig.colorbar(image, ax=axes[0, 0], fraction=0.04)
        axes[0, 0].set_xlabel("key (attended to)")
        axes[0, 0].set_ylabel("query")
    lines = [aset.title, f"{group.name}, layer {layer}" + (f", head {head}" if single else ""), note]
    fig.suptitle("\n".join(readable(x) for x in lines if x), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_training(records: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Loss (train and validation), the validation metrics and the learning rate against step."""
    skip = {"step", "split", "loss", "lr", "epoch", "tokens_per_s", "images_per_s", "examples_per_s"}
    valid = [r for r in records if r.get("split") == "valid"]
    metrics = sorted({k for r in valid for k, v in r.items() if k not in skip and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss", ["loss"], ("train", "valid")), ("validation metric", metrics, ("valid",)),
              ("learning rate", ["lr"], ("train",)))
    for ax, (name, keys, splits) in zip(axes, panels):
        drawn = False
        for split in splits:
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r.get("split") == split
                          and isinstance(r.get(key), (int, float))]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, "-" if split == "train" else "o-", markersize=3, label=f"{split} {key}")
                    drawn = True
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``qkv plot``: the training curves of a run directory from its metrics.jsonl (default out: curves.png there)."""
    from qkv.errors import DataError
    from qkv.rundir import METRICS, RunDir, read_metrics

    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise DataError(f"{run_dir}: no {METRICS} (is it a run directory?)")
    records, _ = read_metrics(run.metrics)  # a run still writing may leave its last line unfinished
    if not any("step" in r for r in records):
        raise DataError(f"{run.metrics}: no records with a step to draw")
    return plot_training(records, out or run.curves, title=str(run_dir))
