"""The Vision Transformer: patches, class token, positions and their interpolation, attention maps,
rollout, and a reference test against Hugging Face's ViTForImageClassification with copied weights
(qkv.convert.vit_state_dict_to_hf)."""

from __future__ import annotations

import pytest
import torch

from qkv.convert import vit_state_dict_to_hf
from qkv.models.vit import (
    ImageEmbedder,
    PatchEmbedding,
    ViT,
    ViTConfig,
    class_token_block,
    patchify,
    resize_grid,
    sincos_2d,
)
from qkv.record import AttentionRecord
from qkv.viz_image import attention_rollout, head_mean, image_attention, patch_maps


def tiny(**overrides) -> ViTConfig:
    base = dict(image_size=8, channels=1, patch_size=2, d_model=32, n_heads=4, d_ff=64, n_layers=2, n_classes=3)
    return ViTConfig(**{**base, **overrides})


# -- patches ----------------------------------------------------------------------------------------
def test_patchify_cuts_row_major_patches_flattened_channel_first():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)  # (B, C, H, W)
    patches = patchify(images, 2)  # (B, N = 2 * 3, C * 2 * 2)
    assert patches.shape == (2, 6, 12)
    # patch 4 = grid row 1, column 1: pixels rows 2..3, columns 2..3, every channel
    expected = images[1, :, 2:4, 2:4].reshape(-1)
    assert torch.equal(patches[1, 4], expected)


@pytest.mark.parametrize("channels,patch", [(1, 2), (3, 4)])
def test_linear_and_conv_patch_embeddings_agree(channels, patch):
    embed = PatchEmbedding(channels, patch, 16)
    images = torch.randn(3, channels, 4 * patch, 2 * patch)
    linear = embed(images, kind="linear")
    conv = embed(images, kind="conv")
    assert linear.shape == (3, 8, 16)
    torch.testing.assert_close(linear, conv, atol=1e-5, rtol=1e-5)


def test_linear_and_conv_models_share_weights_and_outputs():
    a = ViT(tiny(patch_embed="linear")).eval()
    b = ViT(tiny(patch_embed="conv")).eval()
    b.load_state_dict(a.state_dict())
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(a(images), b(images), atol=1e-5, rtol=1e-5)


# -- class token and positions ----------------------------------------------------------------------
def test_class_token_is_at_position_zero_with_its_own_position_embedding():
    model = ViT(tiny()).eval()
    images = torch.randn(2, 1, 8, 8)
    z0 = model.embed(images)  # (B, 1 + N, D)
    assert z0.shape == (2, 17, 32)
    expected = model.class_token[0, 0] + model.positions[0]
    torch.testing.assert_close(z0[:, 0], expected.expand(2, -1))
    patches = model.patch_embed(images) + model.positions[1:]
    torch.testing.assert_close(z0[:, 1:], patches)


def test_classifier_reads_the_class_token_output():
    model = ViT(tiny()).eval()
    images = torch.randn(2, 1, 8, 8)
    hidden = model.encode(images)
    torch.testing.assert_close(model(images), model.head(hidden[:, 0]))
    with torch.no_grad():  # the class token's vector reaches the logits
        model.class_token.add_(torch.randn(32))
    assert not torch.allclose(model(images), model.head(hidden[:, 0]))


@pytest.mark.parametrize("n_layers", [1, 3])
def test_class_token_only_last_layer_equals_the_full_stack(n_layers):
    model = ViT(tiny(n_layers=n_layers, n_heads=2))
    images = torch.randn(3, 1, 8, 8)
    full = model.head(model.encode(images)[:, 0])
    fast = model(images)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (fast, full):  # the same gradients reach every parameter
        model.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def randomised(model: ViT) -> ViT:
    """Every parameter random, biases and norm weights included (the init leaves biases at zero)."""
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("overrides", [{}, {"n_heads": 1}, {"norm": "rmsnorm", "activation": "swiglu"}],
                         ids=["default", "one-head", "rmsnorm-swiglu"])
def test_class_token_block_equals_the_full_block_with_biases(overrides, train):
    torch.manual_seed(0)
    model = randomised(ViT(tiny(**overrides))).train(train)
    block, x = model.layers[-1], torch.randn(3, 17, 32, requires_grad=True)
    fast, full = class_token_block(block, x), block(x)[:, :1]
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    inputs = [x, *block.parameters()]
    grads = [torch.autograd.grad(out.square().sum(), inputs) for out in (fast, full)]
    for a, b in zip(*grads):  # the same gradients reach the input and every parameter
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_class_token_block_drops_attention_weights_like_the_full_block():
    torch.manual_seed(0)
    model = randomised(ViT(tiny(attn_dropout=0.5))).train()
    block, x = model.layers[-1], torch.randn(3, 17, 32)
    attn = block.self_attn
    torch.manual_seed(1)
    fast = class_token_block(block, x)
    # reference: project every key and value, drop the class token's weights with the same mask
    h = block.attn_residual.norm(x)
    q, k, v = attn.qkv_proj(h).view(3, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh) each
    weights = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1).squeeze(2)  # (B, H, T)
    torch.manual_seed(1)
    heads = torch.nn.functional.dropout(weights, p=0.5)[:, :, None] @ v  # (B, H, 1, Dh)
    z0 = x[:, :1] + attn.out_proj(heads.transpose(1, 2).reshape(3, 1, 32))
    torch.testing.assert_close(fast, z0 + block.ff(block.ff_residual.norm(z0)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_inference_path_equals_the_module_path(pooling):
    torch.manual_seed(0)
    model = randomised(ViT(tiny(n_layers=3, pooling=pooling))).eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():  # autograd off: flat blocks, the matmul patch projection
        flat, flat_hidden = model(images), model.encode(images)
    with torch.enable_grad():  # the module path and the configured convolution
        logits, hidden = model(images), model.encode(images)
    torch.testing.assert_close(flat, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_hidden, hidden, atol=1e-5, rtol=1e-5)


def test_patch_embedding_uses_the_matmul_for_cpu_inference_only(monkeypatch):
    embed = PatchEmbedding(3, 4, 16, kind="conv")
    images = torch.randn(2, 3, 8, 8)
    calls = []
    monkeypatch.setattr("qkv.models.vit.patchify", lambda *a: calls.append(1) or patchify(*a))
    training = embed(images)
    assert not calls  # autograd on: the configured convolution
    with torch.inference_mode():
        inference = embed(images)
    assert calls  # autograd off on CPU: the matmul
    torch.testing.assert_close(inference, training, atol=1e-5, rtol=1e-5)


def test_mean_pooling_has_no_class_token_and_averages_the_patches():
    model = ViT(tiny(pooling="mean")).eval()
    assert model.class_token is None and model.positions.shape == (16, 32)
    images = torch.randn(2, 1, 8, 8)
    hidden = model.encode(images)
    assert hidden.shape == (2, 16, 32)
    torch.testing.assert_close(model(images), model.head(hidden.mean(1)))


def test_sincos_2d_encodes_row_and_column_in_separate_halves():
    table = sincos_2d(3, 4, 16).view(3, 4, 16)
    assert torch.equal(table[0, :, :8], table[0, :1, :8].expand(4, 8))  # first half: the row only
    assert torch.equal(table[:, 0, 8:], table[:1, 0, 8:].expand(3, 8))  # second half: the column only
    assert len({tuple(v.tolist()) for v in table.view(12, 16)}) == 12


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_positions_are_interpolated_for_another_image_size(positional):
    model = ViT(tiny(positional=positional)).eval()
    torch.testing.assert_close(model.position_table(4, 4), model.positions)  # training grid: unchanged
    bigger = model.position_table(6, 8)
    assert bigger.shape == (1 + 48, 32)
    torch.testing.assert_close(bigger[0], model.positions[0])  # the class token's is kept as it is
    logits = model(torch.randn(2, 1, 12, 16))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_resize_grid_keeps_a_constant_table_and_roughly_inverts():
    constant = torch.full((16, 8), 0.5)
    torch.testing.assert_close(resize_grid(constant, 4, 7, 9), torch.full((63, 8), 0.5))
    smooth = sincos_2d(8, 8, 8) * 0.1  # low frequencies: smooth over the grid
    up = resize_grid(smooth, 8, 16, 16)
    corners = up.view(16, 16, 8)[[0, 0, 15, 15], [0, 15, 0, 15]]
    torch.testing.assert_close(corners, smooth.view(8, 8, 8)[[0, 0, 7, 7], [0, 7, 0, 7]], atol=0.02, rtol=0)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="image_size=10 is not divisible by patch_size=4"):
        tiny(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="pooling"):
        tiny(pooling="max")
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(positional="sinusoidal", d_model=30, n_heads=3)
    with pytest.raises(ValueError, match=r"images must have shape \(B, C=1"):
        ViT(tiny())(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        ViT(tiny())(torch.randn(2, 1, 9, 8))


# -- attention weights, maps, rollout -----------------------------------------------------------------
def test_attention_weights_are_returned_without_changing_the_outputs():
    model = ViT(tiny()).eval()
    images = torch.randn(2, 1, 8, 8)
    record = AttentionRecord()
    logits = model(images, record=record)
    torch.testing.assert_close(logits, model(images), atol=1e-5, rtol=1e-5)
    attention = record.weights["encoder"]
    assert sorted(attention) == [0, 1]
    weights = attention[1]
    assert weights.shape == (2, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 17))


def test_rollout_of_identity_attention_is_identity_and_rows_stay_distributions():
    eye = torch.eye(5).expand(3, 2, 5, 5)
    torch.testing.assert_close(attention_rollout(eye), torch.eye(5).expand(2, 5, 5))
    a = torch.softmax(torch.randn(3, 2, 5, 5), -1)
    rollout = attention_rollout(a)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))
    # one layer: 0.5 A + 0.5 I; two layers: their product, the later layer on the left
    one = 0.5 * a[0] + 0.5 * torch.eye(5)
    torch.testing.assert_close(attention_rollout(a[:1]), one)
    two = (0.5 * a[1] + 0.5 * torch.eye(5)) @ one
    torch.testing.assert_close(attention_rollout(a[:2]), two)


def test_image_attention_maps_cover_the_patch_grid():
    model = ViT(tiny()).eval()
    maps = image_attention(model, torch.randn(2, 1, 8, 8))
    assert maps["layers"].shape == (2, 2, 4, 4) and maps["rollout"].shape == (2, 4, 4)
    torch.testing.assert_close(maps["rollout"].sum((-1, -2)), torch.ones(2))
    record = AttentionRecord()
    model(torch.randn(1, 1, 8, 8), record=record)
    layer_maps = patch_maps(head_mean(record.weights["encoder"])[:, :, 0], n_special=1, grid_h=4, grid_w=4)
    assert layer_maps.shape == (2, 1, 4, 4)


def test_image_embedder_gives_unit_vectors():
    embedder = ImageEmbedder(ViT(tiny(n_classes=0))).eval()
    out = embedder(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


# -- reference: Hugging Face ViTForImageClassification with the same weights --------------------------
def hf_vit(cfg: ViTConfig):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViTConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                                    num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    layer_norm_eps=cfg.norm_eps, image_size=cfg.image_size,
                                    patch_size=cfg.patch_size, num_channels=cfg.channels, qkv_bias=True,
                                    num_labels=cfg.n_classes)
    return transformers.ViTForImageClassification(hf_cfg).eval()


def test_outputs_equal_hugging_face_vit_with_the_same_weights():
    cfg = tiny(channels=3, image_size=16, patch_size=4, n_classes=5)
    ours = ViT(cfg).eval()
    hf = hf_vit(cfg)
    hf.load_state_dict(vit_state_dict_to_hf(ours), strict=True)  # every key matched
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = hf(pixel_values=images).logits
        torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=1e-4)
        # another size: both interpolate the position table bicubically
        bigger = torch.randn(2, 3, 24, 24)
        theirs = hf(pixel_values=bigger, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(ours(bigger), theirs, atol=1e-5, rtol=1e-4)
