"""One self-contained HTML page to explore attention: pick the kind, layer and head, hover tokens.

The page holds everything it needs: the weights are embedded as JSON, the script and the style
are inline, the image of a ViT run is a data URL; it makes no request when viewed, so it works
from a file, offline, and can be mailed around.

What the page does (its script and style are qkv/assets/attention_page.js and .css, inlined):

* selectors for the kind of attention (encoder self, decoder self, cross), the layer, and the
  head or the mean of the heads;
* a heatmap of the chosen head, queries as rows and keys as columns; hovering a cell selects
  its query, and the row and its strongest key are outlined;
* the query and key tokens as text: hovering a query colours every key by the weight the query
  gives it (and shows the weights as numbers); hovering a key colours the queries that attend to
  it; a click pins the selection (Escape or a second click releases it);
* for a ViT run, the chosen query's attention over the patches, drawn on the image.

Size: each query row keeps its ``k`` largest weights (all of them for inputs of a few hundred
tokens); ``k`` is chosen so that the page stays under ~``max_entries`` weights in all, so that
1,000 tokens across every layer and head still make a page of a few megabytes. Weights are
stored as 16-bit integers (steps of 1/65535).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from qkv.attention_maps import AttentionGroup, AttentionSet
from qkv.fileio import atomic_write_text

MAX_ENTRIES = 1_500_000


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<u2").tobytes()).decode("ascii")


def encode_matrix(weights: torch.Tensor, k: int) -> dict:
    """One head's (T, S) weights -> {"k", "idx", "val"}: each row's k largest as uint16, base64.

    With k == S the matrix is stored whole (idx is None, values in column order).
    """
    T, S = weights.shape
    w = weights.float().clamp(0.0, 1.0)
    if k >= S:
        values = torch.round(w * 65535).to(torch.int32).numpy()
        return {"k": S, "idx": None, "val": _b64(values)}
    top, idx = torch.topk(w, k, dim=-1)  # (T, k) each
    values = torch.round(top * 65535).to(torch.int32).numpy()
    return {"k": k, "idx": _b64(idx.to(torch.int32).numpy()), "val": _b64(values)}


def row_budget(groups: list[AttentionGroup], max_entries: int) -> int:
    """The largest k (weights kept per query row) that keeps every group's matrices under max_entries."""
    rows = sum(len(g.queries) * len(g.layers) * g.n_heads for g in groups)
    return max(16, max_entries // max(rows, 1))


def _image_url(image: torch.Tensor) -> str:
    """(C, H, W) in [0, 1] -> a PNG data URL."""
    import matplotlib.pyplot as plt

    picture = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()  # (H, W, C)
    buffer = io.BytesIO()
    if picture.shape[-1] == 1:
        plt.imsave(buffer, picture[..., 0], cmap="gray", vmin=0.0, vmax=1.0, format="png")  # (H, W)
    else:
        plt.imsave(buffer, picture, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def page_data(aset: AttentionSet, *, max_entries: int = MAX_ENTRIES) -> dict:
    """The JSON the page embeds."""
    k = row_budget(aset.groups, max_entries)
    if len(aset.groups[0].keys) > 65535:
        raise ValueError("the page stores key indices as 16-bit integers: at most 65,535 keys")
    groups = []
    for g in aset.groups:
        maps = {str(i): [encode_matrix(w[h], k) for h in range(w.shape[0])] for i, w in sorted(g.layers.items())}
        groups.append({"kind": g.kind, "name": g.name, "queries": g.queries, "keys": g.keys,
                       "layers": sorted(g.layers), "heads": g.n_heads, "maps": maps,
                       "grid": list(g.grid) if g.grid else None, "n_special": g.n_special,
                       "kept": min(k, len(g.keys))})
    notes = list(aset.notes)
    if any(gr["kept"] < len(gr["keys"]) for gr in groups):
        notes.append(f"long input: each query keeps its {k} largest weights (the rest are shown as 0)")
    return {"title": aset.title, "notes": notes, "groups": groups,
            "image": _image_url(aset.image) if aset.image is not None else None}


def page_html(aset: AttentionSet, *, max_entries: int = MAX_ENTRIES) -> str:
    """The whole page as one string."""
    data = json.dumps(page_data(aset, max_entries=max_entries), ensure_ascii=True, separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # no "</script>" or "<!--" can end the data block early
    return (_TEMPLATE.replace("%TITLE%", html.escape(aset.title)).replace("%STYLE%", _asset("attention_page.css"))
            .replace("%SCRIPT%", _asset("attention_page.js")).replace("%DATA%", data))


def _asset(name: str) -> str:
    return (resources.files("qkv") / "assets" / name).read_text(encoding="utf-8")


def write_page(aset: AttentionSet, path: str | os.PathLike, *, max_entries: int = MAX_ENTRIES) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    atomic_write_text(path, page_html(aset, max_entries=max_entries))
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qkv attention: %TITLE%</title>
<style>%STYLE%</style></head>
<body>
<header><h1 id="title"></h1><div id="notes"></div>
<div id="controls">
<label>attention <select id="group"></select></label>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<label>colour <select id="norm"><option value="matrix">by the largest weight</option>
<option value="row">by each row's largest</option></select></label>
<span class="hint">hover a token or a cell; click to pin, Esc to release</span>
</div>
<div id="readout">hover a query token to see its weights</div></header>
<main>
<section id="tokens">
<h2>queries <small>(rows)</small></h2><div id="queries" class="toks"></div>
<h2>keys <small>(columns, coloured by the weight of the selected query)</small></h2><div id="keys" class="toks"></div>
</section>
<section id="maps">
<div id="imagebox" hidden><h2>over the image</h2><canvas id="image"></canvas></div>
<h2>heatmap <small id="scale"></small></h2>
<div id="heatbox"><canvas id="heatmap"></canvas></div>
</section>
</main>
<script type="application/json" id="qkv-data">%DATA%</script>
<script>%SCRIPT%</script>
</body></html>
"""
