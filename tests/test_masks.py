"""qkv.masks: every mask is bool, True = may attend, shaped to broadcast to (B, H, T, S)."""

import pytest
import torch

from qkv.masks import causal_mask, check_mask, combine_masks, lengths_mask, padding_mask, sliding_window_mask


def brute_causal(T, S):
    """Query i sees key j when j <= i + S - T (bottom-right aligned), element by element."""
    return torch.tensor([[j <= i + S - T for j in range(S)] for i in range(T)])


def test_padding_mask_marks_pad_ids_false():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 8, 0]])
    mask = padding_mask(ids, pad_id=0)
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, False, False], [True, False, True, False]]


@pytest.mark.parametrize("ids, word", [(torch.zeros(4, dtype=torch.long), "shape"),
                                       (torch.zeros(2, 3), "dtype"),
                                       (torch.zeros(2, 3, dtype=torch.bool), "dtype")])
def test_padding_mask_rejects_bad_ids(ids, word):
    with pytest.raises(ValueError, match=f"ids.*{word}"):
        padding_mask(ids, pad_id=0)


@pytest.mark.parametrize("lengths, max_len, expected", [
    ([2, 0, 3], None, [[1, 1, 0], [0, 0, 0], [1, 1, 1]]),
    ([1, 2], 4, [[1, 0, 0, 0], [1, 1, 0, 0]]),
])
def test_lengths_mask(lengths, max_len, expected):
    mask = lengths_mask(torch.tensor(lengths), max_len)
    assert mask.dtype == torch.bool and mask.shape == (len(lengths), 1, 1, len(expected[0]))
    assert mask[:, 0, 0].tolist() == [[bool(x) for x in row] for row in expected]


@pytest.mark.parametrize("lengths, max_len, word", [
    (torch.tensor([[1, 2]]), None, "lengths"),
    (torch.tensor([1.0, 2.0]), None, "lengths"),
    (torch.tensor([1, -1]), None, "lengths"),
    (torch.tensor([1, 5]), 3, "max_len"),
])
def test_lengths_mask_rejects_bad_arguments(lengths, max_len, word):
    with pytest.raises(ValueError, match=word):
        lengths_mask(lengths, max_len)


@pytest.mark.parametrize("T, S", [(1, 1), (4, 4), (3, 6), (1, 5), (6, 4)])
def test_causal_mask_is_bottom_right_aligned(T, S):
    mask = causal_mask(T, S)
    assert mask.shape == (1, 1, T, S) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], brute_causal(T, S))


def test_causal_mask_square_is_lower_triangular_and_last_query_sees_all():
    assert torch.equal(causal_mask(5)[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert causal_mask(1, 7).all()  # one new query at the end of a cache sees every key


def test_causal_mask_rejects_negative_lengths():
    with pytest.raises(ValueError, match="T=-1"):
        causal_mask(-1, 3)


@pytest.mark.parametrize("T, S, window", [(5, 5, 1), (5, 5, 2), (4, 7, 3), (6, 6, 10)])
def test_sliding_window_mask(T, S, window):
    expected = torch.tensor([[0 <= (i + S - T) - j < window for j in range(S)] for i in range(T)])
    mask = sliding_window_mask(T, S, window=window)
    assert mask.shape == (1, 1, T, S)
    assert torch.equal(mask[0, 0], expected)
    if window >= S:
        assert torch.equal(mask, causal_mask(T, S))


def test_sliding_window_mask_rejects_window_zero():
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(3, window=0)


def test_combine_masks_is_logical_and_and_skips_none():
    pad = lengths_mask(torch.tensor([2, 3]), 3)  # (2, 1, 1, 3)
    causal = causal_mask(3)  # (1, 1, 3, 3)
    both = combine_masks(None, pad, None, causal)
    assert both.shape == (2, 1, 3, 3)
    assert torch.equal(both, pad & causal)
    assert not both[0, 0, 2, 2] and both[1, 0, 2, 2]
    assert combine_masks(None, None) is None


def test_combine_masks_rejects_float_mask():
    with pytest.raises(ValueError, match="mask.*bool"):
        combine_masks(torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("mask, shape, word", [
    ([True, False], None, "torch.Tensor"),
    (torch.ones(2, 2, dtype=torch.int64), None, "bool"),
    (torch.ones(1, 1, 1, 2, 2, dtype=torch.bool), None, "at most 4 dims"),
    (torch.ones(3, 1, 1, 5, dtype=torch.bool), (2, 4, 3, 5), "does not broadcast"),
    (torch.ones(1, 1, 1, 4, dtype=torch.bool), (2, 4, 3, 5), "does not broadcast"),
    (torch.ones(2, 1, 1, 5, dtype=torch.bool), (1, 4, 3, 5), "does not broadcast"),  # would grow B
])
def test_check_mask_errors_name_the_argument(mask, shape, word):
    with pytest.raises(ValueError, match=f"my_mask.*{word}"):
        check_mask(mask, "my_mask", shape)


def test_check_mask_accepts_broadcastable_masks():
    for shape in [(5,), (3, 5), (2, 1, 1, 5), (1, 4, 3, 1), (2, 4, 3, 5)]:
        check_mask(torch.ones(shape, dtype=torch.bool), "mask", (2, 4, 3, 5))
