"""Encoder and decoder blocks (sec. 3.1), shared by every model family.

Each sub-layer is wrapped in a residual connection with layer normalisation. The paper uses
post-norm, LayerNorm(x + Sublayer(x)); most modern models use pre-norm,
x + Sublayer(LayerNorm(x)), which trains without warm-up tricks and needs a final norm.
Dropout is applied to each sub-layer's output before it is added (sec. 5.4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qkv.layers import FeedForward, KVCache, MultiHeadAttention, dropout, make_feedforward, make_norm
from qkv.positional import ALiBi, RotaryEmbedding
from qkv.unpad import Unpadded


@dataclass(frozen=True)
class BlockConfig:
    """Hyper-parameters of one block; the paper's base model is d_model=512, n_heads=8, d_ff=2048."""

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_kv_heads: int | None = None
    dropout: float = 0.1
    attn_dropout: float = 0.0
    activation: str = "relu"
    norm: str = "layernorm"
    norm_first: bool = False
    norm_eps: float = 1e-5
    bias: bool = True

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


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


def _attention(cfg: BlockConfig, *, cross: bool = False, rope=None, alibi=None) -> MultiHeadAttention:
    return MultiHeadAttention(cfg.d_model, cfg.n_heads, n_kv_heads=cfg.n_kv_heads, dropout=cfg.attn_dropout,
                              bias=cfg.bias, cross=cross, rope=rope, alibi=alibi)


class EncoderBlock(nn.Module):
    """Sec. 3.1: multi-head self-attention, then a position-wise feed-forward network."""

    def __init__(self, cfg: BlockConfig, *, rope: RotaryEmbedding | None = None, alibi: ALiBi | None = None):
        super().__init__()
        self.self_attn = _attention(cfg, rope=rope, alibi=alibi)
        self.attn_residual = Residual(cfg)
        self.ff = make_feedforward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=0.0, bias=cfg.bias)
        self.ff_residual = Residual(cfg)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False,
                unpadded: Unpadded | None = None):
        """x (B, T, D), mask (B, 1, 1, T) -> (B, T, D) [, {"self": (B, H, T, T)}].

        With ``unpadded``, x is (N, D), the real tokens only (qkv.unpad), and so is the output.
        """
        weights = {}
        if unpadded is not None and return_weights:
            raise ValueError("return_weights needs the padded (B, T, D) layout, not unpadded tokens")

        def attend(h):
            if unpadded is not None:
                return self.self_attn(h, mask=mask, unpadded=unpadded)
            if not return_weights:
                return self.self_attn(h, mask=mask)
            out, weights["self"] = self.self_attn(h, mask=mask, return_weights=True)
            return out

        x = self.attn_residual(x, attend)
        x = self.ff_residual(x, self.ff)
        return (x, weights) if return_weights else x


def flat_inference_ready(block: EncoderBlock) -> bool:
    """Whether ``encoder_block_inference`` computes this block: pre-norm, plain multi-head self-attention, eval."""
    attn = block.self_attn
    return (not block.training and block.attn_residual.norm_first and attn.rope is None and attn.alibi is None
            and attn.n_kv_heads == attn.n_heads and not attn.cross)


def encoder_block_inference(block: EncoderBlock, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``block(x)`` for inference on the flat token matrix: x (B*T, D) -> (B*T, D), no mask.

    The same arithmetic as ``EncoderBlock.forward`` (a test proves the outputs equal) with less
    fixed cost per layer, which matters when each matmul takes tens of microseconds (a small ViT
    on CPU: 169 vs 235 us per layer at batch 1, ~50 us of ~1.7 ms at batch 64): no module calls but
    the norms and the activation, 2-D matmuls (``addmm``, no (B, T, D) views), the fused attention
    kernel without the wrapper's argument checks, and each residual added in place into the
    sub-layer's fresh output. Only for ``flat_inference_ready`` blocks, and only where autograd
    records nothing (the in-place adds); the caller checks both.
    """
    attn, ff = block.self_attn, block.ff
    D, H, Dh = attn.d_model, attn.n_heads, attn.head_dim
    T = x.shape[0] // batch
    h = block.attn_residual.norm(x)  # (B*T, D)
    qkv = F.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias)  # (B*T, 3D)
    q, k, v = qkv.view(batch, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh) -> (B, H, T, Dh) each
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
    out = out.transpose(1, 2).reshape(batch * T, D)  # (B*T, H*Dh)
    x = F.linear(out, attn.out_proj.weight, attn.out_proj.bias).add_(x)  # x + MSA(LN(x))
    h = block.ff_residual.norm(x)
    if isinstance(ff, FeedForward):  # dropout inside is off in eval
        h = F.linear(ff.activation(F.linear(h, ff.w_1.weight, ff.w_1.bias)), ff.w_2.weight, ff.w_2.bias)
    else:
        h = ff(h)
    return h.add_(x)  # x + FFN(LN(x))


class DecoderBlock(nn.Module):
    """Sec. 3.1: masked (causal) self-attention, cross-attention over the encoder output, feed-forward.

    With ``cross=False`` it is the decoder-only (GPT) block: causal self-attention and feed-forward.
    """

    def __init__(self, cfg: BlockConfig, *, cross: bool = True, rope: RotaryEmbedding | None = None,
                 alibi: ALiBi | None = None):
        super().__init__()
        self.self_attn = _attention(cfg, rope=rope, alibi=alibi)
        self.self_residual = Residual(cfg)
        self.cross_attn = _attention(cfg, cross=True) if cross else None
        self.cross_residual = Residual(cfg) if cross else None
        self.ff = make_feedforward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=0.0, bias=cfg.bias)
        self.ff_residual = Residual(cfg)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: tuple[KVCache, KVCache] | None = None,
                return_weights: bool = False):
        """x (B, T, D); memory (B, S, D); mask (B, 1, 1|T, T_total) on top of causal; memory_mask (B, 1, 1, S).

        cache: (self-attention cache, cross-attention cache) for incremental decoding.
        Returns (B, T, D) [, {"self": (B, H, T, T_total), "cross": (B, H, T, S)}].
        """
        if self.cross_attn is not None and memory is None and (cache is None or not cache[1].static):
            raise ValueError("this decoder block has cross-attention and needs memory (the encoder output)")
        self_cache, cross_cache = cache if cache is not None else (None, None)
        weights = {}

        def self_attend(h):
            if not return_weights:
                return self.self_attn(h, mask=mask, causal=True, cache=self_cache)
            out, weights["self"] = self.self_attn(h, mask=mask, causal=True, cache=self_cache, return_weights=True)
            return out

        def cross_attend(h):
            if not return_weights:
                return self.cross_attn(h, memory=memory, mask=memory_mask, cache=cross_cache)
            out, weights["cross"] = self.cross_attn(h, memory=memory, mask=memory_mask, cache=cross_cache,
                                                    return_weights=True)
            return out

        x = self.self_residual(x, self_attend)
        if self.cross_attn is not None:
            x = self.cross_residual(x, cross_attend)
        x = self.ff_residual(x, self.ff)
        return (x, weights) if return_weights else x


def wanted_layers(return_attention: bool | Iterable[int], n_layers: int) -> set[int]:
    """Which layers should return weights: True = all, False = none, or an iterable of indices."""
    if return_attention is True:
        return set(range(n_layers))
    if not return_attention:
        return set()
    layers = {int(i) % n_layers if -n_layers <= int(i) < n_layers else int(i) for i in return_attention}
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"return_attention names layers {bad}, but the stack has {n_layers} layers")
    return layers
