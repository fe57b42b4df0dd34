"""Encoder-only Transformer (BERT, Devlin et al. 2019): bidirectional self-attention over one text.

The encoder of sec. 3.1 on its own. BERT's input representation (sec. 3, Figure 2) is the sum of
token, learned position and segment (token type) embeddings, normalised by a LayerNorm; each
layer is post-norm self-attention then a post-norm GELU feed-forward network, which is
``EncoderBlock`` with ``norm_first=False``, ``activation="gelu"`` (exact erf GELU) and
``norm_eps=1e-12``. There is no final norm: post-norm layers already end with one.

On top of the hidden states (B, T, D): pure pooling functions, a ``SentenceEncoder`` that pools
(and L2-normalises) them into sentence embeddings as Sentence-BERT does (Reimers & Gurevych
2019, mean pooling), and a ``SequenceClassifier`` head.

BERT's own pooler (tanh(W h_[CLS] + b), trained for next-sentence prediction) is not part of
these modules: sentence-transformers' mean pooling never reads it, and the classifier here
learns its own linear layer on the pooled vector; ``qkv.convert`` skips its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qkv.blocks import BlockConfig, EncoderBlock, layer_groups
from qkv.config import check_ranges, ranged
from qkv.layers import make_norm
from qkv.masks import check_token_ids
from qkv.models.embedding import TokenEmbedding, absolute_positions, check_positional, position_scheme
from qkv.record import AttentionRecord, layer_records
from qkv.unpad import Unpadded, worth_unpadding

POOLING = ("mean", "cls")


@dataclass(frozen=True)
class EncoderOnlyConfig:
    """Defaults are BERT-base (Devlin et al. 2019, sec. 3); vocab_size comes from the tokenizer."""

    vocab_size: int = ranged(0, ge=0, note="0 = from the tokenizer")
    max_len: int = ranged(512, ge=1)  # HF's max_position_embeddings: the learned position table
    type_vocab_size: int = ranged(2, ge=1)  # segments A and B
    d_model: int = ranged(768, ge=1)
    n_heads: int = ranged(12, ge=1)
    d_ff: int = ranged(3072, ge=1)
    n_layers: int = ranged(12, ge=1)
    dropout: float = ranged(0.1, ge=0.0, lt=1.0)
    attn_dropout: float = ranged(0.1, ge=0.0, lt=1.0)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_first: bool = False
    norm_eps: float = ranged(1e-12, gt=0.0)
    positional: str = "learned"
    pad_id: int = ranged(0, ge=0)
    pooling: str = "mean"            # for SentenceEncoder / SequenceClassifier: "mean" or "cls"
    n_classes: int = ranged(0, ge=0, note="0 = from the labels")  # for SequenceClassifier

    def __post_init__(self):
        check_ranges(self)
        check_positional(self.positional)
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        BlockConfig.from_config(self)


class EncoderOnly(nn.Module):
    """ids (B, T) -> hidden states (B, T, D), every token attending to every real token."""

    def __init__(self, cfg: EncoderOnlyConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model, scale=False)
        self.positions = absolute_positions(cfg.positional, cfg.d_model, cfg.max_len)
        self.segment_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.embed_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.position = position_scheme(cfg.positional, n_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
                                        max_len=cfg.max_len, causal=False)  # shared by every layer
        block = BlockConfig.from_config(cfg)
        self.layers = nn.ModuleList(EncoderBlock(block, position=self.position) for _ in range(cfg.n_layers))
        # Pre-norm stacks end with a norm (the residual stream is never normalised otherwise).
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT's init: weights N(0, 0.02), biases 0, norms 1."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Token, position and segment embeddings with their norm; each layer; the final norm."""
        below = [self.embed, self.positions, self.segment_embed, self.embed_norm, self.position]
        return layer_groups(self, below, self.layers)

    def token_mask(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The (B, T) bool mask of real tokens: ``mask`` checked, or ids != pad_id."""
        if mask is None:
            return ids != self.cfg.pad_id  # (B, T)
        if mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"mask must be a bool (B, T) tensor like ids {tuple(ids.shape)} (True = real token), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def check_inputs(self, ids: torch.Tensor, segment_ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """The boundary checks of ``forward``: they read the ids' data, so once per call and never compiled."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (B, T), got {tuple(ids.shape)}")
        check_token_ids(ids, self.cfg.vocab_size)
        self.token_mask(ids, mask)
        if segment_ids is not None:
            if segment_ids.shape != ids.shape:
                raise ValueError(f"segment_ids must have the shape of ids {tuple(ids.shape)}, "
                                 f"got {tuple(segment_ids.shape)}")
            n = self.cfg.type_vocab_size
            if segment_ids.numel() and (int(segment_ids.min()) < 0 or int(segment_ids.max()) >= n):
                raise ValueError(f"segment_ids must be in [0, {n}), got range "
                                 f"[{int(segment_ids.min())}, {int(segment_ids.max())}]")

    def _embed(self, ids: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
        """BERT, sec. 3, Figure 2: LayerNorm(token + position + segment embeddings), then dropout."""
        if segment_ids is None:
            segment_ids = torch.zeros_like(ids)
        x = self.embed(ids) + self.segment_embed(segment_ids)  # (B, T, D)
        if self.positions is not None:
            x = x + self.positions(ids.shape[1])  # (T, D) broadcast over B
        return self.embed_dropout(self.embed_norm(x))

    def forward(self, ids: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """ids (B, T) -> hidden (B, T, D).

        segment_ids (B, T): 0 for the first text, 1 for the second (default all 0).
        mask (B, T) bool, True = real token (default ids != pad_id); padded keys are never
        attended, so the outputs at real tokens do not depend on padding. When a batch is at
        least 10% padding, the layers run on the real tokens only and the outputs at padding
        are zeros (otherwise they are whatever the padded positions computed; use the mask);
        not under torch.compile (the number of real tokens is data) nor with a record.
        record: an AttentionRecord; the asked layers put their weights (B, H, T, T) under "encoder".
        """
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.check_inputs(ids, segment_ids, mask)
        real = self.token_mask(ids, mask)  # (B, T)
        keys = real[:, None, None, :]  # (B, 1, 1, T)
        x = self._embed(ids, segment_ids)
        recording = record is not None and record.wants("encoder", len(self.layers))
        if not compiling and not recording and worth_unpadding(real):
            # Token-wise layers on the N real tokens only (qkv.unpad); padding comes back as zeros.
            tokens = Unpadded.from_mask(real)
            h = tokens.unpad(x)  # (N, D)
            for layer in self.layers:
                h = layer(h, mask=keys, unpadded=tokens)
            return tokens.pad(self.final_norm(h))  # (B, T, D)
        for layer, slot in zip(self.layers, layer_records(record, "encoder", len(self.layers))):
            x = layer(x, mask=keys, record=slot)
        return self.final_norm(x)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' vectors (Sentence-BERT, sec. 3): hidden (B, T, D), mask (B, T) bool -> (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (hidden * weights).sum(dim=1)  # (B, D)
    # sentence-transformers' clamp: an all-padding row gives zeros, not NaN
    return total / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor) -> torch.Tensor:
    """The first token's vector, [CLS] (BERT, sec. 3): (B, T, D) -> (B, D)."""
    return hidden[:, 0]


def pool(hidden: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """'mean' -> mean_pool, 'cls' -> cls_pool."""
    if kind == "mean":
        return mean_pool(hidden, mask)
    if kind == "cls":
        return cls_pool(hidden)
    raise ValueError(f"pooling must be one of {POOLING}, got {kind!r}")


class SentenceEncoder(nn.Module):
    """Sentence embeddings: encoder, then pooling, then (optionally) L2 normalisation. -> (B, D)."""

    def __init__(self, encoder: EncoderOnly, *, pooling: str | None = None, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.pooling = encoder.cfg.pooling if pooling is None else pooling
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        self.normalize = normalize
        self.train(encoder.training)  # wrapping an encoder in eval mode (load_hf_bert's) keeps it there

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The encoder's groups (pooling has no parameters)."""
        return self.encoder.layer_groups()

    def forward(self, ids: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """ids (B, T) -> embeddings (B, D), unit length when ``normalize``; ``record`` as in EncoderOnly."""
        mask = self.encoder.token_mask(ids, mask)
        hidden = self.encoder(ids, segment_ids=segment_ids, mask=mask, record=record)
        pooled = pool(hidden, mask, self.pooling)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled


class SequenceClassifier(nn.Module):
    """Devlin et al. 2019, sec. 4.1: a linear layer on the pooled sequence vector. -> logits (B, n_classes)."""

    def __init__(self, encoder: EncoderOnly, *, n_classes: int | None = None, pooling: str | None = None,
                 dropout: float | None = None):
        super().__init__()
        cfg = encoder.cfg
        n_classes = cfg.n_classes if n_classes is None else n_classes
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1 for a classifier, got {n_classes}")
        self.encoder = encoder
        self.pooling = cfg.pooling if pooling is None else pooling
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        self.dropout = nn.Dropout(cfg.dropout if dropout is None else dropout)
        self.head = nn.Linear(cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.train(encoder.training)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The encoder's groups, with the classification head in the last one."""
        *groups, top = self.encoder.layer_groups()
        return [*groups, top + list(self.head.parameters())]

    def forward(self, ids: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, n_classes); ``record`` as in EncoderOnly."""
        mask = self.encoder.token_mask(ids, mask)
        hidden = self.encoder(ids, segment_ids=segment_ids, mask=mask, record=record)
        return self.head(self.dropout(pool(hidden, mask, self.pooling)))  # (B, n_classes)


@torch.no_grad()
def embed(encoder: SentenceEncoder, tokenizer, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Embeddings (N, D) of ``texts``, in eval mode, on the encoder's device, in the order given.

    ``tokenizer`` needs ``collate(texts) -> (ids, segment_ids, mask)`` (qkv.data.wordpiece).
    Texts are batched by length, as sentence-transformers does, to waste little on padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer.collate([texts[i] for i in order[start:start + batch_size]])
            ids, segment_ids, mask = (t.to(device) for t in batch)
            chunks.append(encoder(ids, segment_ids=segment_ids, mask=mask))  # (b, D)
    finally:
        encoder.train(was_training)
    if not chunks:
        return torch.empty(0, encoder.encoder.cfg.d_model, device=device)
    out = torch.cat(chunks)  # (N, D) in length order
    return out[torch.argsort(torch.tensor(order, device=device))]
