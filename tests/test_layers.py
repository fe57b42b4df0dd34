"""qkv.layers: MultiHeadAttention against nn.MultiheadAttention with copied weights, cached == uncached,
the causal invariant, feed-forward networks and norms by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkv.attention import scaled_dot_product_attention
from qkv.layers import FeedForward, KVCache, MultiHeadAttention, StackCache, SwiGLU, make_feedforward, make_norm
from qkv.masks import causal_mask, lengths_mask
from qkv.positional import ALiBi, RotaryEmbedding
from qkv.record import AttentionRecord

D, H = 16, 4


# ---------------------------------------------------------------- against nn.MultiheadAttention

def with_weights(mha, x, **kwargs):
    """The layer's output, and the weights (B, H, T, S) it put into its AttentionRecord slot."""
    record = AttentionRecord()
    out = mha(x, record=record.layer("decoder" if mha.cross else "encoder", 0, 1), **kwargs)
    return out, record.weights["cross" if mha.cross else "encoder"][0]


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
    out, weights = with_weights(ours, x, **kwargs)
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
    _, weights = with_weights(ours, x)
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
    "rope": dict(position=RotaryEmbedding(D // H)),
    "alibi": dict(position=ALiBi(H)),
    "gqa": dict(n_kv_heads=2),
    "mqa+rope": dict(n_kv_heads=1, position=RotaryEmbedding(D // H)),
    "gqa+alibi": dict(n_kv_heads=2, position=ALiBi(H)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recorded", [False, True])
def test_future_tokens_do_not_change_the_past(variant, recorded):
    mha = MultiHeadAttention(D, H, **VARIANTS[variant]).eval()
    x = torch.randn(2, 6, D)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, D)
    call = (lambda x: with_weights(mha, x, causal=True)[0]) if recorded else (lambda x: mha(x, causal=True))
    out, out2 = call(x), call(changed)
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
    mha = MultiHeadAttention(D, H, position=ALiBi(H)).eval()
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 6, [False, True, True, True, True, True]])[:, None, None, :]  # left padding
    full, full_weights = with_weights(mha, x, mask=mask, causal=True)
    cache = KVCache()
    for t in range(6):
        out, weights = with_weights(mha, x[:, t:t + 1], mask=mask[..., :t + 1], causal=True, cache=cache)
        torch.testing.assert_close(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights[:, :, 0], full_weights[:, :, t, :t + 1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_is_its_three_steps_and_recorded_weights_are_the_math_path(variant):
    mha = MultiHeadAttention(D, H, **VARIANTS[variant]).eval()
    x = torch.randn(2, 5, D)
    q, k, v, offset = mha.project(x)  # (B, H, T, Dh), (B, Hkv, T, Dh) x 2
    assert torch.equal(mha(x, causal=True), mha.output(mha.attend(q, k, v, causal=True, offset=offset)))
    bias = mha.position.bias(5, 5, offset=0) if mha.position is not None else None
    heads, expected = scaled_dot_product_attention(q, k, v, causal=True, bias=bias, return_weights=True)
    out, weights = with_weights(mha, x, causal=True)
    assert torch.equal(weights, expected) and torch.equal(out, mha.output(heads))


def test_qkv_weights_are_the_rows_of_the_fused_projection():
    mha = MultiHeadAttention(D, H, n_kv_heads=2)
    (w_q, w_k, w_v), (b_q, b_k, b_v) = mha.qkv_weights()
    assert (w_q.shape, w_k.shape, w_v.shape) == ((D, D), (D // 2, D), (D // 2, D))
    x = torch.randn(3, D)
    torch.testing.assert_close(torch.cat([x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v], -1), mha.qkv_proj(x))
    with pytest.raises(ValueError, match="cross=True"):
        MultiHeadAttention(D, H, cross=True).qkv_weights()


def test_stack_cache_reorders_the_used_part_of_self_attention_and_the_cross_cache():
    cache = StackCache(2)
    self_cache, cross_cache = cache[1]
    self_cache.update(torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 1), torch.zeros(3, 1, 2, 1))
    cross_cache.set_static(torch.arange(3.0)[:, None, None, None].expand(3, 1, 4, 1), torch.zeros(3, 1, 4, 1))
    assert cache.length == 0 and cache[1][0].length == 2 and len(cache) == 2
    cache.reorder(torch.tensor([2, 2, 0]))
    assert self_cache.k.shape == (3, 1, 2, 1)  # the used part only, not the 16-slot buffer
    assert self_cache.k[:, 0, 0, 0].tolist() == [2, 2, 0] and cross_cache.k[:, 0, 0, 0].tolist() == [2, 2, 0]
    k, _ = self_cache.update(torch.ones(3, 1, 1, 1), torch.ones(3, 1, 1, 1))  # grows past the trimmed buffer
    assert k[:, 0, :, 0].tolist() == [[2, 2, 1], [2, 2, 1], [0, 0, 1]]


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
    mha = MultiHeadAttention(D, H, position=RotaryEmbedding(D // H)).eval()
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
        MultiHeadAttention(20, 4, position=RotaryEmbedding(20 // 4))


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
