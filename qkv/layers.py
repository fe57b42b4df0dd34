"""The Transformer's layers (sec. 3.2.2 and 3.3): multi-head attention, feed-forward, norms.

Shapes: B batch, T query length, S key length, D d_model, H heads, Hkv key/value heads,
Dh head dim, F d_ff.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.attention import attend
from qkv.masks import check_mask
from qkv.positional import PositionScheme
from qkv.record import LayerRecord
from qkv.unpad import Unpadded


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    Self-attention appends the new step's k, v (B, Hkv, T_new, Dh) to a buffer that grows by
    doubling, so each decoding step costs O(S) attention instead of recomputing O(S^2).
    Cross-attention stores the encoder's k, v once (``static``) and reuses them every step.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self.static = False

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T_new, Dh); return all keys and values so far (B, Hkv, S, Dh)."""
        new = k.shape[2]
        if self.k is None:
            capacity = max(16, 2 * new)
            self.k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            self.v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        elif self.length + new > self.k.shape[2]:
            capacity = max(2 * self.k.shape[2], self.length + new)
            self.k = _grow(self.k, self.length, capacity)
            self.v = _grow(self.v, self.length, capacity)
        self.k[:, :, self.length:self.length + new] = k
        self.v[:, :, self.length:self.length + new] = v
        self.length += new
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def set_static(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values computed once (the encoder's, for cross-attention)."""
        self.k, self.v, self.length, self.static = k, v, k.shape[2], True

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search: follow each surviving hypothesis)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on (sliding windows, speculative rollback)."""
        self.length = min(self.length, length)


class StackCache:
    """The decoder stack's cache: one (self-attention KVCache, cross-attention KVCache) pair per layer.

    ``length``: positions decoded so far. ``reorder(index)`` keeps batch rows ``index`` (beam
    search): the self-attention buffers only in their used part [:, :, :length], the static
    cross-attention keys and values once per layer.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [(KVCache(), KVCache()) for _ in range(n_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> tuple[KVCache, KVCache]:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0][0].length if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        for self_cache, cross_cache in self.layers:
            if self_cache.k is not None:
                used = self_cache.length
                self_cache.k = self_cache.k[:, :, :used].index_select(0, index)
                self_cache.v = self_cache.v[:, :, :used].index_select(0, index)
            cross_cache.reorder(index)


def _grow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    bigger = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    bigger[:, :, :used] = buffer[:, :, :used]
    return bigger


class MultiHeadAttention(nn.Module):
    """Sec. 3.2.2: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Self-attention (``cross=False``) projects q, k, v with one fused matrix; cross-attention
    (``cross=True``) takes queries from x and keys/values from ``memory`` (the encoder output).
    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (Ainslie et al. 2023).
    ``position`` is a ``PositionScheme`` (RoPE, ALiBi, ...): relative positions inside attention.

    ``forward`` is three public steps, which fast paths compose instead of reading the weights'
    layout: ``project`` (x -> q, k, v), ``attend`` (q, k, v -> heads), ``output`` (heads -> W^O).
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = True, cross: bool = False, position: PositionScheme | None = None):
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout, self.cross = dropout, cross
        kv_dim = n_kv_heads * self.head_dim
        if cross:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.kv_proj = nn.Linear(d_model, 2 * kv_dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.position = position

    @property
    def is_plain(self) -> bool:
        """Plain multi-head self-attention: no position scheme, as many key/value heads as query heads."""
        return self.position is None and self.n_kv_heads == self.n_heads and not self.cross

    def qkv_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """(W^Q, W^K, W^V), (b^Q, b^K, b^V) of self-attention: weights (H*Dh | Hkv*Dh, D), biases or None."""
        if self.cross:
            raise ValueError("qkv_weights is for self-attention; this layer has cross=True")
        sizes = [self.d_model, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
        weights = self.qkv_proj.weight.split(sizes, dim=0)
        b = self.qkv_proj.bias
        biases = b.split(sizes, dim=0) if b is not None else (None, None, None)
        return tuple(weights), tuple(biases)

    def _split(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, Dh)

    def project(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, cache: KVCache | None = None,
                unpadded: Unpadded | None = None):
        """x (B, T, D) -> q (B, H, T, Dh), k and v (B, Hkv, S, Dh), and the queries' position offset.

        Self-attention rotates the new q and k by the position scheme (at the cache's offset) and
        appends k, v to ``cache``; cross-attention projects ``memory`` (or reuses a static cache).
        With ``unpadded``, x is the (N, D) matrix of real tokens: the projection runs on those
        rows only, and the heads come back in the padded (B, T) layout that attention needs.
        """
        kv_dim = self.n_kv_heads * self.head_dim
        if not self.cross:
            qkv = self.qkv_proj(x)  # (B, T, D + 2 kv_dim), or (N, ...) when unpadded
            if unpadded is not None:
                qkv = unpadded.pad(qkv)  # (N, ...) -> (B, T, D + 2 kv_dim)
            q, k, v = qkv.split([self.d_model, kv_dim, kv_dim], dim=-1)
            q, k, v = self._split(q, self.n_heads), self._split(k, self.n_kv_heads), self._split(v, self.n_kv_heads)
            offset = cache.length if cache is not None else 0
            if self.position is not None:
                q, k = self.position.rotate(q, k, offset=offset)
            if cache is not None:
                k, v = cache.update(k, v)
            return q, k, v, offset
        q = self._split(self.q_proj(x), self.n_heads)
        if cache is not None and cache.static:
            return q, cache.k, cache.v, 0
        if memory is None:
            raise ValueError("cross-attention needs memory (the encoder output), got None")
        k, v = self.kv_proj(memory).split([kv_dim, kv_dim], dim=-1)
        k, v = self._split(k, self.n_kv_heads), self._split(v, self.n_kv_heads)
        if cache is not None:
            cache.set_static(k, v)
        return q, k, v, 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
               causal: bool = False, offset: int = 0, record: LayerRecord | None = None) -> torch.Tensor:
        """Eq. 1 per head with the scheme's bias: q (B, H, T, Dh), k, v (B, Hkv, S, Dh) -> (B, H, T, Dh).

        With a ``record`` slot the explicit math runs and its weights (B, H, T, S) go into the slot
        ("cross" or "self"); without one, the fused kernel. No argument checks (``attend``).
        """
        T, S = q.shape[2], k.shape[2]
        bias = self.position.bias(T, S, offset=offset) if self.position is not None else None
        dropout_p = self.dropout if self.training else 0.0
        if record is None:
            return attend(q, k, v, mask=mask, causal=causal, bias=bias, dropout_p=dropout_p)
        out, weights = attend(q, k, v, mask=mask, causal=causal, bias=bias, dropout_p=dropout_p, weights=True)
        record.put("cross" if self.cross else "self", weights)
        return out

    def output(self, heads: torch.Tensor, *, unpadded: Unpadded | None = None) -> torch.Tensor:
        """Concat(head_1..head_h) W^O: heads (B, H, T, Dh) -> (B, T, D), or (N, D) of real tokens when unpadded."""
        B, _, T, _ = heads.shape
        out = heads.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, H * Dh) = (B, T, D)
        if unpadded is not None:
            out = unpadded.unpad(out)  # (N, D)
        return self.out_proj(out)

    def check_inputs(self, x: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor | None,
                     cache: KVCache | None, unpadded: Unpadded | None) -> None:
        """The layer's boundary checks: shapes and dtypes only, never tensor data (rule 19)."""
        if unpadded is not None:
            if self.cross or x.dim() != 2 or x.shape[-1] != self.d_model:
                raise ValueError(f"unpadded attention takes self-attention on (N, d_model={self.d_model}), "
                                 f"got {tuple(x.shape)} with cross={self.cross}")
            B, T = unpadded.batch, unpadded.length
        elif x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        else:
            B, T = x.shape[0], x.shape[1]
        if memory is not None and (memory.dim() != 3 or memory.shape[-1] != self.d_model):
            raise ValueError(f"memory must have shape (B, S, d_model={self.d_model}), got {tuple(memory.shape)}")
        if memory is not None and not self.cross:
            raise ValueError("memory was given to a self-attention layer; build it with cross=True")
        if self.cross and memory is None and (cache is None or not cache.static):
            raise ValueError("cross-attention needs memory (the encoder output), got None")
        if mask is not None:
            check_mask(mask, "mask", (B, self.n_heads, T, self._key_length(T, memory, cache)))

    def _key_length(self, T: int, memory: torch.Tensor | None, cache: KVCache | None) -> int:
        """S: the keys this call attends over (the cached ones included)."""
        if self.cross:
            return cache.length if cache is not None and cache.static else memory.shape[1]
        return T + (cache.length if cache is not None else 0)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None, record: LayerRecord | None = None,
                unpadded: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, D); memory (B, S, D) for cross-attention; mask bool (B|1, H|1, T|1, S) -> (B, T, D).

        ``record``: a slot of an AttentionRecord (qkv.record) that takes this layer's weights, or None.
        With ``unpadded`` (self-attention only), x is the (N, D) matrix of real tokens and so is
        the output: the projections skip the padding, attention alone sees (B, T).
        """
        if not torch.compiler.is_compiling():
            self.check_inputs(x, memory, mask, cache, unpadded)
        if unpadded is not None and record is not None:
            raise ValueError("recording attention needs the padded (B, T, D) layout, not unpadded tokens")
        q, k, v, offset = self.project(x, memory=memory, cache=cache, unpadded=unpadded)
        heads = self.attend(q, k, v, mask=mask, causal=causal, offset=offset, record=record)  # (B, H, T, Dh)
        return self.output(heads, unpadded=unpadded)


FF_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
                  "silu": nn.SiLU, "swish": nn.SiLU}
"""FeedForward's activations; ``swish`` is ``silu``'s other name (Marian's, the opus-mt models')."""


class FeedForward(nn.Module):
    """Sec. 3.3, Eq. 2: FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (ReLU as in the paper, or GELU, or
    SiLU/Swish x * sigmoid(x), Ramachandran et al. 2017, as in Marian's opus-mt models)."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        activations = FF_ACTIVATIONS
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
        self.w_1 = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = activations[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.w_2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, F) -> (B, T, D)."""
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class SwiGLU(nn.Module):
    """Shazeer 2020, Eq. 6: FFN_SwiGLU(x) = (Swish(x W) * x V) W_2."""

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.w_2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, F) -> (B, T, D)."""
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.w_2(self.dropout(F.silu(gate) * up))


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity() when p == 0 (no call, no copy on the hot path)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_feedforward(d_model: int, d_ff: int, *, activation: str, dropout: float, bias: bool) -> nn.Module:
    """'relu' | 'gelu' | 'gelu_tanh' | 'silu' (alias 'swish') -> FeedForward; 'swiglu' -> SwiGLU."""
    if activation == "swiglu":
        return SwiGLU(d_model, d_ff, dropout=dropout, bias=bias)
    return FeedForward(d_model, d_ff, activation=activation, dropout=dropout, bias=bias)


def make_norm(kind: str, d_model: int, *, eps: float = 1e-5) -> nn.Module:
    """'layernorm' (Ba et al. 2016, as in the paper) or 'rmsnorm' (Zhang & Sennrich 2019)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
