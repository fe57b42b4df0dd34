"""The encoder-decoder Transformer of "Attention Is All You Need" (sec. 3, Figure 1).

The encoder maps source tokens (B, S) to memory (B, S, D) with self-attention; the decoder
predicts target token t+1 from targets <= t with causal self-attention and cross-attention
whose queries come from the decoder and whose keys and values come from the memory.

Training speed: ``teacher_forcing_loss`` takes the decoder's final states (``features``) at the
real target positions only and projects them onto the vocabulary chunk by chunk, fused with the
label-smoothed cross-entropy (qkv.losses), so the (B, T, V) logits never exist; the encoder's
token-wise layers skip source padding when a batch holds enough of it (qkv.unpad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkv.blocks import BlockConfig, DecoderBlock, EncoderBlock, layer_groups
from qkv.config import check_ranges, ranged
from qkv.layers import StackCache, dropout, make_norm
from qkv.losses import chunked_projection_cross_entropy
from qkv.masks import check_token_ids
from qkv.models.embedding import TokenEmbedding, absolute_positions, check_positional, position_scheme
from qkv.record import AttentionRecord, layer_records
from qkv.unpad import Unpadded, worth_unpadding


@dataclass(frozen=True)
class TransformerConfig:
    """Defaults are the paper's base model (Table 3); vocab sizes and ids come from the tokenizer."""

    src_vocab_size: int = ranged(0, ge=0, note="0 = from the tokenizer")
    tgt_vocab_size: int = ranged(0, ge=0, note="0 = from the tokenizer")
    d_model: int = ranged(512, ge=1)
    n_heads: int = ranged(8, ge=1)
    d_ff: int = ranged(2048, ge=1)
    n_encoder_layers: int = ranged(6, ge=1)
    n_decoder_layers: int = ranged(6, ge=1)
    n_kv_heads: int | None = ranged(None, ge=1)
    dropout: float = ranged(0.1, ge=0.0, lt=1.0)
    attn_dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    activation: str = "relu"
    norm: str = "layernorm"
    norm_first: bool = False
    positional: str = "sinusoidal"
    max_len: int = ranged(512, ge=1)
    scale_embeddings: bool = True
    share_embeddings: bool = False
    tie_output: bool = True
    pad_id: int = ranged(0, ge=0)
    bos_id: int = ranged(1, ge=0)
    eos_id: int = ranged(2, ge=0)

    def __post_init__(self):
        check_ranges(self)
        check_positional(self.positional)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one joint vocabulary, got src_vocab_size={self.src_vocab_size} "
                f"and tgt_vocab_size={self.tgt_vocab_size}"
            )
        BlockConfig.from_config(self)  # validates d_model / n_heads / dropout


class Transformer(nn.Module):
    """Encoder-decoder for sequence-to-sequence tasks (translation).

    The decoding interface (qkv.decode's ``Seq2Seq``): ``encode``, ``decode``, ``new_cache``, the
    special ids ``pad_id`` / ``bos_id`` / ``eos_id`` and the input limits ``max_source_len`` /
    ``max_target_len``.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.src_vocab_size < 1 or cfg.tgt_vocab_size < 1:
            raise ValueError("src_vocab_size and tgt_vocab_size must be set (they come from the tokenizer)")
        self.cfg = cfg
        block = BlockConfig.from_config(cfg)
        self.src_embed = TokenEmbedding(cfg.src_vocab_size, cfg.d_model, scale=cfg.scale_embeddings)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else TokenEmbedding(cfg.tgt_vocab_size, cfg.d_model, scale=cfg.scale_embeddings))
        self.positions = absolute_positions(cfg.positional, cfg.d_model, cfg.max_len)
        self.embed_dropout = dropout(cfg.dropout)
        # One relative scheme per stack, shared by its layers (registered here, before them).
        scheme = dict(n_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads, max_len=cfg.max_len)
        self.encoder_position = position_scheme(cfg.positional, causal=False, **scheme)
        self.decoder_position = position_scheme(cfg.positional, causal=True, **scheme)
        self.encoder = nn.ModuleList(EncoderBlock(block, position=self.encoder_position)
                                     for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(block, position=self.decoder_position)
                                     for _ in range(cfg.n_decoder_layers))
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

    @property
    def pad_id(self) -> int:
        return self.cfg.pad_id

    @property
    def bos_id(self) -> int:
        return self.cfg.bos_id

    @property
    def eos_id(self) -> int:
        return self.cfg.eos_id

    @property
    def max_source_len(self) -> int | None:
        """The longest source the encoder takes: the learned position table's size, else unbounded."""
        return self.cfg.max_len if self.cfg.positional == "learned" else None

    @property
    def max_target_len(self) -> int | None:
        """The longest decoder input, BOS included: the learned position table's size, else unbounded."""
        return self.cfg.max_len if self.cfg.positional == "learned" else None

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings and position schemes; each encoder layer, then each decoder layer; final norms, output."""
        below = [self.src_embed, self.tgt_embed, self.positions, self.encoder_position, self.decoder_position]
        return layer_groups(self, below, [*self.encoder, *self.decoder])

    def _embed(self, embedding: TokenEmbedding, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = embedding(ids)  # (B, T, D)
        if self.positions is not None:
            x = x + self.positions(ids.shape[1], offset=offset)
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor, *, record: AttentionRecord | None = None):
        """src (B, S) token ids -> memory (B, S, D), src_mask (B, 1, 1, S).

        ``record``: an AttentionRecord; the asked encoder layers put their weights under "encoder".
        When at least 10% of the source is padding (and nothing is recorded, nothing compiled),
        the token-wise layers run on the N real tokens only (qkv.unpad) and memory is zeros at
        padding; the padded keys are masked out of attention either way, so nothing downstream
        of the real tokens changes.
        """
        compiling = torch.compiler.is_compiling()
        if not compiling:
            _check_ids(src, self.cfg.src_vocab_size, "src", "(B, S)")
        real = src != self.cfg.pad_id  # (B, S)
        src_mask = real[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src)
        recording = record is not None and record.wants("encoder", len(self.encoder))
        if not compiling and not recording and worth_unpadding(real):
            tokens = Unpadded.from_mask(real)
            h = tokens.unpad(x)  # (N, D)
            for layer in self.encoder:
                h = layer(h, mask=src_mask, unpadded=tokens)
            return tokens.pad(self.encoder_norm(h)), src_mask  # (B, S, D), zeros at padding
        for layer, slot in zip(self.encoder, layer_records(record, "encoder", len(self.encoder))):
            x = layer(x, mask=src_mask, record=slot)
        return self.encoder_norm(x), src_mask

    def new_cache(self) -> StackCache:
        """One (self-attention, cross-attention) cache pair per decoder layer."""
        return StackCache(len(self.decoder))

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, D) pre-softmax projection: logits = features W^T (the target embedding when tied, sec. 3.4)."""
        return self.output.weight

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, *,
               cache: StackCache | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """tgt (B, T) ids (shifted right, starting with BOS) -> logits (B, T, V).

        With ``cache`` only the new positions are passed; earlier keys/values are reused.
        ``record``: the asked decoder layers put their weights under "decoder" and "cross".
        """
        return self.output(self._decoder_states(tgt, memory, src_mask, cache=cache, record=record))  # (B, T, V)

    def _decoder_states(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, *,
                        cache: StackCache | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """tgt (B, T) -> the decoder stack's output after its final norm (B, T, D)."""
        if not torch.compiler.is_compiling():
            _check_ids(tgt, self.cfg.tgt_vocab_size, "tgt", "(B, T)")
        offset = cache.length if cache is not None else 0
        x = self._embed(self.tgt_embed, tgt, offset)
        # The target's own padding only ever sits after real tokens, so causal masking is enough.
        slots = layer_records(record, "decoder", len(self.decoder))
        for i, (layer, slot) in enumerate(zip(self.decoder, slots)):
            layer_cache = cache[i] if cache is not None else None
            x = layer(x, memory=memory, memory_mask=src_mask, cache=layer_cache, record=slot)
        return self.decoder_norm(x)  # (B, T, D)

    def features(self, src: torch.Tensor, tgt: torch.Tensor, *,
                 record: AttentionRecord | None = None) -> torch.Tensor:
        """Teacher forcing without the output projection: src (B, S), tgt (B, T) -> (B, T, D).

        ``forward(src, tgt)`` is ``features(src, tgt) @ output_weight.T``; a loss that projects
        only some positions (``teacher_forcing_loss``) starts from here.
        """
        memory, src_mask = self.encode(src, record=record)
        return self._decoder_states(tgt, memory, src_mask, record=record)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *, record: AttentionRecord | None = None) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt (B, T) -> logits (B, T, V).

        ``record``: an AttentionRecord; weights land in ``record.weights[kind][layer]``, kind "encoder",
        "decoder" or "cross".
        """
        return self.output(self.features(src, tgt, record=record))  # (B, T, V)


def teacher_forcing_loss(model: Transformer, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor, *,
                         label_smoothing: float, chunk_size: int = 512) -> tuple[torch.Tensor, int]:
    """Mean label-smoothed cross-entropy of ``model(src, tgt_in)`` against ``tgt_out`` over non-pad targets.

    src (B, S), tgt_in (B, T) (BOS + y), tgt_out (B, T) (y + EOS) -> (loss, n_tokens), the value
    and gradients of ``qkv.tasks.translation.sequence_loss(model(src, tgt_in), tgt_out, ...)``
    (sec. 5.4, smoothing eps), computed as: h = features (B, T, D); the N rows at real targets
    (N, D); logits h W^T chunk by chunk, fused with the loss (never (B, T, V), never padding), the
    gradients taken in the forward pass while each chunk's logits exist (3 matmuls, as the plain path).
    Call it on the bare model: a DDP or FSDP2 wrapper syncs gradients through ``forward`` only.
    """
    hidden = model.features(src, tgt_in)  # (B, T, D)
    real = tgt_out != model.pad_id  # (B, T)
    rows = hidden[real]  # (N, D)
    return chunked_projection_cross_entropy(rows, model.output_weight, tgt_out[real], ignore_index=model.pad_id,
                                            label_smoothing=label_smoothing, chunk_size=chunk_size, recompute=False)

def _check_ids(ids: torch.Tensor, vocab_size: int, name: str, shape: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}")
    check_token_ids(ids, vocab_size, name=name)
