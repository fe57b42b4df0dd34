"""Language-model data: text files -> one token stream -> random contiguous blocks.

As in nanoGPT, training samples blocks of ``block_size + 1`` tokens at random offsets: x is the
first ``block_size`` tokens and y the same block shifted by one. Sampling is deterministic in
(seed, epoch, index), so a resumed run sees exactly the batches it would have seen. Under data
parallelism rank r of N draws the epoch's batches r, r + N, r + 2N, ...: together the ranks draw
the same batches as one process, in the same global order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from qkv.data.text import read_lines
from qkv.errors import DataError


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file, checked line by line (bad bytes, NULs are errors naming file:line)."""
    lines = read_lines(path, allow_empty=True)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: no text")
    return "\n".join(lines) + "\n"


def read_texts(paths: Sequence[str | os.PathLike]) -> str:
    if not paths:
        raise DataError("data.train: no text files given")
    return "".join(read_text(p) for p in paths)


def split_ids(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) of the stream for training, the rest for validation (nanoGPT's split)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n = int(len(ids) * (1.0 - val_fraction))
    return ids[:n], ids[n:]


class RandomBlocks(Sequence):
    """``n_batches`` batches of ``batch_size`` random blocks: {"x": (B, T), "y": (B, T)} long tensors.

    Batch i of rank ``rank`` (of ``world_size``) is batch i * world_size + rank of the epoch's stream.
    """

    def __init__(self, ids: torch.Tensor, *, block_size: int, batch_size: int, n_batches: int, seed: int,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, name: str = "data"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(ids) < block_size + 1:
            raise DataError(f"{name}: {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                            "use more text or a smaller model.block_size")
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.n_batches, self.key, self.rank, self.world_size = n_batches, (seed, epoch), rank, world_size

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n_batches:
            raise IndexError(index)
        seed, epoch = self.key
        mixed = 0
        for part in (seed, epoch, 0, index * self.world_size + self.rank):  # a fixed mix, the same in every process
            mixed = (mixed * 1_000_003 + part) % (2**61 - 1)
        generator = torch.Generator().manual_seed(mixed)
        starts = torch.randint(len(self.ids) - self.block_size, (self.batch_size,), generator=generator)
        offsets = torch.arange(self.block_size + 1)
        blocks = self.ids[starts[:, None] + offsets]  # (B, T + 1)
        return {"x": blocks[:, :-1], "y": blocks[:, 1:]}
