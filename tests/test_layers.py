"""qkv.layers: MultiHeadAttention against nn.MultiheadAttention with copied weights, cached == uncached,
the causal invariant, feed-forward networks and norms by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkv.layers import FeedForward, KVCache, MultiHeadAttention, SwiGLU, make_feedforward, make_norm
from qkv.masks import causal_mask, lengths_mask
from qkv.positional import ALiBi, RotaryEmbedding

D, H = 16, 4


# ---------------------------------------------------------------- against nn.MultiheadAttention

def torch_and_ours(*, cross: bool, bias: bool = True):
    """nn.MultiheadAttention and our layer with the same weights (rows of in_proj_weight are q, k, v)."""
    ref = nn.MultiheadAttention(D, H, batch_first=True, bias=bias)
    with torch.no_grad():  # nn.MHA zero-initialises its biases: make them matter
        if bias:
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = MultiHeadAttention(D, H, cross=cross, bias=bias)
    with torch.no_grad():
        if cross:
            ours.q_proj.weight.copy_(ref.in_proj_weight[:D])
            ours.kv_proj.weight.copy_(ref.in_proj_weight[D:])
            if bias:
                ours.q_proj.bias.copy_(ref.in_proj_bias[:D])
                ours.kv_proj.bias.copy_(ref.in_proj_bias[D:])
        else:
            ours.qkv_proj.weight.copy_(ref.in_proj_weight)
            if bias:
                ours.qkv_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        if bias:
            ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-pad", "pad"])
@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
def test_matches_torch_multihead_attention(kind, padding, bias):
    B, T = 3, 5
    S = 7 if kind == "cross" else T
    ref, ours = torch_and_ours(cross=kind == "cross", bias=bias)
    x = torch.randn(B, T, D)
    memory = torch.randn(B, S, D) if kind == "cross" else x
    mask = lengths_mask(torch.tensor([S, S - 2, 1]), S) if padding else None  # (B, 1, 1, S)
    if kind == "causal":
        ref_out, ref_weights = ref(x, x, x, attn_mask=~causal_mask(T)[0, 0], key_padding_mask=None if mask is None
                                   else ~mask[:, 0, 0], average_attn_weights=True)
    else:
        ref_out, ref_weights = ref(x, memory, memory, key_padding_mask=None if mask is None else ~mask[:, 0, 0],
                                   average_attn_weights=True)
    kwargs = dict(mask=mask, causal=kind == "causal", memory=memory if kind == "cross" else None)
    out, weights = ours(x, return_weights=True, **kwargs)
    fused = ours(x, **kwargs)
    assert out.shape == (B, T, D) and weights.shape == (B, H, T, S)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.mean(1), ref_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))


def test_matches_torch_per_head_weights():
    ref, ours = torch_and_ours(cross=False)
    x = torch.randn(2, 4, D)
    _, ref_weights = ref(x, x, x, average_attn_weights=False)
    _, weights = ours(x, return_weights=True)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_gradients_match_torch():
    ref, ours = torch_and_ours(cross=False)
    x = torch.randn(2, 5, D)
    ref(x, x, x, need_weights=False)[0].square().sum().backward()
    ours(x).square().sum().backward()
    torch.testing.assert_close(ours.qkv_proj.weight.grad, ref.in_proj_weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- invariants

VARIANTS = {
    "plain": dict(),
    "rope": dict(rope=RotaryEmbedding(D // H)),
    "alibi": dict(alibi=ALiBi(H)),
    "gqa": dict(n_kv_heads=2),
    "mqa+rope": dict(n_kv_heads=1, rope=RotaryEmbedding(D // H)),
    "gqa+alibi": dict(n_kv_heads=2, alibi=ALiBi(H)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("return_weights", [False, True])
def test_future_tokens_do_not_change_the_past(variant, return_weights):
    mha = MultiHeadAttention(D, H, **VARIANTS[variant]).eval()
    x = torch.randn(2, 6, D)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, D)
    out = mha(x, causal=True, return_weights=return_weights)
    out2 = mha(changed, causal=True, return_weights=return_weights)
    out, out2 = (out[0], out2[0]) if return_weights else (out, out2)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunks", [[1] * 20, [3, 1, 1, 4, 11]], ids=["token-by-token", "prompt-then-steps"])
def test_cached_decoding_equals_full_pass(variant, chunks):
    """20 positions also outgrow the cache's first buffer (16) once."""
    mha = MultiHeadAttention(D, H, **VARIANTS[variant]).eval()
    x = torch.randn(2, sum(chunks), D)
    full = mha(x, causal=True)
    cache, outs, start = KVCache(), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(mha(x[:, start:start + n], causal=True, cache=cache))
            start += n
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_decoding_with_weights_and_padding_mask():
    mha = MultiHeadAttention(D, H, alibi=ALiBi(H)).eval()
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 6, [False, True, True, True, True, True]])[:, None, None, :]  # left padding
    full, full_weights = mha(x, mask=mask, causal=True, return_weights=True)
    cache = KVCache()
    for t in range(6):
        out, weights = mha(x[:, t:t + 1], mask=mask[..., :t + 1], causal=True, cache=cache, return_weights=True)
        torch.testing.assert_close(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights[:, :, 0], full_weights[:, :, t, :t + 1], atol=1e-6, rtol=1e-5)


def test_cross_attention_cache_stores_memory_once():
    mha = MultiHeadAttention(D, H, cross=True).eval()
    x, memory = torch.randn(2, 4, D), torch.randn(2, 7, D)
    full = mha(x, memory=memory)
    cache = KVCache()
    first = mha(x[:, :1], memory=memory, cache=cache)
    assert cache.static and cache.length == 7
    rest = [mha(x[:, t:t + 1], cache=cache) for t in range(1, 4)]  # memory is no longer needed
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_follows_beams():
    mha = MultiHeadAttention(D, H, rope=RotaryEmbedding(D // H)).eval()
    prefix, suffix = torch.randn(3, 4, D), torch.randn(3, 3, D)
    cache = KVCache()
    mha(prefix, causal=True, cache=cache)
    keys, values = cache.k[:, :, :4].clone(), cache.v[:, :, :4].clone()
    index = torch.tensor([2, 0, 0])  # beam 2 survives once, beam 0 twice, beam 1 dies
    cache.reorder(index)
    torch.testing.assert_close(cache.k[:, :, :4], keys[index])
    torch.testing.assert_close(cache.v[:, :, :4], values[index])
    steps = torch.cat([mha(suffix[:, t:t + 1], causal=True, cache=cache) for t in range(3)], dim=1)
    full = mha(torch.cat([prefix[index], suffix], dim=1), causal=True)
    torch.testing.assert_close(steps, full[:, 4:], atol=1e-5, rtol=1e-5)


def test_kv_cache_crop_rolls_back():
    mha = MultiHeadAttention(D, H).eval()
    x, wrong = torch.randn(1, 5, D), torch.randn(1, 2, D)
    cache = KVCache()
    mha(x[:, :3], causal=True, cache=cache)
    mha(wrong, causal=True, cache=cache)  # a rejected draft
    cache.crop(3)
    assert cache.length == 3
    out = mha(x[:, 3:], causal=True, cache=cache)
    torch.testing.assert_close(out, mha(x, causal=True)[:, 3:], atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_on_empty_cache_is_a_no_op():
    cache = KVCache()
    cache.reorder(torch.tensor([0, 0]))
    assert cache.k is None and cache.length == 0


@pytest.mark.parametrize("variant", ["plain", "gqa"])
def test_padding_keys_do_not_change_real_outputs(variant):
    mha = MultiHeadAttention(D, H, **VARIANTS[variant]).eval()
    x = torch.randn(1, 4, D)
    padded = torch.cat([x, 100 * torch.randn(1, 3, D)], dim=1)
    out = mha(padded, mask=lengths_mask(torch.tensor([4]), 7))
    torch.testing.assert_close(out[:, :4], mha(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs, pattern", [
    (dict(d_model=30, n_heads=4), r"d_model=30 is not divisible by n_heads=4"),
    (dict(d_model=16, n_heads=0), r"d_model=16 is not divisible by n_heads=0"),
    (dict(d_model=16, n_heads=4, n_kv_heads=3), r"n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(d_model=16, n_heads=4, n_kv_heads=0), r"n_kv_heads=0"),
    (dict(d_model=16, n_heads=4, dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_constructor_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MultiHeadAttention(**kwargs)


def test_rope_with_odd_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head_dim=5"):
        MultiHeadAttention(20, 4, rope=RotaryEmbedding(20 // 4))


@pytest.mark.parametrize("cross, call, pattern", [
    (False, lambda m: m(torch.randn(2, D)), r"^x must have shape \(B, T, d_model=16\)"),
    (False, lambda m: m(torch.randn(2, 3, D + 1)), r"^x must have shape"),
    (False, lambda m: m(torch.randn(2, 3, D), memory=torch.randn(2, 3, D)), r"memory was given to a self-attention"),
    (True, lambda m: m(torch.randn(2, 3, D)), r"cross-attention needs memory"),
    (True, lambda m: m(torch.randn(2, 3, D), memory=torch.randn(2, 5)), r"^memory must have shape"),
    (False, lambda m: m(torch.randn(2, 3, D), mask=torch.ones(2, 1, 1, 3)), r"^mask must be a bool"),
    (False, lambda m: m(torch.randn(2, 3, D), mask=torch.ones(2, 1, 1, 4, dtype=torch.bool)), r"^mask of shape"),
])
def test_forward_rejects_bad_arguments(cross, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(MultiHeadAttention(D, H, cross=cross))


# ---------------------------------------------------------------- feed-forward and norms

@pytest.mark.parametrize("activation, fn", [
    ("relu", torch.relu),
    ("gelu", F.gelu),
    ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh")),
])
def test_feedforward_is_eq_2(activation, fn):
    ff = FeedForward(D, 24, activation=activation)
    x = torch.randn(2, 3, D)
    expected = fn(x @ ff.w_1.weight.T + ff.w_1.bias) @ ff.w_2.weight.T + ff.w_2.bias
    torch.testing.assert_close(ff(x), expected)
    assert isinstance(make_feedforward(D, 24, activation=activation, dropout=0.0, bias=True), FeedForward)


def test_swiglu_by_hand():
    ff = make_feedforward(D, 24, activation="swiglu", dropout=0.0, bias=False)
    assert isinstance(ff, SwiGLU) and ff.w_gate_up.bias is None
    x = torch.randn(2, 3, D)
    gate, up = ff.w_gate_up.weight[:24], ff.w_gate_up.weight[24:]
    swish = lambda h: h * torch.sigmoid(h)
    torch.testing.assert_close(ff(x), (swish(x @ gate.T) * (x @ up.T)) @ ff.w_2.weight.T)


def test_feedforward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation.*'tanh'"):
        FeedForward(D, 24, activation="tanh")


def test_norms_by_hand():
    x = 3 + 2 * torch.randn(2, 3, D)
    ln, rms = make_norm("layernorm", D), make_norm("rmsnorm", D, eps=1e-6)
    torch.testing.assert_close(ln(x), (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True)
                                                                        + 1e-5).sqrt())
    torch.testing.assert_close(rms(x), x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt())
    with pytest.raises(ValueError, match="norm must be.*'batchnorm'"):
        make_norm("batchnorm", D)
