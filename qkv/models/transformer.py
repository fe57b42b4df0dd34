"""The encoder-decoder Transformer of "Attention Is All You Need" (sec. 3, Figure 1).

The encoder maps source tokens (B, S) to memory (B, S, D) with self-attention; the decoder
predicts target token t+1 from targets <= t with causal self-attention and cross-attention
whose queries come from the decoder and whose keys and values come from the memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qkv.blocks import BlockConfig, DecoderBlock, EncoderBlock, wanted_layers
from qkv.layers import KVCache, dropout, make_norm
from qkv.masks import padding_mask
from qkv.models.embedding import TokenEmbedding, absolute_positions, check_positional, relative_positions


@dataclass(frozen=True)
class TransformerConfig:
    """Defaults are the paper's base model (Table 3); vocab sizes and ids come from the tokenizer."""

    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_kv_heads: int | None = None
    dropout: float = 0.1
    attn_dropout: float = 0.0
    activation: str = "relu"
    norm: str = "layernorm"
    norm_first: bool = False
    positional: str = "sinusoidal"
    max_len: int = 512
    scale_embeddings: bool = True
    share_embeddings: bool = False
    tie_output: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        check_positional(self.positional)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one joint vocabulary, got src_vocab_size={self.src_vocab_size} "
                f"and tgt_vocab_size={self.tgt_vocab_size}"
            )
        self.block()  # validates d_model / n_heads / dropout

    def block(self) -> BlockConfig:
        return BlockConfig(d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, n_kv_heads=self.n_kv_heads,
                           dropout=self.dropout, attn_dropout=self.attn_dropout, activation=self.activation,
                           norm=self.norm, norm_first=self.norm_first)


class Transformer(nn.Module):
    """Encoder-decoder for sequence-to-sequence tasks (translation)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.src_vocab_size < 1 or cfg.tgt_vocab_size < 1:
            raise ValueError("src_vocab_size and tgt_vocab_size must be set (they come from the tokenizer)")
        self.cfg = cfg
        block = cfg.block()
        head_dim = cfg.d_model // cfg.n_heads
        self.src_embed = TokenEmbedding(cfg.src_vocab_size, cfg.d_model, scale=cfg.scale_embeddings)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else TokenEmbedding(cfg.tgt_vocab_size, cfg.d_model, scale=cfg.scale_embeddings))
        self.positions = absolute_positions(cfg.positional, cfg.d_model, cfg.max_len)
        self.embed_dropout = dropout(cfg.dropout)
        relative = relative_positions(cfg.positional, cfg.n_heads, head_dim, cfg.max_len)
        self.encoder = nn.ModuleList(EncoderBlock(block, **relative) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(block, **relative) for _ in range(cfg.n_decoder_layers))
        # Pre-norm stacks end with a norm (the residual stream is never normalised otherwise).
        self.encoder_norm = make_norm(cfg.norm, cfg.d_model) if cfg.norm_first else nn.Identity()
        self.decoder_norm = make_norm(cfg.norm, cfg.d_model) if cfg.norm_first else nn.Identity()
        self.output = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        if cfg.tie_output:  # sec. 3.4: the pre-softmax projection shares the target embedding matrix
            self.output.weight = self.tgt_embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name and not (self.cfg.tie_output and name == "output.weight"):
                nn.init.xavier_uniform_(p)

    def _embed(self, embedding: TokenEmbedding, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = embedding(ids)  # (B, T, D)
        if self.positions is not None:
            x = x + self.positions(ids.shape[1], offset=offset)
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor, *, return_attention: bool | Iterable[int] = False):
        """src (B, S) token ids -> memory (B, S, D), src_mask (B, 1, 1, S) [, per-layer weights]."""
        if src.dim() != 2:
            raise ValueError(f"src must have shape (B, S), got {tuple(src.shape)}")
        src_mask = padding_mask(src, self.cfg.pad_id)  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src)
        want = wanted_layers(return_attention, len(self.encoder))
        attention = {}
        for i, layer in enumerate(self.encoder):
            if i in want:
                x, attention[i] = layer(x, mask=src_mask, return_weights=True)
            else:
                x = layer(x, mask=src_mask)
        memory = self.encoder_norm(x)
        return (memory, src_mask, attention) if return_attention else (memory, src_mask)

    def new_cache(self) -> list[tuple[KVCache, KVCache]]:
        """One (self-attention, cross-attention) cache pair per decoder layer."""
        return [(KVCache(), KVCache()) for _ in self.decoder]

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, *,
               cache: list[tuple[KVCache, KVCache]] | None = None,
               return_attention: bool | Iterable[int] = False):
        """tgt (B, T) ids (shifted right, starting with BOS) -> logits (B, T, V) [, per-layer weights].

        With ``cache`` only the new positions are passed; earlier keys/values are reused.
        """
        if tgt.dim() != 2:
            raise ValueError(f"tgt must have shape (B, T), got {tuple(tgt.shape)}")
        offset = cache[0][0].length if cache else 0
        x = self._embed(self.tgt_embed, tgt, offset)
        # The target's own padding only ever sits after real tokens, so causal masking is enough.
        want = wanted_layers(return_attention, len(self.decoder))
        attention = {}
        for i, layer in enumerate(self.decoder):
            layer_cache = cache[i] if cache is not None else None
            if i in want:
                x, attention[i] = layer(x, memory=memory, memory_mask=src_mask, cache=layer_cache,
                                        return_weights=True)
            else:
                x = layer(x, memory=memory, memory_mask=src_mask, cache=layer_cache)
        logits = self.output(self.decoder_norm(x))  # (B, T, V)
        return (logits, attention) if return_attention else logits

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *,
                return_attention: bool | Iterable[int] | dict[str, bool | Iterable[int]] = False):
        """Teacher forcing: src (B, S), tgt (B, T) -> logits (B, T, V) [, weights].

        return_attention: True, layer indices for both stacks, or {"encoder": ..., "decoder": ...};
        weights are {"encoder": {layer: {"self"}}, "decoder": {layer: {"self", "cross"}}}.
        """
        if not return_attention:
            memory, src_mask = self.encode(src)
            return self.decode(tgt, memory, src_mask)
        per_stack = return_attention if isinstance(return_attention, dict) else {}
        enc = per_stack.get("encoder", False) if per_stack else return_attention
        dec = per_stack.get("decoder", False) if per_stack else return_attention
        memory, src_mask, *enc_weights = self.encode(src, return_attention=enc)  # weights only when asked
        out = self.decode(tgt, memory, src_mask, return_attention=dec)
        logits, dec_weights = out if dec else (out, {})
        return logits, {"encoder": enc_weights[0] if enc_weights else {}, "decoder": dec_weights}
