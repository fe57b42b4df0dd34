"""Token embeddings, absolute positions and relative position schemes, shared by the model families."""

from __future__ import annotations

import math

import torch
from torch import nn

from qkv.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    PositionScheme,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
)

POSITIONAL = ("sinusoidal", "learned", "rope", "alibi", "t5", "none")


def check_positional(kind: str) -> None:
    if kind not in POSITIONAL:
        raise ValueError(f"positional must be one of {POSITIONAL}, got {kind!r}")


def absolute_positions(kind: str, d_model: int, max_len: int) -> nn.Module | None:
    """The module added to embeddings for 'sinusoidal' / 'learned'; None for relative schemes."""
    check_positional(kind)
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_len)
    if kind == "learned":
        return LearnedPositionalEmbedding(max_len, d_model)
    return None


def position_scheme(kind: str, *, n_heads: int, head_dim: int, max_len: int, causal: bool) -> PositionScheme | None:
    """The scheme MultiHeadAttention takes as ``position=``; None for the absolute kinds and 'none'.

    ``causal``: the stack's self-attention is causal (a decoder); T5 then buckets the past only,
    an encoder's T5 bias is bidirectional. Build one per stack: an encoder and a decoder differ.
    """
    check_positional(kind)
    if kind == "rope":
        return RotaryEmbedding(head_dim, max_len=max_len)
    if kind == "alibi":
        return ALiBi(n_heads)
    if kind == "t5":
        return T5RelativeBias(n_heads, bidirectional=not causal)
    return None


class TokenEmbedding(nn.Module):
    """Sec. 3.4: learned embeddings, multiplied by sqrt(d_model) when ``scale`` (the paper does)."""

    def __init__(self, vocab_size: int, d_model: int, *, pad_id: int | None = None, scale: bool = True):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        nn.init.normal_(self.weight, std=d_model ** -0.5 if scale else 0.02)
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D). The models check ids once at their entry (qkv.masks.check_token_ids):
        reading them here would break a compiled graph (style rule 19)."""
        x = nn.functional.embedding(ids, self.weight)  # (B, T, D)
        return x * self.scale if self.scale != 1.0 else x
