"""Attention weights of every model family, per layer and head, for pictures and the page.

Every model forward takes ``record=`` (qkv.record.AttentionRecord): the layers it asks run the
explicit math path and put their weights into it, the others keep the fused kernel, and the
outputs are the same as without asking. ``collect(model, *inputs, layers=...)`` is that call:

    record = AttentionRecord(layers); outputs = model(*inputs, record=record); record.weights

with the weights by kind of attention, ``{kind: {layer: (B, H, T, S)}}``:

* ``"encoder"``: bidirectional self-attention (Transformer encoder, BERT, ViT), (B, H, T, T);
* ``"decoder"``: causal self-attention (Transformer decoder, GPT), (B, H, T, T);
* ``"cross"``: the decoder's queries over the encoder's memory, (B, H, T, S) (the RNN
  translation model's one-head attention is reported here as layer 0).

A trained run turns one input into an :class:`AttentionSet` (``qkv.load(run_dir).attention(text=
| image=)``, each family in its task's files): the weights of one example with readable token
labels, which ``qkv.viz`` draws, ``qkv.viz_image`` draws over the image, and
``qkv.attention_page`` puts into a page. ``draw_run_attention`` is what ``qkv attention`` calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from qkv.errors import ConfigError
from qkv.record import KINDS, AttentionRecord

KIND_NAMES = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
              "cross": "cross-attention (target -> source)"}
Layers = bool | Iterable[int]


class Collected(NamedTuple):
    outputs: Any                                   # what the model returns without weights
    weights: dict[str, dict[int, torch.Tensor]]    # kind -> layer -> (B, H, T, S)


@dataclass(frozen=True)
class AttentionGroup:
    """One kind of attention of one example: per-layer weights (H, T, S) and the tokens on each axis."""

    kind: str                              # "encoder", "decoder" or "cross"
    queries: list[str]                     # T labels (rows)
    keys: list[str]                        # S labels (columns)
    layers: dict[int, torch.Tensor]        # layer -> (H, T, S)
    grid: tuple[int, int] | None = None    # ViT: the keys after n_special are a (gh, gw) patch grid
    n_special: int = 0

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def n_heads(self) -> int:
        return next(iter(self.layers.values())).shape[0]


@dataclass(frozen=True)
class AttentionSet:
    """The weights of one example, ready to draw: a title, the groups, (ViT) the image (C, H, W) in [0, 1],
    and for a classifier its prediction (label, probability)."""

    title: str
    groups: list[AttentionGroup]
    image: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    prediction: tuple[str, float] | None = None

    def group(self, kind: str | None = None) -> AttentionGroup:
        """The group of ``kind``; by default cross-attention when there is one (the alignment), else the first."""
        kinds = [g.kind for g in self.groups]
        if kind is None:
            kind = "cross" if "cross" in kinds else kinds[0]
        if kind not in kinds:
            raise ConfigError(f"this model has no {kind!r} attention; it has {', '.join(kinds)}")
        return self.groups[kinds.index(kind)]


# -- one call for every family ------------------------------------------------------------------
@torch.no_grad()
def collect(model: torch.nn.Module, *inputs: torch.Tensor, layers: Layers | Mapping[str, Layers] = True,
            **kwargs) -> Collected:
    """Run ``model`` on ``inputs`` with an AttentionRecord; return (outputs, {kind: {layer: (B, H, T, S)}}).

    ``layers``: True (all), False, indices (negative from the end) for every stack, or a dict
    {"encoder": ..., "decoder": ...} (a decoder's layers give both its self- and cross-attention).
    Extra keyword arguments go to the model (e.g. ``mask``).
    """
    if "record" not in inspect.signature(model.forward).parameters:
        raise TypeError(f"collect does not know {type(model).__name__}: its forward takes no record=")
    record = AttentionRecord(layers)
    outputs = model(*inputs, record=record, **kwargs)
    return Collected(outputs, record.weights)


# -- token labels -----------------------------------------------------------------------------
def _inner_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` inside our wrappers (TextTokenizer, WordPiece, BpeSentence), or None."""
    seen = tokenizer
    for _ in range(3):
        if hasattr(seen, "id_to_token") and not hasattr(seen, "tokenizer"):
            return seen
        seen = getattr(seen, "tokenizer", None)
        if seen is None:
            return None
    return None


def token_labels(tokenizer, ids: Iterable[int]) -> list[str]:
    """One readable label per id: the vocabulary's token strings (BPE/WordPiece) or characters."""
    ids = [int(i) for i in ids]
    inner = _inner_tokenizer(tokenizer)
    if inner is not None:
        return [inner.id_to_token(i) or f"<{i}>" for i in ids]
    specials = {getattr(tokenizer, f"{name}_id", None): f"<{name}>" for name in ("pad", "bos", "eos")}
    return [specials[i] if i in specials else tokenizer.decode([i]) for i in ids]


# -- one example's groups ------------------------------------------------------------------------
def groups_of(weights: dict[str, dict[int, torch.Tensor]], labels: dict[str, tuple[list[str], list[str]]],
              **extra) -> list[AttentionGroup]:
    """Batch row 0 of every kind's weights (B, H, T, S) -> groups (H, T, S), with each kind's (query, key) labels."""
    return [AttentionGroup(kind, *labels[kind], {i: w[0].float().cpu() for i, w in sorted(weights[kind].items())},
                           **extra)
            for kind in KINDS if weights.get(kind)]


# -- what `qkv attention` calls -----------------------------------------------------------------
def draw_run_attention(run_dir, out, *, text: str | None = None, image: str | None = None, kind: str | None = None,
                       layer: int | None = None, head: int | None = None, max_tokens: int = 96,
                       device: torch.device | str = "cpu") -> dict:
    """Draw a trained run's attention on ``text`` (text runs) or ``image`` (image runs) into out.png / out.html.

    PNG: every head of one layer (``head`` None) or one head, of one kind (default the
    cross-attention alignment, else the only kind). HTML: the interactive page with every layer
    collected. With ``layer``, only that layer is collected. Returns a summary for the CLI to print.
    """
    from qkv.run import load

    suffix = str(out).rsplit(".", 1)[-1].lower() if "." in str(out) else ""
    if suffix not in ("png", "html", "htm"):
        raise ConfigError(f"--out {out}: write a .png picture or an .html page")
    if (text is None) == (image is None):
        raise ConfigError("attention needs one input: --text T (text runs) or --image F (image runs)")
    if text is not None and not text.strip():
        raise ConfigError("--text is empty: give the text whose attention to draw")
    picture = image is not None and suffix == "png"  # class-token maps and rollout: every layer
    layers = [layer] if layer is not None and not picture else True  # only the layer drawn leaves the fused kernel
    aset = load(run_dir, device=device).attention(text=text, image=image, layers=layers)
    if picture:
        from qkv.viz_image import attention_picture

        return attention_picture(aset, out)
    if suffix == "png":
        from qkv.viz import plot_attention

        plot_attention(aset, out, kind=kind, layer=layer, head=head, max_tokens=max_tokens)
    else:
        from qkv.attention_page import write_page

        write_page(aset, out)
    return {"out": str(out), "title": aset.title,
            "attention": {g.kind: {"layers": sorted(g.layers), "heads": g.n_heads, "queries": len(g.queries),
                                   "keys": len(g.keys)} for g in aset.groups}}
