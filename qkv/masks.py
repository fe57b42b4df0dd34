"""Attention masks: the only place masks are built.

Convention (STYLE.md rule 2): a mask is a bool tensor, ``True`` = may attend,
broadcastable to (B, H, T, S) -- B batch, H heads, T query length, S key length.
"""

from __future__ import annotations

import torch


def padding_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Keys that are real tokens, from token ids.

    ids: (B, S) integer token ids. Returns (B, 1, 1, S) bool, False at padding.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must have shape (B, S), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    return (ids != pad_id)[:, None, None, :]  # (B, 1, 1, S)


def check_token_ids(ids: torch.Tensor, vocab_size: int, *, name: str = "ids") -> None:
    """Raise ValueError unless ``ids`` are integers in [0, vocab_size): a model's boundary check.

    It reads the tensor's data (min and max), so it runs once per model call at the public entry,
    never inside a compiled region (style rule 19).
    """
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name}: token ids must be in [0, {vocab_size}), got range [{low}, {high}]")


def lengths_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Keys that are real tokens, from sequence lengths (right padding).

    lengths: (B,) integer lengths. Returns (B, 1, 1, S) bool with S = max_len or max(lengths).
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("lengths must be non-negative")
    longest = int(lengths.max()) if lengths.numel() else 0
    S = longest if max_len is None else max_len
    if longest > S:
        raise ValueError(f"max_len={max_len} is shorter than the longest length {longest}")
    positions = torch.arange(S, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)


def causal_mask(T: int, S: int | None = None, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Query i may attend key j when j <= i + (S - T).

    The diagonal is aligned bottom-right, so T new queries at the end of a cache of S keys
    see every earlier key (incremental decoding). Returns (1, 1, T, S) bool.
    """
    S = T if S is None else S
    if T < 0 or S < 0:
        raise ValueError(f"lengths must be non-negative, got T={T}, S={S}")
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (j <= i + (S - T))[None, None]  # (1, 1, T, S)


def sliding_window_mask(T: int, S: int | None = None, *, window: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Causal mask that also hides keys more than ``window - 1`` positions back. (1, 1, T, S)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    S = T if S is None else S
    i = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    return ((j <= i) & (j > i - window))[None, None]


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical AND of the given masks (None means 'attend everywhere')."""
    result = None
    for m in masks:
        if m is None:
            continue
        check_mask(m, "mask")
        result = m if result is None else result & m
    return result


def check_mask(mask: torch.Tensor, name: str = "mask", shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError unless ``mask`` is bool and broadcastable to ``shape`` (B, H, T, S)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if mask.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims (B, H, T, S), got shape {tuple(mask.shape)}")
    if shape is not None and not broadcasts_to(mask.shape, shape):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = {tuple(shape)}")


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (each trailing dim 1 or equal).

    Plain integer comparisons: ``torch.broadcast_shapes`` costs ~50 us per call on CPU, more than
    the fused kernel a mask check guards at small shapes.
    """
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))
