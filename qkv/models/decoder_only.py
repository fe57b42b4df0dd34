"""Decoder-only Transformer (GPT): causal self-attention blocks over one token stream.

The decoder of sec. 3.1 without cross-attention, pre-norm as in GPT-2, with tied input and
output embeddings (sec. 3.4). It predicts token t+1 from tokens <= t; with a KV cache each new
token costs O(T) attention instead of recomputing the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkv.blocks import BlockConfig, DecoderBlock, layer_groups
from qkv.config import check_ranges, ranged
from qkv.layers import KVCache, dropout, make_norm
from qkv.masks import check_mask, check_token_ids
from qkv.models.embedding import TokenEmbedding, absolute_positions, check_positional, position_scheme
from qkv.record import AttentionRecord, layer_records


@dataclass(frozen=True)
class DecoderOnlyConfig:
    """Defaults are nanoGPT's "baby GPT" for Tiny Shakespeare; vocab_size comes from the tokenizer."""

    vocab_size: int = ranged(0, ge=0, note="0 = from the tokenizer")
    block_size: int = ranged(256, ge=1)  # the longest context the model is trained on
    d_model: int = ranged(384, ge=1)
    n_heads: int = ranged(6, ge=1)
    n_layers: int = ranged(6, ge=1)
    d_ff: int = ranged(0, ge=0, note="0 = 4 * d_model")
    n_kv_heads: int | None = ranged(None, ge=1)
    dropout: float = ranged(0.2, ge=0.0, lt=1.0)
    attn_dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_first: bool = True
    positional: str = "learned"
    bias: bool = True
    tie_embeddings: bool = True
    pad_id: int = ranged(0, ge=0)
    bos_id: int = ranged(1, ge=0)
    eos_id: int = ranged(2, ge=0)

    def __post_init__(self):
        check_ranges(self)
        check_positional(self.positional)
        self.block()

    def block(self) -> BlockConfig:
        """The blocks' config: the fields of the same name, with d_ff = 0 meaning 4 * d_model."""
        return BlockConfig.from_config(self, d_ff=self.d_ff or 4 * self.d_model)


class DecoderOnly(nn.Module):
    """GPT-style language model: ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: DecoderOnlyConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        block = cfg.block()
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model, scale=False)
        self.positions = absolute_positions(cfg.positional, cfg.d_model, cfg.block_size)
        self.embed_dropout = dropout(cfg.dropout)
        self.position = position_scheme(cfg.positional, n_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
                                        max_len=cfg.block_size, causal=True)  # shared by every layer
        self.layers = nn.ModuleList(DecoderBlock(block, cross=False, position=self.position)
                                    for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg.norm, cfg.d_model) if cfg.norm_first else nn.Identity()
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                residual = name.endswith(("out_proj.weight", "w_2.weight"))
                nn.init.normal_(p, std=0.02 / (2 * self.cfg.n_layers) ** 0.5 if residual else 0.02)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings and the position scheme; each layer; the final norm and the output projection."""
        return layer_groups(self, [self.embed, self.positions, self.position], self.layers)

    def check_inputs(self, ids: torch.Tensor, positions: torch.Tensor | None, mask: torch.Tensor | None,
                     cache: list[KVCache] | None) -> None:
        """The boundary checks of ``forward`` (they read ids' data: once per call, never compiled)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (B, T), got {tuple(ids.shape)}")
        check_token_ids(ids, self.cfg.vocab_size)
        if positions is not None and positions.shape != ids.shape:
            raise ValueError(f"positions must have the shape of ids {tuple(ids.shape)}, got {tuple(positions.shape)}")
        if mask is not None:
            B, T = ids.shape
            S = T + (cache[0].length if cache else 0)
            check_mask(mask, "mask", (B, self.cfg.n_heads, T, S))

    def forward(self, ids: torch.Tensor, *, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V).

        positions (B, T): absolute positions (default: offset .. offset+T-1, offset = cached length);
        only learned/sinusoidal encodings use them, RoPE/ALiBi are relative and need none.
        mask: bool (B, 1, 1|T, S) over all keys so far (e.g. left padding), on top of causal.
        record: an AttentionRecord; the asked layers put their weights under "decoder".
        """
        if not torch.compiler.is_compiling():
            self.check_inputs(ids, positions, mask, cache)
        offset = cache[0].length if cache else 0
        x = self.embed(ids)  # (B, T, D)
        if self.positions is not None:
            if positions is None:
                x = x + self.positions(ids.shape[1], offset=offset)
            else:
                x = x + self.positions.at(positions)
        x = self.embed_dropout(x)
        slots = layer_records(record, "decoder", len(self.layers))
        for i, (layer, slot) in enumerate(zip(self.layers, slots)):
            layer_cache = (cache[i], None) if cache is not None else None
            x = layer(x, mask=mask, cache=layer_cache, record=slot)
        return self.output(self.final_norm(x))  # (B, T, V)
