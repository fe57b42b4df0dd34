"""qkv.attention against float64 references written here, element by element where it is cheap.

The reference is Eq. 1 of sec. 3.2.1 with nothing fused: softmax(Q K^T / sqrt(d_k) + bias) V over the
keys a query may see; a query that may see no key gets zero weights and a zero output.
"""

import math

import pytest
import torch

from qkv.attention import (
    additive_attention,
    attention_from_scores,
    multiplicative_attention,
    retrieve,
    scaled_dot_product_attention,
)
from qkv.positional import ALiBi

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


# ---------------------------------------------------------------- references (float64, unfused)

def masked_softmax(scores, allowed):
    """softmax over the allowed entries of the last dim; rows with none allowed are all zero."""
    shift = torch.where(allowed, scores, torch.full_like(scores, -1e300)).amax(-1, keepdim=True).detach()
    e = torch.exp(torch.where(allowed, scores - shift, torch.zeros_like(scores))) * allowed
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def reference_attention(q, k, v, *, mask=None, causal=False, bias=None, scale=None):
    """float64 softmax(Q K^T * scale + bias) V, with k, v heads repeated for grouped queries."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, Dh = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    k = torch.stack([k[:, h // group] for h in range(H)], dim=1)  # (B, H, S, Dh)
    v = torch.stack([v[:, h // group] for h in range(H)], dim=1)
    scale = 1 / math.sqrt(Dh) if scale is None else scale
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(B, H, T, S, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    if causal:
        allowed = allowed & torch.tensor([[j <= i + S - T for j in range(S)] for i in range(T)])
    weights = masked_softmax(scores, allowed)
    return torch.einsum("bhts,bhsd->bhtd", weights, v), weights


def make_qkv(B, H, T, S, Dh, dtype, *, Hkv=None, Dv=None):
    """Leaf tensors of ``dtype`` and their exact float64 copies (bf16 values are representable)."""
    shapes = [(B, H, T, Dh), (B, Hkv or H, S, Dh), (B, Hkv or H, S, Dv or Dh)]
    low = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    high = [t.detach().double().requires_grad_() for t in low]
    return low, high


def padding(B, S):
    """(B, 1, 1, S): the first row sees every key, the next ones fewer (never none)."""
    lengths = torch.tensor([max(1, S - 2 * b) for b in range(B)])
    return (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]


CASES = ["none", "padding", "causal", "both"]
SHAPES = [  # (T, S, Dh)
    (4, 4, 8),
    (3, 6, 5),  # T != S, odd head dim
    (1, 5, 4),  # one query (a decoding step)
    (6, 4, 4),  # T > S: under causal the first queries see nothing
]


def case_args(case, B, S):
    mask = padding(B, S) if case in ("padding", "both") else None
    return dict(mask=mask, causal=case in ("causal", "both"))


def run(q, k, v, *, fused, **kwargs):
    if fused:
        return scaled_dot_product_attention(q, k, v, **kwargs), None
    return scaled_dot_product_attention(q, k, v, return_weights=True, **kwargs)


# ---------------------------------------------------------------- scaled dot-product vs reference

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T, S, Dh", SHAPES)
def test_sdpa_matches_float64_reference(T, S, Dh, case, fused, dtype):
    B, H = 2, 3
    (q, k, v), (q64, k64, v64) = make_qkv(B, H, T, S, Dh, dtype)
    kwargs = case_args(case, B, S)
    out, weights = run(q, k, v, fused=fused, **kwargs)
    ref_out, ref_weights = reference_attention(q64, k64, v64, **kwargs)
    assert out.shape == (B, H, T, Dh) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    if weights is not None:
        assert weights.shape == (B, H, T, S)
        torch.testing.assert_close(weights.double(), ref_weights, **TOL[dtype])

    grad_out = torch.randn(B, H, T, Dh).to(dtype)
    out.backward(grad_out)
    ref_out.backward(grad_out.double())
    for name, low, high in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert torch.isfinite(low.grad).all(), name
        torch.testing.assert_close(low.grad.double(), high.grad, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T, S, Dh", [(3, 3, 4), (2, 4, 3), (3, 2, 2)])
def test_sdpa_math_path_gradcheck(T, S, Dh, case):
    _, (q, k, v) = make_qkv(1, 2, T, S, Dh, torch.float64)
    kwargs = case_args(case, 1, S)
    f = lambda q, k, v: scaled_dot_product_attention(q, k, v, return_weights=True, **kwargs)
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_sdpa_fused_path_gradcheck():
    _, (q, k, v) = make_qkv(2, 2, 3, 4, 4, torch.float64)
    f = lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=padding(2, 4), causal=True)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T, S, Dh", SHAPES)
def test_fused_and_math_paths_agree(T, S, Dh, case):
    (q, k, v), _ = make_qkv(2, 4, T, S, Dh, torch.float32)
    kwargs = case_args(case, 2, S)
    fused = scaled_dot_product_attention(q, k, v, **kwargs)
    math_out, weights = scaled_dot_product_attention(q, k, v, return_weights=True, **kwargs)
    torch.testing.assert_close(fused, math_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(math_out, weights @ v)


def test_scale_argument_is_used():
    (q, k, v), (q64, k64, v64) = make_qkv(1, 2, 3, 3, 4, torch.float32)
    for fused in (True, False):
        out, _ = run(q, k, v, fused=fused, scale=0.3)
        torch.testing.assert_close(out.double(), reference_attention(q64, k64, v64, scale=0.3)[0], **TOL[torch.float32])
    assert not torch.allclose(out, scaled_dot_product_attention(q, k, v))


def test_different_value_dim():
    (q, k, v), (q64, k64, v64) = make_qkv(2, 2, 3, 5, 4, torch.float32, Dv=6)
    for fused in (True, False):
        out, _ = run(q, k, v, fused=fused, causal=True)
        assert out.shape == (2, 2, 3, 6)
        torch.testing.assert_close(out.double(), reference_attention(q64, k64, v64, causal=True)[0],
                                   **TOL[torch.float32])


# ---------------------------------------------------------------- fully masked rows

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["mask", "mask+bias"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_give_zeros_and_finite_gradients(causal, with_bias, fused, dtype):
    B, H, T, S, Dh = 3, 2, 5, 4, 4  # with causal and T > S, the first query sees no key either
    (q, k, v), _ = make_qkv(B, H, T, S, Dh, dtype)
    mask = (torch.arange(S)[None, :] < torch.tensor([0, 2, 4])[:, None])[:, None, None, :]  # lengths 0, 2, 4
    bias = ALiBi(H)(T, S) if with_bias else None
    out, weights = run(q, k, v, fused=fused, mask=mask, causal=causal, bias=bias)
    (out.float() * torch.randn(out.shape)).sum().backward()

    allowed = mask & torch.tensor([[j <= i + S - T or not causal for j in range(S)] for i in range(T)])
    empty = ~allowed.expand(B, H, T, S).any(-1)  # (B, H, T): queries with no key to see
    assert empty[0].all() and (empty[1:].any() == causal)
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all()
    assert out[~empty].abs().sum() > 0
    if weights is not None:
        assert (weights[empty] == 0).all()
        torch.testing.assert_close(weights[~empty].float().sum(-1), torch.ones(int((~empty).sum())), **TOL[dtype])
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"d{name} has NaN/inf"
    assert (q.grad[empty] == 0).all()  # a query that retrieves nothing gets no gradient
    assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all()  # nor do keys nobody may see


def test_attention_from_scores_fully_masked_row():
    scores = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out, weights = attention_from_scores(scores, torch.randn(3, 4), mask=mask)
    assert (weights[1] == 0).all() and (out[1] == 0).all()
    torch.testing.assert_close(weights[0].sum(), torch.tensor(1.0))
    assert weights[0, 1] == 0
    out.sum().backward()
    assert torch.isfinite(scores.grad).all()


# ---------------------------------------------------------------- grouped-query heads, bias

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("H, Hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("case", CASES)
def test_grouped_query_heads_equal_repeated_kv_heads(H, Hkv, case, fused):
    T, S, Dh = 3, 5, 4
    (q, k, v), (q64, k64, v64) = make_qkv(2, H, T, S, Dh, torch.float32, Hkv=Hkv)
    kwargs = case_args(case, 2, S)
    out, weights = run(q, k, v, fused=fused, **kwargs)
    k_rep = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh): kv head h // (H / Hkv) serves query head h
    v_rep = v.repeat_interleave(H // Hkv, dim=1)
    full, full_weights = run(q, k_rep, v_rep, fused=False, **kwargs)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    if weights is not None:
        torch.testing.assert_close(weights, full_weights)
    torch.testing.assert_close(out.double(), reference_attention(q64, k64, v64, **kwargs)[0], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T, S", [(4, 4), (2, 6)])
def test_bias_agrees_between_paths_and_reference(T, S, case, dtype):
    B, H, Dh = 2, 4, 8
    (q, k, v), (q64, k64, v64) = make_qkv(B, H, T, S, Dh, dtype)
    bias = ALiBi(H)(T, S)[None]  # (1, H, T, S), float32 as MultiHeadAttention passes it
    kwargs = case_args(case, B, S)
    fused = scaled_dot_product_attention(q, k, v, bias=bias, **kwargs)
    math_out, weights = scaled_dot_product_attention(q, k, v, bias=bias, return_weights=True, **kwargs)
    ref_out, ref_weights = reference_attention(q64, k64, v64, bias=bias.to(dtype), **kwargs)
    torch.testing.assert_close(fused.double(), ref_out, **TOL[dtype])
    torch.testing.assert_close(math_out.double(), ref_out, **TOL[dtype])
    torch.testing.assert_close(weights.double(), ref_weights, **TOL[dtype])
    no_bias = reference_attention(q64, k64, v64, **kwargs)[0]
    assert not torch.allclose(ref_out, no_bias, atol=0.05)  # the bias matters at these sizes


# ---------------------------------------------------------------- argument checks

def _qkv(T=3, S=5):
    return torch.randn(2, 4, T, 8), torch.randn(2, 4, S, 8), torch.randn(2, 4, S, 8)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("change, kwargs, pattern", [
    (lambda q, k, v: (q[0], k, v), {}, r"^q must have shape"),
    (lambda q, k, v: (q, k[None], v), {}, r"^k must have shape"),
    (lambda q, k, v: (q, k, v[..., 0]), {}, r"^v must have shape"),
    (lambda q, k, v: (q, k.long(), v), {}, r"^k must be a floating-point"),
    (lambda q, k, v: (q, k, v.double()), {}, r"q, k, v must share a dtype.*float64"),
    (lambda q, k, v: (q.bfloat16(), k, v), {}, r"q, k, v must share a dtype.*bfloat16"),
    (lambda q, k, v: (q, k, v.to("meta")), {}, r"q, k, v must be on one device.*meta"),
    (lambda q, k, v: (q, k, v[:, :, :4]), {}, r"k and v must have the same length S"),
    (lambda q, k, v: (q, k[..., :6], v), {}, r"q and k must have the same head dim"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), {}, r"H=4 must be a multiple of key/value heads 3"),
    (lambda q, k, v: (q, k[:, :2], v), {}, r"k and v must have the same \(B, H\)"),
    (lambda q, k, v: (q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)), {}, r"batch"),
    (lambda q, k, v: (q, k, v), dict(mask=torch.ones(2, 1, 1, 5)), r"^mask must be a bool tensor"),
    (lambda q, k, v: (q, k, v), dict(mask=torch.ones(2, 1, 1, 5, dtype=torch.long)), r"^mask must be a bool"),
    (lambda q, k, v: (q, k, v), dict(mask=torch.ones(2, 1, 1, 4, dtype=torch.bool)), r"^mask of shape \(2, 1, 1, 4\)"),
    (lambda q, k, v: (q, k, v), dict(mask=torch.ones(3, 1, 1, 5, dtype=torch.bool)), r"^mask of shape \(3, 1, 1, 5\)"),
    (lambda q, k, v: (q, k, v), dict(bias=torch.ones(2, 1, 1, 5, dtype=torch.long)), r"^bias must be a floating"),
    (lambda q, k, v: (q, k, v), dict(bias=torch.zeros(4, 5)), r"^bias of shape \(4, 5\)"),
    (lambda q, k, v: (q, k, v), dict(bias=torch.zeros(3, 4, 3, 5)), r"^bias of shape \(3, 4, 3, 5\)"),
    (lambda q, k, v: (q, k, v), dict(dropout_p=1.0), r"^dropout_p must be in \[0, 1\)"),
    (lambda q, k, v: (q, k, v), dict(dropout_p=-0.1), r"^dropout_p"),
])
def test_sdpa_rejects_bad_arguments(change, kwargs, pattern, fused):
    q, k, v = change(*_qkv())
    with pytest.raises(ValueError, match=pattern):
        scaled_dot_product_attention(q, k, v, return_weights=not fused, **kwargs)


def test_sdpa_rejects_non_tensor():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="^v must be a torch.Tensor"):
        scaled_dot_product_attention(q, k, v.tolist())


# ---------------------------------------------------------------- Luong and Bahdanau

def reference_multiplicative(q, k, v, weight, mask):
    """Luong 2015: s_ts = q_t . k_s or q_t^T W k_s, element by element; softmax over unmasked keys."""
    T, S = q.shape[-2], k.shape[-2]
    scores = torch.zeros(*q.shape[:-2], T, S, dtype=torch.float64)
    for t in range(T):
        for s in range(S):
            qt, ks = q[..., t, :].double(), k[..., s, :].double()
            scores[..., t, s] = (qt * ks).sum(-1) if weight is None else ((qt @ weight.double()) * ks).sum(-1)
    allowed = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)
    weights = masked_softmax(scores, allowed)
    return weights @ v.double(), weights


def reference_additive(q, k, v, w_q, w_k, v_a, mask):
    """Bahdanau 2015 eq. 6: e_ts = v_a . tanh(W_q q_t + W_k k_s), element by element."""
    T, S = q.shape[-2], k.shape[-2]
    scores = torch.zeros(*q.shape[:-2], T, S, dtype=torch.float64)
    for t in range(T):
        for s in range(S):
            hidden = torch.tanh(q[..., t, :].double() @ w_q.double().T + k[..., s, :].double() @ w_k.double().T)
            scores[..., t, s] = hidden @ v_a.double()
    allowed = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)
    weights = masked_softmax(scores, allowed)
    return weights @ v.double(), weights


LUONG_MASKS = [
    None,
    torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])[:, None, :],  # (B, 1, S)
    torch.tensor([[True, False, True, False, True]]),  # (1, S)
]


@pytest.mark.parametrize("mask", LUONG_MASKS, ids=["none", "padding", "pattern"])
@pytest.mark.parametrize("kind", ["dot", "general"])
def test_multiplicative_attention_matches_reference(kind, mask):
    B, T, S, Dq, Dk, Dv = 2, 3, 5, 4, 4 if kind == "dot" else 6, 7
    q, k, v = torch.randn(B, T, Dq), torch.randn(B, S, Dk), torch.randn(B, S, Dv)
    weight = torch.randn(Dq, Dk) if kind == "general" else None
    out, weights = multiplicative_attention(q, k, v, weight=weight, mask=mask, return_weights=True)
    ref_out, ref_weights = reference_multiplicative(q, k, v, weight, mask)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.double(), ref_weights, atol=1e-6, rtol=1e-5)
    _check_masked_weights(weights, mask, v, lambda v2: multiplicative_attention(q, k, v2, weight=weight, mask=mask))


@pytest.mark.parametrize("mask", LUONG_MASKS, ids=["none", "padding", "pattern"])
def test_additive_attention_matches_reference(mask):
    B, T, S, Dq, Dk, Dv, A = 2, 3, 5, 4, 6, 7, 8
    q, k, v = torch.randn(B, T, Dq), torch.randn(B, S, Dk), torch.randn(B, S, Dv)
    w_q, w_k, v_a = torch.randn(A, Dq), torch.randn(A, Dk), torch.randn(A)
    out, weights = additive_attention(q, k, v, w_q=w_q, w_k=w_k, v_a=v_a, mask=mask, return_weights=True)
    ref_out, ref_weights = reference_additive(q, k, v, w_q, w_k, v_a, mask)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.double(), ref_weights, atol=1e-6, rtol=1e-5)
    _check_masked_weights(weights, mask, v,
                          lambda v2: additive_attention(q, k, v2, w_q=w_q, w_k=w_k, v_a=v_a, mask=mask))


def _check_masked_weights(weights, mask, v, attend):
    """Weights sum to one over the unmasked keys, are zero elsewhere, and masked values are never read."""
    allowed = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.expand_as(weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert (weights[~allowed] == 0).all()
    if mask is not None:
        hidden = ~allowed.any(-2)  # (B, S): keys no query may see
        v2 = v.clone()
        v2[hidden] = 1e6
        torch.testing.assert_close(attend(v2), attend(v))


def test_additive_and_multiplicative_fully_masked_rows():
    q, k, v = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[False] * 5, [True] * 5])[:, None, :]  # the first sequence has no keys
    w_q, w_k, v_a = torch.randn(8, 4), torch.randn(8, 4), torch.randn(8)
    for attend in (lambda: multiplicative_attention(q, k, v, mask=mask, return_weights=True),
                   lambda: additive_attention(q, k, v, w_q=w_q, w_k=w_k, v_a=v_a, mask=mask, return_weights=True)):
        out, weights = attend()
        assert (out[0] == 0).all() and (weights[0] == 0).all() and (out[1] != 0).any()
        q.grad = None
        out.sum().backward()
        assert torch.isfinite(q.grad).all()


def test_multiplicative_attention_is_unscaled_eq1_without_sqrt_dk():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    luong = multiplicative_attention(q, k, v)
    torch.testing.assert_close(luong, scaled_dot_product_attention(q, k, v, scale=1.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(luong, scaled_dot_product_attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("call, pattern", [
    (lambda q, k, v: multiplicative_attention(q, k[..., :3], v), r"dot attention needs q and k of one size"),
    (lambda q, k, v: multiplicative_attention(q, k, v, weight=torch.randn(4, 3)), r"^weight must have shape"),
    (lambda q, k, v: multiplicative_attention(q, k, v, mask=torch.ones(2, 3, 5)), r"^mask must be a bool"),
    (lambda q, k, v: multiplicative_attention(q, k, v, mask=torch.ones(2, 3, 4, dtype=torch.bool)), r"^mask"),
    (lambda q, k, v: multiplicative_attention(q[0, 0], k, v), r"^q must have at least 2 dims"),
    (lambda q, k, v: multiplicative_attention(q, k, v.double()), r"q, k, v must share a dtype"),
    (lambda q, k, v: additive_attention(q, k, v, w_q=torch.randn(8, 3), w_k=torch.randn(8, 4), v_a=torch.randn(8)),
     r"^w_q must have shape"),
    (lambda q, k, v: additive_attention(q, k, v, w_q=torch.randn(8, 4), w_k=torch.randn(7, 4), v_a=torch.randn(8)),
     r"^w_k must have shape"),
    (lambda q, k, v: additive_attention(q, k, v, w_q=torch.randn(8, 4), w_k=torch.randn(8, 4), v_a=torch.randn(7)),
     r"^v_a must have shape"),
    (lambda q, k, v: additive_attention(q, k, v, w_q=torch.randn(8, 4), w_k=torch.randn(8, 4), v_a=torch.randn(8),
                                        mask=torch.ones(2, 1, 4, dtype=torch.bool)), r"^mask"),
])
def test_luong_and_bahdanau_reject_bad_arguments(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4))


# ---------------------------------------------------------------- retrieval, by hand

def test_retrieve_one_query_four_keys():
    query = torch.tensor([1.0, 0.0, 1.0, 0.0])
    keys = torch.tensor([[1.0, 0.0, 1.0, 0.0],    # same direction as the query: the best match
                         [0.0, 1.0, 0.0, 1.0],    # orthogonal
                         [1.0, 0.0, 0.0, 0.0],    # half a match
                         [-1.0, 0.0, -1.0, 0.0]])  # opposite
    values = torch.tensor([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0], [-10.0, -10.0]])
    scores, weights, output = retrieve(query, keys, values)
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.0, 1.0, -2.0]) / 2)  # q . k_i / sqrt(4)
    e = [math.exp(s) for s in (1.0, 0.0, 0.5, -1.0)]
    expected_weights = torch.tensor([x / sum(e) for x in e])
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(output, sum(a * v for a, v in zip(expected_weights, values)))
    assert int(weights.argmax()) == int(scores.argmax()) == 0
    assert int(weights.argmin()) == 3
    assert retrieve(query, keys, values, scale=1.0).scores.tolist() == [2.0, 0.0, 1.0, -2.0]


@pytest.mark.parametrize("args, pattern", [
    ((torch.randn(1, 4), torch.randn(3, 4), torch.randn(3, 2)), r"retrieve wants query \(Dk,\)"),
    ((torch.randn(4), torch.randn(3, 4), torch.randn(2, 2)), r"keys has 3 rows but values has 2"),
    ((torch.randn(5), torch.randn(3, 4), torch.randn(3, 2)), r"query has 5 features but keys have 4"),
])
def test_retrieve_rejects_bad_shapes(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        retrieve(*args)
