"""One object to ask a model for its attention weights (house style rule 17).

Every model forward takes a keyword-only ``record=None``. With a record, each stack asks it
which of its layers are wanted; a wanted layer runs the explicit math path and puts its
weights into the record, the others keep the fused kernel. The return type of ``forward``
never changes: the weights are read from the record afterwards.

    record = AttentionRecord(layers=[-1])          # the last layer of every stack
    logits = model(src, tgt, record=record)
    record.weights["cross"][5]                     # (B, H, T, S)

Kinds of attention (the keys of ``weights``):

* ``"encoder"``: bidirectional self-attention (Transformer encoder, BERT, ViT), (B, H, T, T);
* ``"decoder"``: causal self-attention (Transformer decoder, GPT), (B, H, T, T);
* ``"cross"``: the decoder's queries over the encoder's memory, (B, H, T, S).

Stacks are ``"encoder"`` (its self-attention is kind "encoder") and ``"decoder"`` (its
self-attention is kind "decoder", its cross-attention kind "cross").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

KINDS = ("encoder", "decoder", "cross")
STACKS = ("encoder", "decoder")
Layers = bool | Iterable[int]


def wanted_layers(layers: Layers, n_layers: int) -> set[int]:
    """Which of ``n_layers`` layers are asked: True = all, False = none, or indices (negative from the end)."""
    if layers is True:
        return set(range(n_layers))
    if not layers:
        return set()
    picked = {int(i) % n_layers if -n_layers <= int(i) < n_layers else int(i) for i in layers}
    bad = sorted(i for i in picked if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"attention was asked for layers {bad}, but the stack has {n_layers} layers")
    return picked


class LayerRecord:
    """What one wanted layer of one stack writes into: ``put("self" | "cross", weights)``."""

    __slots__ = ("_record", "stack", "layer")

    def __init__(self, record: AttentionRecord, stack: str, layer: int):
        self._record, self.stack, self.layer = record, stack, layer

    def put(self, which: str, weights: torch.Tensor) -> None:
        """which: "self" or "cross"; weights (B, H, T, S)."""
        if which == "self":
            kind = self.stack
        elif which == "cross" and self.stack == "decoder":
            kind = "cross"
        else:
            raise ValueError(f"a {self.stack} layer has no {which!r} attention")
        self._record.weights.setdefault(kind, {})[self.layer] = weights


class AttentionRecord:
    """Which layers' attention weights to keep, and the weights kept: ``weights[kind][layer]``.

    ``layers``: True (every layer of every stack), False, layer indices for every stack, or a
    mapping {"encoder": ..., "decoder": ...} per stack (a stack left out is not recorded).
    """

    def __init__(self, layers: Layers | Mapping[str, Layers] = True):
        if isinstance(layers, Mapping):
            unknown = sorted(set(layers) - set(STACKS))
            if unknown:
                raise ValueError(f"AttentionRecord: unknown stack {unknown[0]!r} (stacks: {', '.join(STACKS)})")
            self._layers = {stack: _freeze(layers.get(stack, False)) for stack in STACKS}
        else:
            frozen = _freeze(layers)
            self._layers = {stack: frozen for stack in STACKS}
        self.weights: dict[str, dict[int, torch.Tensor]] = {}

    def layer(self, stack: str, index: int, n_layers: int) -> LayerRecord | None:
        """The slot layer ``index`` of a stack of ``n_layers`` writes into, or None when not wanted."""
        if index in wanted_layers(self._layers[stack], n_layers):
            return LayerRecord(self, stack, index)
        return None

    def wants(self, stack: str, n_layers: int) -> bool:
        """Whether any layer of this stack is asked (a stack can skip work, e.g. a fast path, when not)."""
        return bool(wanted_layers(self._layers[stack], n_layers))


def layer_records(record: AttentionRecord | None, stack: str, n_layers: int) -> list[LayerRecord | None]:
    """One slot per layer (None where not wanted): what a stack's single layer loop zips with its layers."""
    if record is None:
        return [None] * n_layers
    return [record.layer(stack, i, n_layers) for i in range(n_layers)]


def _freeze(layers: Layers) -> bool | tuple[int, ...]:
    return layers if isinstance(layers, bool) else tuple(int(i) for i in layers)
