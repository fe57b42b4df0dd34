"""qkv.blocks: pre- and post-norm encoder/decoder blocks (sec. 3.1) and their invariants."""

import pytest
import torch

from qkv.blocks import BlockConfig, DecoderBlock, EncoderBlock, encoder_block_inference
from qkv.layers import KVCache
from qkv.masks import lengths_mask
from qkv.positional import ALiBi, RotaryEmbedding
from qkv.record import AttentionRecord

B, T, S = 3, 6, 5


def config(**overrides):
    values = dict(d_model=16, n_heads=4, d_ff=32, dropout=0.1)
    values.update(overrides)
    return BlockConfig(**values)


def positions(kind, cfg):
    """Keyword arguments giving a block relative positions inside attention."""
    if kind == "rope":
        return dict(position=RotaryEmbedding(cfg.d_model // cfg.n_heads))
    if kind == "alibi":
        return dict(position=ALiBi(cfg.n_heads))
    return {}


def build(kind, cfg, pos="none"):
    if kind == "encoder":
        return EncoderBlock(cfg, **positions(pos, cfg))
    return DecoderBlock(cfg, cross=kind == "decoder", **positions(pos, cfg))


def call(block, x, memory, **kwargs):
    if isinstance(block, EncoderBlock):
        return block(x, **kwargs)
    return block(x, memory=memory if block.cross_attn is not None else None, **kwargs)


def recorded(block, x, memory, **kwargs):
    """The block's output and {"self": ..., "cross": ...}: what its AttentionRecord slot received."""
    stack = "encoder" if isinstance(block, EncoderBlock) else "decoder"
    record = AttentionRecord()
    out = call(block, x, memory, record=record.layer(stack, 0, 1), **kwargs)
    kinds = {stack: "self", "cross": "cross"}
    return out, {kinds[kind]: layers[0] for kind, layers in record.weights.items()}


KINDS = ["encoder", "decoder", "decoder-only"]


# ---------------------------------------------------------------- both norm placements run

@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("kind", KINDS)
def test_block_runs_and_every_parameter_learns(kind, norm_first, norm, activation):
    block = build(kind, config(norm_first=norm_first, norm=norm, activation=activation, n_kv_heads=2))
    x, memory = torch.randn(B, T, 16), torch.randn(B, S, 16)
    out = call(block, x, memory)
    assert out.shape == (B, T, 16) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_post_norm_output_is_normalised_and_pre_norm_is_not(kind):
    x, memory = 3 + 2 * torch.randn(B, T, 16), torch.randn(B, S, 16)
    post = call(build(kind, config(norm_first=False)).eval(), x, memory)
    torch.testing.assert_close(post.mean(-1), torch.zeros(B, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(post.std(-1, unbiased=False), torch.ones(B, T), atol=1e-3, rtol=0)
    pre = call(build(kind, config(norm_first=True)).eval(), x, memory)
    assert pre.mean(-1).abs().min() > 0.5  # pre-norm keeps the residual stream as it is


def test_post_rmsnorm_output_has_unit_rms():
    block = build("encoder", config(norm="rmsnorm")).eval()
    out = block(3 + 2 * torch.randn(B, T, 16))
    torch.testing.assert_close(out.square().mean(-1).sqrt(), torch.ones(B, T), atol=1e-3, rtol=0)


def test_dropout_only_in_training():
    block = build("decoder", config(dropout=0.5))
    x, memory = torch.randn(B, T, 16), torch.randn(B, S, 16)
    assert not torch.allclose(call(block.train(), x, memory), call(block, x, memory))
    block.eval()
    torch.testing.assert_close(call(block, x, memory), call(block, x, memory))


# ---------------------------------------------------------------- attention weights on request

@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("kind", KINDS)
def test_record_slot_receives_each_attention_map(kind, norm_first):
    block = build(kind, config(norm_first=norm_first)).eval()
    x, memory = torch.randn(B, T, 16), torch.randn(B, S, 16)
    memory_mask = lengths_mask(torch.tensor([5, 3, 1]), S)
    kwargs = dict(memory_mask=memory_mask) if kind == "decoder" else {}
    out, weights = recorded(block, x, memory, **kwargs)
    torch.testing.assert_close(out, call(block, x, memory, **kwargs), atol=1e-5, rtol=1e-5)  # math == fused
    expected = {"self": (B, 4, T, T)}
    if kind == "decoder":
        expected["cross"] = (B, 4, T, S)
    assert {name: tuple(w.shape) for name, w in weights.items()} == expected
    for w in weights.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    if kind != "encoder":  # causal: no weight on the future
        past = torch.ones(T, T, dtype=torch.bool).tril()
        assert (weights["self"][..., ~past] == 0).all() and (weights["self"][..., past] > 0).all()
    if kind == "decoder":
        assert (weights["cross"][~memory_mask.expand(B, 4, T, S)] == 0).all()


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("pos", ["none", "rope", "alibi"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("kind", ["decoder", "decoder-only"])
def test_decoder_future_tokens_do_not_change_the_past(kind, norm_first, pos):
    cfg = config(norm_first=norm_first)
    block = build(kind, cfg, pos).eval()
    x, memory = torch.randn(B, T, 16), torch.randn(B, S, 16)
    changed = x.clone()
    changed[:, 3:] = torch.randn(B, T - 3, 16)
    out, out2 = call(block, x, memory), call(block, changed, memory)
    torch.testing.assert_close(out[:, :3], out2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])


@pytest.mark.parametrize("pos", ["none", "rope", "alibi"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_padding_does_not_change_real_tokens(norm_first, pos):
    block = build("encoder", config(norm_first=norm_first, n_kv_heads=2), pos).eval()
    lengths = [6, 4, 1]
    x = 50 * torch.randn(B, T, 16)  # garbage everywhere ...
    real = [torch.randn(1, n, 16) for n in lengths]
    for b, n in enumerate(lengths):  # ... except each sequence's real tokens
        x[b, :n] = real[b][0]
    out = block(x, mask=lengths_mask(torch.tensor(lengths), T))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b:b + 1, :n], block(real[b]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_decoder_memory_padding_does_not_change_outputs(norm_first):
    block = build("decoder", config(norm_first=norm_first)).eval()
    x, memory = torch.randn(1, T, 16), torch.randn(1, 3, 16)
    padded = torch.cat([memory, 50 * torch.randn(1, 4, 16)], dim=1)
    out = block(x, memory=padded, memory_mask=lengths_mask(torch.tensor([3]), 7))
    torch.testing.assert_close(out, block(x, memory=memory), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["none", "rope", "alibi"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("kind", ["decoder", "decoder-only"])
def test_cached_decoding_equals_full_pass(kind, norm_first, pos):
    """Two stacked blocks, one (self, cross) cache pair each, fed one token at a time."""
    cfg = config(norm_first=norm_first, n_kv_heads=2)
    blocks = [build(kind, cfg, pos).eval() for _ in range(2)]
    x, memory = torch.randn(B, T, 16), torch.randn(B, S, 16)
    memory_mask = lengths_mask(torch.tensor([5, 3, 1]), S) if kind == "decoder" else None

    full = x
    for block in blocks:
        full = call(block, full, memory, memory_mask=memory_mask)
    caches = [(KVCache(), KVCache()) for _ in blocks]
    steps = []
    with torch.no_grad():
        for t in range(T):
            h = x[:, t:t + 1]
            for block, cache in zip(blocks, caches):  # memory only on the first step: then it is cached
                h = block(h, memory=memory if t == 0 and kind == "decoder" else None, memory_mask=memory_mask,
                          cache=cache)
            steps.append(h)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert all(self_cache.length == T for self_cache, _ in caches)


def test_cached_decoding_with_weights():
    block = build("decoder", config()).eval()
    x, memory = torch.randn(B, T, 16), torch.randn(B, S, 16)
    _, full = recorded(block, x, memory)
    cache = (KVCache(), KVCache())
    for t in range(T):
        _, weights = recorded(block, x[:, t:t + 1], memory, cache=cache)
        torch.testing.assert_close(weights["self"][:, :, 0], full["self"][:, :, t, :t + 1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights["cross"][:, :, 0], full["cross"][:, :, t], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- argument checks

def test_decoder_with_cross_attention_needs_memory():
    block = build("decoder", config())
    with pytest.raises(ValueError, match="needs memory"):
        block(torch.randn(B, T, 16))
    with pytest.raises(ValueError, match="needs memory"):
        block(torch.randn(B, T, 16), cache=(KVCache(), KVCache()))  # an empty cross cache is no memory


@pytest.mark.parametrize("overrides, pattern", [
    (dict(d_model=30, n_heads=4), r"d_model=30 is not divisible by n_heads=4"),
    (dict(dropout=1.0), r"^dropout must be in \[0, 1\)"),
    (dict(attn_dropout=-0.1), r"^attn_dropout must be in \[0, 1\)"),
])
def test_block_config_rejects_bad_values(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        config(**overrides)


@pytest.mark.parametrize("overrides, pattern", [
    (dict(n_kv_heads=3), r"n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(norm="batchnorm"), r"^norm must be"),
    (dict(activation="sigmoid"), r"^activation must be one of"),
])
def test_block_rejects_bad_config(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        EncoderBlock(config(**overrides))


def test_block_config_is_frozen():
    with pytest.raises(AttributeError):
        config().d_model = 8


def test_block_config_from_a_family_config_copies_fields_of_the_same_name():
    from qkv.models.decoder_only import DecoderOnlyConfig
    from qkv.models.vit import ViTConfig

    family = DecoderOnlyConfig(vocab_size=10, d_model=32, n_heads=4, n_kv_heads=2, d_ff=0, dropout=0.3, bias=False)
    assert family.block() == BlockConfig(d_model=32, n_heads=4, d_ff=128, n_kv_heads=2, dropout=0.3,
                                         attn_dropout=0.0, activation="gelu", norm_first=True, bias=False)
    vit = BlockConfig.from_config(ViTConfig(d_model=32, n_heads=4, norm_eps=1e-6), norm_first=True)
    assert (vit.norm_eps, vit.norm_first, vit.d_model) == (1e-6, True, 32)
    with pytest.raises(ValueError, match="BlockConfig has no field 'n_layers'"):
        BlockConfig.from_config(family, n_layers=3)


# ---------------------------------------------------------------- the flat inference path

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_encoder_block_inference_equals_the_module_path(activation, norm, bias):
    torch.manual_seed(0)
    block = EncoderBlock(config(norm_first=True, norm=norm, activation=activation, bias=bias)).eval()
    for p in block.parameters():  # biases and norm weights away from their 0 / 1 init
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(B, T, 16)
    assert block.self_attn.is_plain
    with torch.inference_mode():
        flat = encoder_block_inference(block, x.reshape(B * T, 16), B)
        expected = block(x)
    assert flat.shape == (B * T, 16)
    torch.testing.assert_close(flat.view(B, T, 16), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pos", ["rope", "alibi", "gqa"])
def test_encoder_block_inference_composes_the_attention_steps(pos):
    """It calls project / attend / output, so relative positions and grouped heads need no guard."""
    cfg = config(norm_first=True, n_kv_heads=2 if pos == "gqa" else None)
    block = EncoderBlock(cfg, **positions(pos, cfg)).eval()
    x = torch.randn(B, T, 16)
    with torch.inference_mode():
        torch.testing.assert_close(encoder_block_inference(block, x.reshape(B * T, 16), B).view(B, T, 16), block(x),
                                   atol=1e-6, rtol=1e-6)


def test_encoder_block_inference_refuses_post_norm():
    block = EncoderBlock(config(norm_first=False)).eval()
    with pytest.raises(ValueError, match="pre-norm blocks"):
        encoder_block_inference(block, torch.randn(B * T, 16), B)


@pytest.mark.parametrize("change", ["none", "rope", "alibi", "gqa", "cross"])
def test_is_plain_says_whether_attention_is_plain_multi_head_self_attention(change):
    cfg = config(n_kv_heads=2 if change == "gqa" else None)
    block = DecoderBlock(cfg, **positions(change, cfg))
    assert block.self_attn.is_plain is (change in ("none", "cross"))
    assert not block.cross_attn.is_plain
