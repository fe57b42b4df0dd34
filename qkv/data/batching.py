"""Batches by token count with length bucketing, and padding into tensors.

Sec. 5.1 of the paper: "Sentence pairs were batched together by approximate sequence length.
Each training batch contained a set of sentence pairs containing approximately 25000 source
tokens and 25000 target tokens." As in fairseq, a batch's cost is its padded size:
``batch size * longest example``, for the source and the target alike.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import numpy as np
import torch

from qkv.errors import DataError

logger = logging.getLogger(__name__)


def token_batches(
    lengths: Sequence[int] | Sequence[tuple[int, ...]],
    max_tokens: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_examples: int | None = None,
) -> list[list[int]]:
    """Group example indices into batches of at most ``max_tokens`` padded tokens; this rank's share.

    lengths: one length per example, or a tuple per example such as (src_len, tgt_len) -- the
        lengths of the tensors as collated (see ``collated_lengths``). A batch of B examples
        costs ``B * max(lengths in the batch)`` per side, which must be <= ``max_tokens``.
    Examples are sorted by length so that batches hold similar lengths (little padding); with
    ``shuffle``, equal lengths are ordered randomly and the batch order is shuffled, both from a
    local generator seeded by (seed, epoch) -- same arguments, same batches. Without it, the
    order is by length, ties by index. An example longer than ``max_tokens`` gets a batch of its
    own (logged) rather than being dropped. ``max_examples`` optionally caps the batch size.

    With ``world_size > 1`` every rank computes the same batch list and takes every
    ``world_size``-th batch from ``rank``: ranks are disjoint and together hold every example
    exactly once. So that all ranks take the same number of steps, the largest batches are
    split in two until the count divides by ``world_size``; only when there are fewer examples
    than ranks is the list padded by wrapping round (repeating batches).
    """
    _check_args(max_tokens, seed, epoch, rank, world_size, max_examples)
    table = _lengths_table(lengths)  # (N, K)
    if len(table) == 0:
        return []
    costs = np.maximum(table.max(axis=1), 1)  # (N,) padded tokens per example; empty ones still take a slot
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(table)) if shuffle else np.arange(len(table))
    keys = [table[order, k] for k in reversed(range(table.shape[1]))] + [costs[order]]
    order = order[np.lexsort(keys)]  # stable: ties keep the random (or index) order
    batches = _chunk(order, costs[order], max_tokens, max_examples)
    batches = _split_to_multiple(batches, world_size)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    if len(batches) % world_size:
        missing = world_size - len(batches) % world_size
        batches = batches + [batches[i % len(batches)] for i in range(missing)]
    return [[int(i) for i in b] for b in batches[rank::world_size]]


def collated_lengths(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[int, int]]:
    """(S, T) of each pair as ``collate_pairs`` pads it: the source as is, the target plus bos/eos."""
    return [(len(src), len(tgt) + 1) for src, tgt in pairs]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-pad id lists into a (B, L) long tensor, L the longest length."""
    if len(seqs) == 0:
        raise DataError("seqs: empty batch")
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), longest), pad_id, dtype=torch.long)  # (B, L)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int, bos_id: int, eos_id: int
) -> dict[str, torch.Tensor]:
    """Pad (source ids, target ids) pairs into the tensors of teacher-forced training.

    Returns ``src`` (B, S), ``tgt_in`` (B, T) = [bos] + y and ``tgt_out`` (B, T) = y + [eos],
    right-padded with ``pad_id`` (also in ``tgt_out``, so a loss with ``ignore_index=pad_id``
    skips padding). The source is used as given: add eos there with ``encode(add_eos=True)``
    if the model wants it. An empty source is an error; an empty target gives [bos] -> [eos].
    """
    if len(pairs) == 0:
        raise DataError("pairs: empty batch")
    for i, (src, _) in enumerate(pairs):
        if len(src) == 0:
            raise DataError(f"pairs[{i}]: empty source sequence")
    src = pad_sequences([s for s, _ in pairs], pad_id)  # (B, S)
    tgt_in = pad_sequences([[bos_id, *t] for _, t in pairs], pad_id)  # (B, T)
    tgt_out = pad_sequences([[*t, eos_id] for _, t in pairs], pad_id)  # (B, T)
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def _check_args(max_tokens: int, seed: int, epoch: int, rank: int, world_size: int, max_examples: int | None) -> None:
    if max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} must be >= 1")
    if seed < 0 or epoch < 0:
        raise DataError(f"seed={seed} and epoch={epoch} must be >= 0")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples={max_examples} must be >= 1 or None")


def _lengths_table(lengths: Sequence[int] | Sequence[tuple[int, ...]]) -> np.ndarray:
    """(N, K) int64 array of the lengths: K = 1 for plain lengths, else the tuple width."""
    rows = [(x,) if isinstance(x, (int, np.integer)) else tuple(x) for x in lengths]
    if not rows:
        return np.zeros((0, 1), dtype=np.int64)
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width or width == 0:
            raise DataError(f"lengths[{i}]={lengths[i]!r}: expected {width or 'at least one'} lengths like lengths[0]")
        if any(not isinstance(v, (int, np.integer)) or v < 0 for v in row):
            raise DataError(f"lengths[{i}]={lengths[i]!r}: lengths must be non-negative integers")
    return np.asarray(rows, dtype=np.int64)


def _chunk(order: np.ndarray, costs: np.ndarray, max_tokens: int, max_examples: int | None) -> list[np.ndarray]:
    """Greedy cut of indices sorted by ascending cost, so the newest example is the longest."""
    batches, start = [], 0
    for j in range(len(order)):
        size = j - start + 1
        if size > 1 and (costs[j] * size > max_tokens or (max_examples is not None and size > max_examples)):
            batches.append(order[start:j])
            start = j
    batches.append(order[start:])
    oversize = int((costs > max_tokens).sum())
    if oversize:
        logger.warning("%d examples are longer than max_tokens=%d; each gets a batch of its own", oversize, max_tokens)
    return batches


def _split_to_multiple(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Split the largest batches in two until their count divides by ``world_size``.

    Halves of a batch stay within its token budget. Stops early when every batch is a single
    example; the caller then wraps round.
    """
    missing = (-len(batches)) % world_size
    if missing == 0:
        return batches
    heap = [(-len(b), (i,), b) for i, b in enumerate(batches)]  # (i,) keeps length order and breaks ties
    heapq.heapify(heap)
    for _ in range(missing):
        neg_size, key, b = heapq.heappop(heap)
        if -neg_size < 2:
            heapq.heappush(heap, (neg_size, key, b))
            break
        half = len(b) // 2
        heapq.heappush(heap, (-half, (*key, 0), b[:half]))
        heapq.heappush(heap, (half - len(b), (*key, 1), b[half:]))
    return [b for _, _, b in sorted(heap, key=lambda item: item[1])]
