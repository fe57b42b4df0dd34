"""Positional information: attention itself is blind to order (it is permutation-equivariant).

Absolute encodings are added to the token embeddings (B, T, D):
    sinusoidal (sec. 3.5, Eq. PE) -- fixed, bounded in [-1, 1], defined for any position;
    learned (Gehring et al. 2017; BERT, GPT-2) -- one trained vector per position up to max_len.
Relative schemes act inside attention, on q and k or on the scores; each is a
``PositionScheme``, the one object MultiHeadAttention takes as ``position=`` (style rule 18):
    RoPE (Su et al. 2021) -- rotates q and k so that q_m . k_n depends on m - n only;
    ALiBi (Press et al. 2022) -- adds -slope_h * distance to the scores; no parameters;
    T5 (Raffel et al. 2020, sec. 2.1) -- adds a learned scalar per head and distance bucket.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, d_model: int, *, base: float = 10000.0) -> torch.Tensor:
    """Sec. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...). (n, D)."""
    if d_model % 2:
        raise ValueError(f"d_model={d_model} must be even for sinusoidal encodings")
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (n, 1)
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (D/2,)
    angles = position * inv_freq  # (n, D/2)
    table = torch.empty(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed encodings of sec. 3.5; positions past the cached table are computed on demand."""

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, T: int, *, offset: int = 0) -> torch.Tensor:
        """Encodings of positions offset .. offset+T-1, shape (T, D)."""
        end = offset + T
        if end > self.table.shape[0]:
            self.table = sinusoidal_table(max(end, 2 * self.table.shape[0]), self.d_model).to(self.table.device)
        return self.table[offset:end]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Encodings of arbitrary positions: (B, T) integer -> (B, T, D)."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.table.shape[0]:
            self.forward(needed)  # grows the table
        return self.table[positions]


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position; positions beyond max_len are an error, not a crash."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, T: int, *, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions offset .. offset+T-1, shape (T, D)."""
        if offset + T > self.max_len:
            raise ValueError(
                f"sequence of {offset + T} positions exceeds the learned position table "
                f"(max_len={self.max_len}); shorten the input or train with a larger max_len"
            )
        return self.embedding.weight[offset:offset + T]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of arbitrary positions: (B, T) integer -> (B, T, D)."""
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is beyond the learned position table "
                             f"(max_len={self.max_len})")
        return self.embedding(positions)


class PositionScheme(nn.Module):
    """Relative positions inside attention: rotate q and k, or add a bias to the scores.

    scores = rotate(q) rotate(k)^T / sqrt(d_k) + bias; a scheme overrides one step or both,
    the defaults leave attention as it is. Queries sit at positions offset .. offset+T-1 (a KV
    cache gives offset = the positions already seen), keys at 0 .. S-1.
    """

    def rotate(self, q: Tensor, k: Tensor, *, offset: int) -> tuple[Tensor, Tensor]:
        """q (B, H, T, Dh), k (B, Hkv, T, Dh): the new queries and keys at offset .. offset+T-1."""
        return q, k

    def bias(self, T: int, S: int, *, offset: int) -> Tensor | None:
        """(H, T, S) added to the scores, or None for no bias."""
        return None


class RotaryEmbedding(PositionScheme):
    """RoPE (Su et al. 2021, Eq. 34): rotate each pair of features by angle pos * theta_i.

    Applied to q and k of shape (B, H, T, Dh) before the dot product, so that
    <rope(q, m), rope(k, n)> is a function of q, k and m - n only. Pairs are the two halves of
    the head dim (the GPT-NeoX / Llama layout).
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, max_len: int = 2048):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
        self.head_dim = head_dim
        self.base = base
        self._build(max_len)

    def _build(self, n: int, device=None) -> None:
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim)
        angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq  # (n, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n, Dh)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """x (B, H, T, Dh) at positions offset .. offset+T-1 -> rotated x, same shape and dtype."""
        T = x.shape[-2]
        if offset + T > self.cos.shape[0]:
            self._build(max(offset + T, 2 * self.cos.shape[0]), device=self.cos.device)
        cos = self.cos[offset:offset + T].to(x.dtype)  # (T, Dh)
        sin = self.sin[offset:offset + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated_half = torch.cat([-x2, x1], dim=-1)  # (B, H, T, Dh)
        return x * cos + rotated_half * sin

    def rotate(self, q: Tensor, k: Tensor, *, offset: int) -> tuple[Tensor, Tensor]:
        """q (B, H, T, Dh), k (B, Hkv, T, Dh) -> both rotated at positions offset .. offset+T-1."""
        return self(q, offset=offset), self(k, offset=offset)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al. 2022, sec. 3: geometric slopes 2^(-8/n), 2^(-16/n), ... for n heads. (H,).

    For a head count that is not a power of two, take the slopes of the next lower power of
    two and fill in from every other slope of the next higher one (the paper's recipe).
    """
    def power_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        lower = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes)


class ALiBi(PositionScheme):
    """Attention with Linear Biases: scores += -slope_h * |i - j|. No parameters, no embeddings."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, T: int, S: int, *, offset: int | None = None) -> torch.Tensor:
        """Bias (H, T, S) for T queries at positions offset.. against S keys at 0..S-1.

        offset defaults to S - T (the queries are the last T positions, as with a KV cache).
        """
        offset = S - T if offset is None else offset
        i = torch.arange(offset, offset + T, device=self.slopes.device)[:, None]
        j = torch.arange(S, device=self.slopes.device)[None, :]
        distance = (i - j).abs().float()  # (T, S)
        return -self.slopes[:, None, None] * distance  # (H, T, S)

    def bias(self, T: int, S: int, *, offset: int) -> Tensor:
        """-slope_h * |i - j| for queries i = offset .. offset+T-1, keys j = 0 .. S-1. (H, T, S)."""
        return self(T, S, offset=offset)


def t5_bucket(relative_position: Tensor, *, bidirectional: bool, num_buckets: int = 32,
              max_distance: int = 128) -> Tensor:
    """Raffel et al. 2020, sec. 2.1 (Mesh TensorFlow, Hugging Face ``T5Attention``): distance -> bucket.

    relative_position = memory_position - query_position (integer, any shape). Bidirectional:
    half the buckets for keys after the query (n > 0), half for the others, on |n|; causal:
    n = max(-n, 0), all buckets for the past. Within its half, with max_exact = buckets // 2:
        n < max_exact  ->  bucket n                                        (one per distance)
        else           ->  max_exact + floor(log(n / max_exact) / log(max_distance / max_exact)
                                             * (buckets - max_exact)),  at most buckets - 1
    so every distance >= max_distance shares the last bucket. Same shape, int64, in [0, num_buckets).
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    # clamp: log(0) would be -inf, and the small distances take the exact branch anyway
    far = distance.clamp(min=max_exact).float()
    log_bucket = max_exact + (torch.log(far / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class T5RelativeBias(PositionScheme):
    """T5's relative position bias (Raffel et al. 2020, sec. 2.1): scores += b_h(bucket(j - i)).

    One learned scalar per (bucket, head), ``nn.Embedding(num_buckets, n_heads)``, looked up by
    the bucketed distance from query i to key j (``t5_bucket``). ``bidirectional=True`` for an
    encoder, False for a causal decoder. A stack shares one module across its layers, as T5 does.
    """

    def __init__(self, n_heads: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        half = num_buckets // 2 if bidirectional else num_buckets
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        if half < 2:
            raise ValueError(f"num_buckets={num_buckets} is too few for bidirectional={bidirectional} "
                             f"(need >= {4 if bidirectional else 2})")
        if max_distance <= half // 2:
            raise ValueError(f"max_distance={max_distance} must exceed the {half // 2} exact buckets "
                             f"(num_buckets={num_buckets}, bidirectional={bidirectional})")
        self.n_heads, self.bidirectional = n_heads, bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, n_heads)
        nn.init.normal_(self.embedding.weight, std=0.02)  # small next to scaled scores, as our learned positions

    def bias(self, T: int, S: int, *, offset: int) -> Tensor:
        """b_h(bucket(j - i)) for queries i = offset .. offset+T-1, keys j = 0 .. S-1. (H, T, S)."""
        device = self.embedding.weight.device
        query = torch.arange(offset, offset + T, device=device)[:, None]  # (T, 1)
        key = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = t5_bucket(key - query, bidirectional=self.bidirectional,
                            num_buckets=self.num_buckets, max_distance=self.max_distance)  # (T, S)
        return self.embedding(buckets).permute(2, 0, 1)  # (T, S, H) -> (H, T, S)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, bidirectional={self.bidirectional}, "
                f"num_buckets={self.num_buckets}, max_distance={self.max_distance}")
