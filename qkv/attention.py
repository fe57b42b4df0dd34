"""Attention as pure functions (sec. 3.2 of Vaswani et al. 2017, and its ancestors).

Attention is retrieval: a query is compared with every key, softmax turns the similarities
into weights that sum to one, and the output is the weighted sum of the values. The functions
differ only in how they compare a query with a key:

    scaled dot-product (Vaswani 2017)   s = q . k / sqrt(d_k)
    multiplicative, dot (Luong 2015)    s = q . k
    multiplicative, general (Luong)     s = q^T W k
    additive (Bahdanau 2015)            s = v_a^T tanh(W_q q + W_k k)

Shapes: q (..., T, Dq), k (..., S, Dk), v (..., S, Dv); masks are bool, True = may attend,
broadcastable to (..., T, S). A query whose keys are all masked gets a zero output, zero weights
and finite gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qkv.masks import broadcasts_to, causal_mask, check_mask

__all__ = [
    "Retrieval",
    "attend",
    "retrieve",
    "scaled_dot_product_attention",
    "attention_from_scores",
    "multiplicative_attention",
    "additive_attention",
]


class Retrieval(NamedTuple):
    """The steps of one soft look-up: similarities s_i, weights a_i, output sum_i a_i v_i."""

    scores: torch.Tensor
    weights: torch.Tensor
    output: torch.Tensor


def retrieve(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float | None = None) -> Retrieval:
    """Attention as retrieval: one query against a table of keys and values.

    query (Dk,), keys (S, Dk), values (S, Dv). s_i = q . k_i * scale, a = softmax(s),
    output = sum_i a_i v_i. ``scale`` defaults to 1/sqrt(Dk) as in Eq. 1.
    """
    if query.dim() != 1 or keys.dim() != 2 or values.dim() != 2:
        raise ValueError(
            f"retrieve wants query (Dk,), keys (S, Dk), values (S, Dv); got {tuple(query.shape)}, "
            f"{tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows but values has {values.shape[0]}")
    if keys.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} features but keys have {keys.shape[1]}")
    scale = 1.0 / math.sqrt(query.shape[0]) if scale is None else scale
    scores = keys @ query * scale  # (S,)
    weights = torch.softmax(scores, dim=-1)  # (S,)
    return Retrieval(scores, weights, weights @ values)  # output (Dv,)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int | None = 4) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if rank is not None and t.dim() != rank:
            raise ValueError(f"{name} must have shape (B, H, len, Dh) (rank {rank}), got shape {tuple(t.shape)}")
        if rank is None and t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., len, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length S, got {k.shape[-2]} and {v.shape[-2]}")


def _attend_mask(mask: torch.Tensor | None, causal: bool, T: int, S: int, device) -> torch.Tensor | None:
    """The one bool mask to apply: the caller's mask AND the causal one (bottom-right aligned)."""
    if causal:
        c = causal_mask(T, S, device=device)
        mask = c if mask is None else mask & c
    return mask


def attention_from_scores(scores: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                          dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) V with a bool mask; fully masked rows give zero weights and zero output.

    scores (..., T, S), v (..., S, Dv) -> output (..., T, Dv), weights (..., T, S).
    The softmax is computed in float32 for float16/bfloat16 inputs.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    half = scores.dtype in (torch.float16, torch.bfloat16)
    weights = torch.softmax(scores.float() if half else scores, dim=-1)
    if mask is not None:
        # A row with no key to attend is all -inf -> NaN after softmax; it retrieves nothing.
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    weights = weights.to(v.dtype)
    attended = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return attended @ v, weights


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
):
    """Eq. 1, sec. 3.2.1: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

    q (B, H, T, Dh); k, v (B, Hkv, S, Dh) with H a multiple of Hkv (grouped-query heads).
    mask: bool, True = may attend, broadcastable to (B, H, T, S). causal: query i sees keys
    j <= i + S - T. bias: float added to the scores (e.g. ALiBi), broadcastable to (B, H, T, S).
    Returns the output (B, H, T, Dh), or (output, weights (B, H, T, S)) when return_weights.

    Without weights the fused kernel ``F.scaled_dot_product_attention`` runs; with weights the
    explicit math of ``attend`` runs. Tests prove the two agree. Every argument is checked here,
    then ``attend`` computes; modules call ``attend`` directly.
    """
    _check_qkv(q, k, v)
    B, H, T, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[-1] != Dh:
        raise ValueError(f"q and k must have the same head dim, got {Dh} and {k.shape[-1]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same (B, H), got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if k.shape[0] != B and 1 not in (B, k.shape[0]):
        raise ValueError(f"q and k must have the same batch size B, got {B} and {k.shape[0]}")
    if H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads {Hkv}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if mask is not None:
        check_mask(mask, "mask", (B, H, T, S))
    if bias is not None:
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point tensor, got dtype {bias.dtype}")
        if not broadcasts_to(bias.shape, (B, H, T, S)):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to {(B, H, T, S)}")
    return attend(q, k, v, mask=mask, causal=causal, bias=bias, dropout_p=dropout_p, scale=scale,
                  weights=return_weights)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
           causal: bool = False, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
           scale: float | None = None, weights: bool = False):
    """The kernel of ``scaled_dot_product_attention`` without its checks (style rule 19).

    Eq. 1: softmax(Q K^T / sqrt(d_k) + bias) V, with the shapes and conventions of
    ``scaled_dot_product_attention``. For modules whose inputs were validated once at the model's
    entry: no argument checks and no reads of tensor data, so nothing here breaks a
    ``torch.compile`` graph or syncs a GPU. Returns the output (B, H, T, Dh), or (output, weights
    (B, H, T, S)) from the explicit math path when ``weights``.
    """
    T, S, Dh = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    if causal and T == 1:  # one new query at the end sees every key: no mask to build
        causal = False
    if not weights:
        return _fused(q, k, v, mask=mask, causal=causal, bias=bias, dropout_p=dropout_p, scale=scale)
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:  # each key/value head serves H // Hkv query heads
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
        v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    mask = _attend_mask(mask, causal, T, S, q.device)
    return attention_from_scores(scores, v, mask=mask, dropout_p=dropout_p)


def _fused(q, k, v, *, mask, causal, bias, dropout_p, scale):
    T, S = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if causal and mask is None and bias is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    mask = _attend_mask(mask, causal, T, S, q.device)
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    else:
        attn_mask = mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=gqa)
    if mask is not None and bias is not None:
        # A float mask row of all -inf is not guaranteed to give zeros by every backend.
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return out


def multiplicative_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """Luong et al. 2015, sec. 3.1: score(h_t, h_s) = h_t . h_s ("dot"), or h_t^T W_a h_s ("general").

    q (..., T, Dq), k (..., S, Dk), v (..., S, Dv); weight (Dq, Dk) for "general", None for
    "dot" (then Dq == Dk). Unscaled: compare with Eq. 1 to see what 1/sqrt(d_k) buys.
    Returns output (..., T, Dv), and weights (..., T, S) when asked.
    """
    _check_qkv(q, k, v, rank=None)
    if weight is None:
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"dot attention needs q and k of one size, got {q.shape[-1]} and {k.shape[-1]}")
        scores = q @ k.transpose(-2, -1)  # (..., T, S)
    else:
        if weight.shape != (q.shape[-1], k.shape[-1]):
            expected = (q.shape[-1], k.shape[-1])
            raise ValueError(f"weight must have shape (Dq, Dk) = {expected}, got {tuple(weight.shape)}")
        scores = (q @ weight) @ k.transpose(-2, -1)  # (..., T, Dk) @ (..., Dk, S) -> (..., T, S)
    if mask is not None:
        check_mask(mask, "mask", tuple(scores.shape))
    out, weights = attention_from_scores(scores, v, mask=mask)
    return (out, weights) if return_weights else out


def additive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    v_a: torch.Tensor,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """Bahdanau et al. 2015, eq. 6 / appendix A.1.2: e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j).

    q (..., T, Dq), k (..., S, Dk), v (..., S, Dv); w_q (A, Dq), w_k (A, Dk), v_a (A,) with A the
    attention hidden size. Memory grows as T * S * A: the price of a learned comparison.
    Returns output (..., T, Dv), and weights (..., T, S) when asked.
    """
    _check_qkv(q, k, v, rank=None)
    if w_q.dim() != 2 or w_q.shape[1] != q.shape[-1]:
        raise ValueError(f"w_q must have shape (A, Dq={q.shape[-1]}), got {tuple(w_q.shape)}")
    if w_k.dim() != 2 or w_k.shape != (w_q.shape[0], k.shape[-1]):
        raise ValueError(f"w_k must have shape (A={w_q.shape[0]}, Dk={k.shape[-1]}), got {tuple(w_k.shape)}")
    if v_a.shape != (w_q.shape[0],):
        raise ValueError(f"v_a must have shape (A={w_q.shape[0]},), got {tuple(v_a.shape)}")
    projected_q = q @ w_q.T  # (..., T, A)
    projected_k = k @ w_k.T  # (..., S, A)
    hidden = torch.tanh(projected_q.unsqueeze(-2) + projected_k.unsqueeze(-3))  # (..., T, S, A)
    scores = hidden @ v_a  # (..., T, S)
    if mask is not None:
        check_mask(mask, "mask", tuple(scores.shape))
    out, weights = attention_from_scores(scores, v, mask=mask)
    return (out, weights) if return_weights else out
