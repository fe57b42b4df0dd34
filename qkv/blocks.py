"""Encoder and decoder blocks (sec. 3.1), shared by every model family.

Each sub-layer is wrapped in a residual connection with layer normalisation. The paper uses
post-norm, LayerNorm(x + Sublayer(x)); most modern models use pre-norm,
x + Sublayer(LayerNorm(x)), which trains without warm-up tricks and needs a final norm.
Dropout is applied to each sub-layer's output before it is added (sec. 5.4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch
from torch import nn

from qkv.config import check_ranges, ranged
from qkv.layers import FeedForward, KVCache, MultiHeadAttention, dropout, make_feedforward, make_norm
from qkv.positional import PositionScheme
from qkv.record import LayerRecord
from qkv.unpad import Unpadded


@dataclass(frozen=True)
class BlockConfig:
    """Hyper-parameters of one block; the paper's base model is d_model=512, n_heads=8, d_ff=2048."""

    d_model: int = ranged(512, ge=1)
    n_heads: int = ranged(8, ge=1)
    d_ff: int = ranged(2048, ge=1)
    n_kv_heads: int | None = ranged(None, ge=1)
    dropout: float = ranged(0.1, ge=0.0, lt=1.0)
    attn_dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    activation: str = "relu"
    norm: str = "layernorm"
    norm_first: bool = False
    norm_eps: float = ranged(1e-5, gt=0.0)
    bias: bool = True

    def __post_init__(self):
        check_ranges(self)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @classmethod
    def from_config(cls, cfg, **overrides) -> BlockConfig:
        """The block of a family config: every field of the same name copied, then ``overrides``.

        A family whose config has no field of a name (ViT has no ``norm_first``: its blocks are
        always pre-norm) passes it as an override, or takes BlockConfig's default.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"BlockConfig has no field {unknown[0]!r}")
        values = {name: getattr(cfg, name) for name in known if hasattr(cfg, name)}
        return cls(**{**values, **overrides})


class Residual(nn.Module):
    """x + Dropout(Sublayer(Norm(x))) (pre-norm) or Norm(x + Dropout(Sublayer(x))) (post-norm, paper)."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps)
        self.dropout = dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


def _attention(cfg: BlockConfig, *, cross: bool = False, position: PositionScheme | None = None) -> MultiHeadAttention:
    return MultiHeadAttention(cfg.d_model, cfg.n_heads, n_kv_heads=cfg.n_kv_heads, dropout=cfg.attn_dropout,
                              bias=cfg.bias, cross=cross, position=position)


class EncoderBlock(nn.Module):
    """Sec. 3.1: multi-head self-attention, then a position-wise feed-forward network.

    ``position``: the stack's position scheme (one object shared by its layers), or None.
    """

    def __init__(self, cfg: BlockConfig, *, position: PositionScheme | None = None):
        super().__init__()
        self.self_attn = _attention(cfg, position=position)
        self.attn_residual = Residual(cfg)
        self.ff = make_feedforward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=0.0, bias=cfg.bias)
        self.ff_residual = Residual(cfg)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, record: LayerRecord | None = None,
                unpadded: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, D), mask (B, 1, 1, T) -> (B, T, D).

        ``record``: this layer's slot of an AttentionRecord (its weights go there as "self"), or None.
        With ``unpadded``, x is (N, D), the real tokens only (qkv.unpad), and so is the output.
        """
        x = self.attn_residual(x, lambda h: self.self_attn(h, mask=mask, record=record, unpadded=unpadded))
        return self.ff_residual(x, self.ff)


def encoder_block_inference(block: EncoderBlock, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``block(x)`` for inference on the flat token matrix: x (B*T, D) -> (B*T, D), no mask.

    The same arithmetic as ``EncoderBlock.forward`` (a test proves the outputs equal) with less
    fixed cost per layer, which matters when each matmul takes tens of microseconds (a small ViT
    on CPU): no Residual calls, the attention's own steps (``project``, ``attend``, ``output``)
    without its argument checks, 2-D feed-forward matmuls, and each residual added in place into
    the sub-layer's fresh output. Pre-norm blocks only, and only where autograd records nothing
    (the in-place adds); the caller checks that.
    """
    if not block.attn_residual.norm_first:
        raise ValueError("encoder_block_inference computes pre-norm blocks (norm_first=True) only")
    attn, ff = block.self_attn, block.ff
    T, D = x.shape[0] // batch, x.shape[1]
    h = block.attn_residual.norm(x).view(batch, T, D)  # (B, T, D)
    q, k, v, offset = attn.project(h)  # (B, H, T, Dh), (B, Hkv, T, Dh) x 2
    heads = attn.attend(q, k, v, offset=offset)  # (B, H, T, Dh)
    x = attn.output(heads).view(batch * T, D).add_(x)  # x + MSA(LN(x)), (B*T, D)
    h = block.ff_residual.norm(x)
    if isinstance(ff, FeedForward):  # dropout inside is off in eval
        h = ff.w_2(ff.activation(ff.w_1(h)))
    else:
        h = ff(h)
    return h.add_(x)  # x + FFN(LN(x))


class DecoderBlock(nn.Module):
    """Sec. 3.1: masked (causal) self-attention, cross-attention over the encoder output, feed-forward.

    With ``cross=False`` it is the decoder-only (GPT) block: causal self-attention and feed-forward.
    ``position``: the stack's scheme for self-attention; cross-attention gets none.
    """

    def __init__(self, cfg: BlockConfig, *, cross: bool = True, position: PositionScheme | None = None):
        super().__init__()
        self.self_attn = _attention(cfg, position=position)
        self.self_residual = Residual(cfg)
        self.cross_attn = _attention(cfg, cross=True) if cross else None
        self.cross_residual = Residual(cfg) if cross else None
        self.ff = make_feedforward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=0.0, bias=cfg.bias)
        self.ff_residual = Residual(cfg)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: tuple[KVCache, KVCache | None] | None = None,
                record: LayerRecord | None = None) -> torch.Tensor:
        """x (B, T, D); memory (B, S, D); mask (B, 1, 1|T, T_total) on top of causal; memory_mask (B, 1, 1, S).

        cache: (self-attention cache, cross-attention cache) for incremental decoding.
        record: this layer's slot; self-attention weights (B, H, T, T_total) go there as "self",
        cross-attention weights (B, H, T, S) as "cross". Returns (B, T, D).
        """
        self_cache, cross_cache = cache if cache is not None else (None, None)
        if self.cross_attn is not None and memory is None and (cross_cache is None or not cross_cache.static):
            raise ValueError("this decoder block has cross-attention and needs memory (the encoder output)")
        x = self.self_residual(x, lambda h: self.self_attn(h, mask=mask, causal=True, cache=self_cache,
                                                           record=record))
        if self.cross_attn is not None:
            x = self.cross_residual(x, lambda h: self.cross_attn(h, memory=memory, mask=memory_mask,
                                                                 cache=cross_cache, record=record))
        return self.ff_residual(x, self.ff)


def layer_groups(model: nn.Module, below: Iterable[nn.Module | nn.Parameter | None],
                 layers: Iterable[nn.Module]) -> list[list[nn.Parameter]]:
    """A model's parameters by depth, for layer-wise learning rates (style rule 20).

    Group 0: the parameters of ``below`` (embeddings, positions: everything under the first layer);
    then one group per layer, in depth order; last: every parameter of ``model`` not yet taken
    (final norms, heads, the output projection). Each parameter appears once, in the lowest group
    that holds it (a tied output matrix stays with the embedding, a stack's shared position
    scheme below the layers).
    """
    seen: set[int] = set()

    def take(modules) -> list[nn.Parameter]:
        group = []
        for m in modules:
            params = [] if m is None else [m] if isinstance(m, nn.Parameter) else m.parameters()
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    group.append(p)
        return group

    return [take(below), *(take([layer]) for layer in layers), take([model])]
