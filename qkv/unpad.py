"""Skipping padding: run token-wise layers on the real tokens only.

A batch of B texts padded to T positions holds N <= B*T real tokens. Every layer of an encoder
block except attention itself is token-wise (projections, residuals, norms, feed-forward), so it
can run on the (N, D) matrix of real tokens and skip the padding's share of the work; attention
needs the (B, T) layout back, for one call. The results at real tokens are the same: padded keys
are masked out of attention, and nothing else mixes positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Unpadded:
    """Where the N real tokens of a (B, T) batch sit in its flattened (B*T,) positions."""

    index: torch.Tensor  # (N,) long, increasing
    batch: int
    length: int

    @staticmethod
    def from_mask(mask: torch.Tensor) -> Unpadded:
        """mask (B, T) bool, True = real token."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool (B, T) tensor, got {mask.dtype} {tuple(mask.shape)}")
        return Unpadded(mask.flatten().nonzero().squeeze(1), mask.shape[0], mask.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.index.numel()

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        return x.reshape(self.batch * self.length, x.shape[-1]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at padding."""
        full = x.new_zeros(self.batch * self.length, x.shape[-1])
        return full.index_copy(0, self.index, x).view(self.batch, self.length, x.shape[-1])


def worth_unpadding(mask: torch.Tensor, *, min_padding: float = 0.1) -> bool:
    """True when at least ``min_padding`` of the (B, T) positions are padding.

    Below that the gathers and scatters cost more than the padding they save (measured on the
    MiniLM encoder, docs/benchmarks.md).
    """
    return mask.numel() > 0 and (mask.numel() - int(mask.sum())) >= min_padding * mask.numel()
