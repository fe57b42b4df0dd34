"""Attention weights of every model family, per layer and head, for pictures and the page.

One API over the families: ``collect(model, *inputs, layers=...)`` runs the model once and
returns its outputs with the weights of the layers asked, by kind of attention:

* ``"encoder"``: bidirectional self-attention (Transformer encoder, BERT, ViT), (B, H, T, T);
* ``"decoder"``: causal self-attention (Transformer decoder, GPT), (B, H, T, T);
* ``"cross"``: the decoder's queries over the encoder's memory, (B, H, T, S) (the RNN
  translation model's one-head attention is reported here as layer 0).

Only the layers asked run the explicit math path (qkv.attention returns weights only from it);
the others keep the fused kernel, and the outputs are the same as without asking.

``text_attention`` / ``image_attention_set`` turn a trained run and one input into an
:class:`AttentionSet`: the weights of one example with readable token labels, which
``qkv.viz`` draws and ``qkv.attention_page`` puts into a page.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from qkv.errors import ConfigError

KINDS = ("encoder", "decoder", "cross")
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
    """The weights of one example, ready to draw: a title, the groups, and (ViT) the image (C, H, W) in [0, 1]."""

    title: str
    groups: list[AttentionGroup]
    image: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def group(self, kind: str | None = None) -> AttentionGroup:
        """The group of ``kind``; by default cross-attention when there is one (the alignment), else the first."""
        kinds = [g.kind for g in self.groups]
        if kind is None:
            kind = "cross" if "cross" in kinds else kinds[0]
        if kind not in kinds:
            raise ConfigError(f"this model has no {kind!r} attention; it has {', '.join(kinds)}")
        return self.groups[kinds.index(kind)]


# -- one API over the families ----------------------------------------------------------------
def _per_kind(layers: Layers | dict[str, Layers], kind: str) -> Layers:
    layers = layers.get(kind, False) if isinstance(layers, dict) else layers
    return layers if isinstance(layers, bool) else list(layers)


def _split(attention: dict[int, dict[str, torch.Tensor]], names: dict[str, str]) -> dict[str, dict[int, torch.Tensor]]:
    """{layer: {"self": w, "cross": w}} -> {kind: {layer: w}} with names mapping block keys to kinds."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for i, per_block in sorted(attention.items()):
        for key, kind in names.items():
            if key in per_block:
                out.setdefault(kind, {})[i] = per_block[key]
    return out


@torch.no_grad()
def collect(model: torch.nn.Module, *inputs: torch.Tensor, layers: Layers | dict[str, Layers] = True,
            **kwargs) -> Collected:
    """Run ``model`` on ``inputs`` and return (outputs, {kind: {layer: (B, H, T, S)}}).

    inputs: Transformer / RNNSeq2Seq (src (B, S), tgt (B, T)) -> logits; DecoderOnly (ids,) -> logits;
    EncoderOnly (ids,) -> hidden; SequenceClassifier / SentenceEncoder (ids,) -> their output; ViT /
    ImageEmbedder (images,) -> their output. ``layers``: True (all), False, indices, or for an
    encoder-decoder a dict {"encoder": ..., "decoder": ...} (the decoder's layers give both its
    self- and cross-attention). Extra keyword arguments go to the model (e.g. ``mask``).
    """
    from qkv.models.decoder_only import DecoderOnly
    from qkv.models.encoder_only import EncoderOnly, SentenceEncoder, SequenceClassifier
    from qkv.models.rnn_seq2seq import RNNSeq2Seq
    from qkv.models.transformer import Transformer
    from qkv.models.vit import ImageEmbedder, ViT

    if isinstance(model, Transformer):
        asked = {kind: _per_kind(layers, kind) for kind in ("encoder", "decoder")}
        if not any(asked.values()):
            return Collected(model(*inputs), {})
        logits, attention = model(*inputs, return_attention=asked)
        return Collected(logits, {**_split(attention["encoder"], {"self": "encoder"}),
                                  **_split(attention["decoder"], {"self": "decoder", "cross": "cross"})})
    if isinstance(model, RNNSeq2Seq):
        src, tgt = inputs
        memory, src_mask = model.encode(src)
        logits, weights = model.decode(tgt, memory, src_mask, return_attention=True)  # (B, T, S)
        wanted = 0 in _wanted(_per_kind(layers, "decoder"), 1)
        return Collected(logits, {"cross": {0: weights[:, None]}} if wanted else {})  # (B, 1, T, S)
    if isinstance(model, DecoderOnly):
        logits, attention = _asking(model, inputs, _per_kind(layers, "decoder"), kwargs)
        return Collected(logits, _split(attention, {"self": "decoder"}))
    if isinstance(model, ImageEmbedder):  # ImageEmbedder.forward, with the weights kept
        hidden, attention = _asking(model.vit.encode, inputs, _per_kind(layers, "encoder"), kwargs)
        return Collected(F.normalize(model.vit.pool(hidden), p=2.0, dim=-1), _split(attention, {"self": "encoder"}))
    if isinstance(model, (EncoderOnly, SequenceClassifier, SentenceEncoder, ViT)):
        outputs, attention = _asking(model, inputs, _per_kind(layers, "encoder"), kwargs)
        return Collected(outputs, _split(attention, {"self": "encoder"}))
    raise TypeError(f"collect does not know {type(model).__name__}")


def _asking(forward, inputs, layers: Layers, kwargs):
    """forward(*inputs, return_attention=layers) -> (outputs, weights); no weights asked -> (outputs, {})."""
    layers = layers if isinstance(layers, bool) else list(layers)
    if not layers:
        return forward(*inputs, **kwargs), {}
    return forward(*inputs, return_attention=layers, **kwargs)


def _wanted(layers: Layers, n: int) -> set[int]:
    from qkv.blocks import wanted_layers

    return wanted_layers(layers, n)


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


# -- from a trained run and one input -----------------------------------------------------------
def _groups(weights: dict[str, dict[int, torch.Tensor]], labels: dict[str, tuple[list[str], list[str]]],
            **extra) -> list[AttentionGroup]:
    """Batch row 0 of every kind's weights, with its (query, key) labels."""
    return [AttentionGroup(kind, *labels[kind], {i: w[0].float().cpu() for i, w in sorted(weights[kind].items())},
                           **extra)
            for kind in KINDS if weights.get(kind)]


def text_attention(cfg, model, artifacts, text: str, *, layers: Layers = True,
                   device: torch.device | str = "cpu") -> AttentionSet:
    """The attention of a text run (translation, lm, classification, embedding) on ``text``."""
    if not text.strip():
        raise ConfigError("--text is empty: give the text whose attention to draw")
    task = cfg.task
    if task in ("translation", "translation-rnn"):
        return _translation_attention(cfg, model, artifacts, text, layers, device)
    if task == "lm":
        return _lm_attention(cfg, model, artifacts, text, layers, device)
    if task in ("classification", "embedding"):
        return _encoder_attention(cfg, model, artifacts, text, layers, device)
    raise ConfigError(f"--text works with text runs (translation, lm, classification, embedding), "
                      f"not a {task!r} run (image runs take --image)")


def _translation_attention(cfg, model, tokenizers, text, layers, device) -> AttentionSet:
    """Translate greedily (or by beam), then teacher-force the hypothesis to read every weight."""
    from qkv.decode import beam_search, greedy_decode

    src_tok, tgt_tok = tokenizers
    src_ids = src_tok.encode(text) + [src_tok.eos_id]  # as qkv.decode.translate does
    src = torch.tensor([src_ids], device=device)
    beam = cfg.decode.beam_size
    hyp = (greedy_decode(model, src) if beam == 1 else beam_search(model, src, beam_size=beam,
                                                                    length_penalty=cfg.decode.length_penalty))[0]
    tgt_in = [tgt_tok.bos_id, *hyp]  # the decoder's input; it produces hyp + [eos]
    _, weights = collect(model, src, torch.tensor([tgt_in], device=device), layers=layers)
    src_labels = token_labels(src_tok, src_ids)
    labels = {"encoder": (src_labels, src_labels),
              "decoder": (token_labels(tgt_tok, tgt_in), token_labels(tgt_tok, tgt_in)),
              "cross": (token_labels(tgt_tok, [*hyp, tgt_tok.eos_id]), src_labels)}
    notes = ["cross-attention rows are labelled with the token being produced; decoder self-attention rows "
             "with the decoder's input (it starts with <bos>)"]
    return AttentionSet(f"{text!r} -> {tgt_tok.decode(hyp)!r}", _groups(weights, labels), notes=notes)


def _lm_attention(cfg, model, tokenizer, text, layers, device) -> AttentionSet:
    ids = tokenizer.encode(text)
    notes = []
    block = cfg.model.block_size
    if len(ids) > block:
        notes.append(f"the text has {len(ids)} tokens; the model's context is {block}: its last {block} are shown")
        ids = ids[-block:]
    _, weights = collect(model, torch.tensor([ids], device=device), layers=layers)
    labels = token_labels(tokenizer, ids)
    return AttentionSet(f"{len(ids)} tokens", _groups(weights, {"decoder": (labels, labels)}), notes=notes)


def _encoder_attention(cfg, model, artifacts, text, layers, device) -> AttentionSet:
    ids = artifacts.tokenizer.encode_batch([text])[0]
    outputs, weights = collect(model, torch.tensor([ids], device=device), layers=layers)
    labels = token_labels(artifacts.tokenizer, ids)
    title = f"{len(ids)} tokens"
    if cfg.task == "classification":
        probs = outputs[0].float().softmax(-1)
        best = int(probs.argmax())
        title += f", predicted {artifacts.label_names[best]!r} ({float(probs[best]):.2f})"
    return AttentionSet(title, _groups(weights, {"encoder": (labels, labels)}))


def image_attention_set(cfg, model, artifacts, image_path: str, *, layers: Layers = True,
                        device: torch.device | str = "cpu") -> AttentionSet:
    """The self-attention of an image run over the class token and the patches of one image file."""
    from qkv.tasks.vision import read_images_for, vit_of

    images = read_images_for(cfg, artifacts, [str(image_path)]).to(device)  # (1, C, H, W), normalised
    vit = vit_of(model)
    outputs, weights = collect(model, images, layers=layers)
    H, W = images.shape[-2:]
    gh, gw = H // vit.cfg.patch_size, W // vit.cfg.patch_size
    labels = ["[class]"] * vit.n_special + [f"({r},{c})" for r in range(gh) for c in range(gw)]
    title = str(image_path)
    if vit.head is not None:
        probs = outputs[0].float().softmax(-1)
        best = int(probs.argmax())
        title += f": {artifacts.label_names[best]} ({float(probs[best]):.2f})"
    std = torch.tensor(artifacts.std)[:, None, None]
    mean = torch.tensor(artifacts.mean)[:, None, None]
    image = (images[0].cpu() * std + mean).clamp(0, 1)  # (C, H, W) back to [0, 1]
    groups = _groups(weights, {"encoder": (labels, labels)}, grid=(gh, gw), n_special=vit.n_special)
    return AttentionSet(title, groups, image=image)


# -- what `qkv attention` calls -----------------------------------------------------------------
def draw_run_attention(run_dir, out, *, text: str | None = None, image: str | None = None, kind: str | None = None,
                       layer: int | None = None, head: int | None = None, max_tokens: int = 96,
                       device: torch.device | str = "cpu") -> dict:
    """Draw a trained run's attention on ``text`` (text runs) or ``image`` (image runs) into out.png / out.html.

    PNG: every head of one layer (``head`` None) or one head, of one kind (default the
    cross-attention alignment, else the only kind). HTML: the interactive page with every layer
    collected. With ``layer``, only that layer is collected. Returns a summary for the CLI to print.
    """
    from qkv.run import load_run, read_run_config

    suffix = str(out).rsplit(".", 1)[-1].lower() if "." in str(out) else ""
    if suffix not in ("png", "html", "htm"):
        raise ConfigError(f"--out {out}: write a .png picture or an .html page")
    if (text is None) == (image is None):
        raise ConfigError("attention needs one input: --text T (text runs) or --image F (image runs)")
    task = read_run_config(run_dir).task
    if image is not None and suffix == "png":
        from qkv.viz_image import attention_picture  # class-token maps and rollout over the image

        return attention_picture(run_dir, image, out, device=device)
    cfg, model, artifacts = load_run(run_dir, device=device)
    layers = [layer] if layer is not None else True  # only the layer drawn leaves the fused kernel
    if image is not None:
        if task not in ("image_classification", "image_embedding"):
            raise ConfigError(f"--image needs an image run, got a {task!r} run (text runs take --text)")
        aset = image_attention_set(cfg, model, artifacts, image, layers=layers, device=device)
    else:
        aset = text_attention(cfg, model, artifacts, text, layers=layers, device=device)
    if suffix == "png":
        from qkv.viz import plot_attention

        plot_attention(aset, out, kind=kind, layer=layer, head=head, max_tokens=max_tokens)
    else:
        from qkv.attention_page import write_page

        write_page(aset, out)
    return {"out": str(out), "title": aset.title,
            "attention": {g.kind: {"layers": sorted(g.layers), "heads": g.n_heads, "queries": len(g.queries),
                                   "keys": len(g.keys)} for g in aset.groups}}
