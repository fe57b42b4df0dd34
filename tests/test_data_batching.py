"""Token-count batching with length bucketing, and collation (qkv.data.batching)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qkv.data.batching import collate_pairs, collated_lengths, pad_sequences, token_batches
from qkv.errors import DataError


def random_pairs(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 60, size=n)
    tgt = np.clip(src + rng.integers(-5, 6, size=n), 1, None)
    return [(int(s), int(t)) for s, t in zip(src, tgt)]


def padded_cost(batch: list[int], lengths: list[tuple[int, int]]) -> int:
    return len(batch) * max(max(lengths[i]) for i in batch)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_once_and_budget_respected(shuffle):
    lengths = random_pairs(2000)
    batches = token_batches(lengths, 500, shuffle=shuffle, seed=3, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert all(padded_cost(b, lengths) <= 500 for b in batches)
    # Bucketing: batches are nearly full, so padding is small.
    padding = sum(padded_cost(b, lengths) for b in batches) / sum(sum(lengths[i]) / 2 for i in flat)
    assert padding < 1.4


def test_plain_int_lengths():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = token_batches(lengths, 10, shuffle=False)
    assert batches == [[1, 6, 3], [4, 0], [5], [2]]  # by length, ties by index; 3 * 3 <= 10, 2 * 5 <= 10


def test_deterministic_per_seed_and_epoch():
    lengths = random_pairs(1000)
    a = token_batches(lengths, 400, shuffle=True, seed=1, epoch=0)
    assert a == token_batches(lengths, 400, shuffle=True, seed=1, epoch=0)
    b = token_batches(lengths, 400, shuffle=True, seed=1, epoch=1)
    c = token_batches(lengths, 400, shuffle=True, seed=2, epoch=0)
    assert a != b and a != c
    assert len(a) == len(b)  # the batch count does not change between epochs
    assert sorted(map(sorted, a)) != sorted(map(sorted, b))  # ties broken differently, not just reordered


def test_global_rng_state_unchanged():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    token_batches(random_pairs(100), 100, shuffle=True, seed=5, epoch=2)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state[1], np.random.get_state()[1]) and np_state[2] == np.random.get_state()[2]


def test_oversize_example_gets_its_own_batch(caplog):
    lengths = [(3, 4), (50, 2), (4, 3), (2, 80)]
    with caplog.at_level(logging.WARNING, logger="qkv.data.batching"):
        batches = token_batches(lengths, 20, shuffle=False)
    assert sorted(map(sorted, batches)) == [[0, 2], [1], [3]]
    assert "2 examples are longer than max_tokens=20" in caplog.text


def test_max_examples_caps_batch_size():
    batches = token_batches([1] * 10, 100, shuffle=False, max_examples=4)
    assert [len(b) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
def test_ranks_are_disjoint_cover_everything_and_take_equal_steps(world_size):
    lengths = random_pairs(777, seed=world_size)
    per_rank = [
        token_batches(lengths, 300, shuffle=True, seed=0, epoch=4, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # disjoint and covering: each index exactly once
    assert all(padded_cost(b, lengths) <= 300 for batches in per_rank for b in batches)


def test_ranks_wrap_round_when_fewer_examples_than_ranks():
    per_rank = [token_batches([3, 4], 10, shuffle=True, rank=r, world_size=4) for r in range(4)]
    assert all(len(batches) == 1 for batches in per_rank)
    assert {i for batches in per_rank for b in batches for i in b} == {0, 1}


def test_empty_lengths_give_no_batches():
    assert token_batches([], 100) == []


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        (([1, 2], 0), {}, "max_tokens=0"),
        (([1, 2], 10), {"rank": 2, "world_size": 2}, "rank=2"),
        (([1, 2], 10), {"seed": -1}, "seed=-1"),
        (([1, -2], 10), {}, r"lengths\[1\]=-2"),
        (([(1, 2), (3,)], 10), {}, r"lengths\[1\]=\(3,\)"),
        (([1, 2], 10), {"max_examples": 0}, "max_examples=0"),
    ],
)
def test_argument_errors(args, kwargs, expected):
    with pytest.raises(DataError, match=expected):
        token_batches(*args, **kwargs)


def test_collate_pairs_shapes_and_contents():
    pairs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14])]
    batch = collate_pairs(pairs, pad_id=0, bos_id=1, eos_id=2)
    assert batch["src"].tolist() == [[5, 6, 7], [10, 0, 0]]
    assert batch["tgt_in"].tolist() == [[1, 8, 9, 0, 0], [1, 11, 12, 13, 14]]
    assert batch["tgt_out"].tolist() == [[8, 9, 2, 0, 0], [11, 12, 13, 14, 2]]
    assert all(t.dtype == torch.long for t in batch.values())
    # Teacher forcing: tgt_out is tgt_in shifted left by one, wherever tgt_in is real.
    real = batch["tgt_in"][:, 1:] != 0
    assert torch.equal(batch["tgt_in"][:, 1:][real], batch["tgt_out"][:, :-1][real])
    assert batch["src"].ne(0).sum(dim=1).tolist() == [3, 1]
    assert collated_lengths(pairs) == [(3, 3), (1, 5)]


def test_collate_empty_target_and_errors():
    batch = collate_pairs([([5], [])], pad_id=0, bos_id=1, eos_id=2)
    assert batch["tgt_in"].tolist() == [[1]] and batch["tgt_out"].tolist() == [[2]]
    with pytest.raises(DataError, match=r"pairs\[1\]: empty source"):
        collate_pairs([([5], [6]), ([], [7])], pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(DataError, match="pairs: empty batch"):
        collate_pairs([], pad_id=0, bos_id=1, eos_id=2)


def test_pad_sequences():
    assert pad_sequences([[1, 2, 3], [4]], pad_id=-1).tolist() == [[1, 2, 3], [4, -1, -1]]


def test_batches_of_collated_lengths_respect_the_budget():
    rng = np.random.default_rng(0)
    sizes = rng.integers([1, 0], 30, size=(300, 2))
    pairs = [(rng.integers(4, 99, size=s).tolist(), rng.integers(4, 99, size=t).tolist()) for s, t in sizes]
    for b in token_batches(collated_lengths(pairs), 120, shuffle=True, seed=1, epoch=0):
        batch = collate_pairs([pairs[i] for i in b], pad_id=0, bos_id=1, eos_id=2)
        assert batch["src"].numel() <= 120 and batch["tgt_in"].numel() <= 120
