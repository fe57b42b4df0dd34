"""qkv.positional: sinusoidal (sec. 3.5), learned, RoPE (Su et al. 2021), ALiBi (Press et al. 2022)."""

import math

import pytest
import torch

from qkv.models.embedding import POSITIONAL, position_scheme
from qkv.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    PositionScheme,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    sinusoidal_table,
)

# ---------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("pos, i, d_model", [(0, 0, 8), (3, 1, 8), (7, 3, 8), (50, 2, 16), (1000, 0, 4)])
def test_sinusoidal_table_matches_sec_3_5_by_hand(pos, i, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))."""
    table = sinusoidal_table(pos + 1, d_model)
    angle = pos / 10000 ** (2 * i / d_model)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_table_a_few_literal_entries():
    table = sinusoidal_table(4, 4)  # frequencies 1 and 1/100
    expected = torch.tensor([
        [0.0, 1.0, 0.0, 1.0],
        [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
        [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)],
        [math.sin(3), math.cos(3), math.sin(0.03), math.cos(0.03)],
    ])
    torch.testing.assert_close(table, expected)


def test_sinusoidal_table_is_fixed_and_bounded():
    a, b = sinusoidal_table(300, 32), sinusoidal_table(300, 32)
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (300, 32)
    assert a.abs().max() <= 1.0
    assert not torch.equal(a[1], a[2])  # every position gets its own code


def test_sinusoidal_table_rejects_odd_d_model():
    with pytest.raises(ValueError, match="d_model=7"):
        sinusoidal_table(4, 7)


def test_sinusoidal_module_has_no_parameters_and_extends_past_max_len():
    enc = SinusoidalPositionalEncoding(8, max_len=4)
    assert list(enc.parameters()) == [] and enc.state_dict() == {}
    torch.testing.assert_close(enc(3), sinusoidal_table(3, 8))
    torch.testing.assert_close(enc(10), sinusoidal_table(10, 8))  # past the initial table
    torch.testing.assert_close(enc(5, offset=20), sinusoidal_table(25, 8)[20:])
    assert enc(2, offset=1).shape == (2, 8)


# ---------------------------------------------------------------- learned


def test_learned_embedding_rows_and_error_past_max_len():
    emb = LearnedPositionalEmbedding(6, 4)
    assert emb(6).shape == (6, 4)
    torch.testing.assert_close(emb(2, offset=3), emb.embedding.weight[3:5])
    with pytest.raises(ValueError, match=r"7 positions.*max_len=6"):
        emb(7)
    with pytest.raises(ValueError, match="max_len=6"):
        emb(2, offset=5)


def test_learned_embedding_is_trained():
    emb = LearnedPositionalEmbedding(6, 4)
    emb(3).sum().backward()
    assert emb.embedding.weight.grad[:3].ne(0).all() and emb.embedding.weight.grad[3:].eq(0).all()


# ---------------------------------------------------------------- RoPE


def _rotate(rope, x, pos):
    return rope(x[None, None, None, :], offset=pos)[0, 0, 0]  # one vector at position ``pos``


@pytest.mark.parametrize("head_dim", [2, 8, 16])
@pytest.mark.parametrize("m, n, c", [(0, 0, 5), (3, 1, 4), (1, 3, 7), (2, 9, 30), (17, 0, 40)])
def test_rope_scores_depend_only_on_relative_offset(m, n, c, head_dim):
    rope = RotaryEmbedding(head_dim, max_len=16)  # the later positions go past the table
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    score = _rotate(rope, q, m) @ _rotate(rope, k, n)
    shifted = _rotate(rope, q, m + c) @ _rotate(rope, k, n + c)
    assert shifted.item() == pytest.approx(score.item(), abs=1e-5)
    if m != n:  # the score does change with the offset itself
        assert abs((_rotate(rope, q, m + 1) @ _rotate(rope, k, n)).item() - score.item()) > 1e-4


def test_rope_is_a_rotation_and_identity_at_position_zero():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    y = rope(x, offset=3)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x[:, :, :1]), x[:, :, :1])
    assert not torch.allclose(y, x)
    torch.testing.assert_close(rope(x)[:, :, 3:], rope(x[:, :, 3:], offset=3))  # offset = absolute position


def test_rope_by_hand_pairs_the_two_halves():
    """Eq. 34 in the half-split layout: features i and i + Dh/2 turn by angle pos * base^(-2i/Dh)."""
    rope = RotaryEmbedding(4, base=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pos = 2
    y = _rotate(rope, x, pos)
    expected = []
    for i, (a, b) in enumerate([(1.0, 3.0), (2.0, 4.0)]):
        theta = pos * 100.0 ** (-2 * i / 4)
        expected.append((a * math.cos(theta) - b * math.sin(theta), a * math.sin(theta) + b * math.cos(theta)))
    torch.testing.assert_close(y, torch.tensor([expected[0][0], expected[1][0], expected[0][1], expected[1][1]]))


def test_rope_keeps_bfloat16():
    assert RotaryEmbedding(8)(torch.randn(1, 1, 3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("head_dim", [5, 7])
def test_rope_rejects_odd_head_dim(head_dim):
    with pytest.raises(ValueError, match=f"head_dim={head_dim}"):
        RotaryEmbedding(head_dim)


# ---------------------------------------------------------------- ALiBi


def test_alibi_slopes_for_8_heads_are_half_to_1_over_256():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([1 / 2 ** i for i in range(1, 9)]))


@pytest.mark.parametrize("n_heads, exponents", [
    (1, [8]),
    (2, [4, 8]),
    (4, [2, 4, 6, 8]),
    (6, [2, 4, 6, 8, 1, 3]),  # 4 slopes of the 4-head set, then every other slope of the 8-head set
    (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
])
def test_alibi_slopes_geometric(n_heads, exponents):
    torch.testing.assert_close(alibi_slopes(n_heads), torch.tensor([2.0 ** -e for e in exponents]))


@pytest.mark.parametrize("T, S, offset", [(4, 4, None), (1, 6, None), (3, 5, None), (2, 5, 1)])
def test_alibi_bias_is_minus_slope_times_distance(T, S, offset):
    alibi = ALiBi(4)
    bias = alibi(T, S, offset=offset)
    assert bias.shape == (4, T, S)
    start = S - T if offset is None else offset
    slopes = alibi_slopes(4)
    for h in range(4):
        for t in range(T):
            for s in range(S):
                assert bias[h, t, s].item() == pytest.approx(-slopes[h].item() * abs(start + t - s))
    assert list(alibi.parameters()) == []


# ---------------------------------------------------------------- the position slot (style rule 18)


def test_the_base_scheme_changes_nothing():
    scheme = PositionScheme()
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    q2, k2 = scheme.rotate(q, k, offset=5)
    assert q2 is q and k2 is k and scheme.bias(3, 8, offset=5) is None


@pytest.mark.parametrize("offset", [0, 3, 20])  # 20 + T goes past the initial table
def test_rope_rotate_is_bit_equal_to_its_forward_on_q_and_k(offset):
    rope = RotaryEmbedding(8, max_len=16)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # grouped-query: fewer key heads
    q2, k2 = rope.rotate(q, k, offset=offset)
    assert torch.equal(q2, rope(q, offset=offset)) and torch.equal(k2, rope(k, offset=offset))
    assert not torch.equal(q2, q) and rope.bias(5, 5 + offset, offset=offset) is None


@pytest.mark.parametrize("T, S, offset", [(4, 4, 0), (1, 6, 5), (3, 5, 2), (2, 5, 1)])
def test_alibi_bias_is_bit_equal_to_its_forward(T, S, offset):
    alibi = ALiBi(6)
    assert torch.equal(alibi.bias(T, S, offset=offset), alibi(T, S, offset=offset))
    q, k = torch.randn(1, 6, T, 8), torch.randn(1, 6, T, 8)
    assert alibi.rotate(q, k, offset=offset) == (q, k)


def test_position_scheme_factory():
    kw = dict(n_heads=4, head_dim=8, max_len=32)
    rope = position_scheme("rope", causal=False, **kw)
    assert isinstance(rope, RotaryEmbedding) and rope.head_dim == 8 and rope.cos.shape == (32, 8)
    alibi = position_scheme("alibi", causal=True, **kw)
    assert isinstance(alibi, ALiBi) and alibi.slopes.shape == (4,)
    for kind in ("sinusoidal", "learned", "none"):
        assert position_scheme(kind, causal=False, **kw) is None
    assert all(isinstance(position_scheme(kind, causal=c, **kw), PositionScheme | type(None))
               for kind in POSITIONAL for c in (False, True))
    with pytest.raises(ValueError, match="positional must be one of"):
        position_scheme("rotary", causal=False, **kw)
