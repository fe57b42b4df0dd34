"""HF ViT <-> qkv ViT conversion (qkv.convert: load_hf_vit, save_hf_vit and the pure functions).

The file-level tests need no optional package; the reference tests compare logits with
``transformers`` (ViTForImageClassification, ViTModel) and skip when it is missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qkv import convert
from qkv.convert import load_hf_vit, save_hf_vit
from qkv.errors import CheckpointError
from qkv.models.vit import ViT, ViTConfig

TINY = ViTConfig(image_size=16, channels=3, patch_size=4, d_model=32, n_heads=4, d_ff=64, n_layers=2, n_classes=5)
V4_LAYER = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
            "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def transformers4_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 ViT keys renamed as a Hub checkpoint (transformers 4) has them."""
    out = {}
    for key, tensor in tensors.items():
        key = re.sub(r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2.", key)
        for new, old in V4_LAYER.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = tensor
    return out


def hf_config(cfg: ViTConfig):
    transformers = pytest.importorskip("transformers")
    return transformers.ViTConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                                  num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.channels,
                                  num_labels=cfg.n_classes)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norms and biases too), so a mix-up of any two tensors shows in the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture
def saved(tmp_path) -> tuple:
    model = randomised(ViT(TINY))
    return save_hf_vit(model, TINY, tmp_path / "vit"), model


@pytest.fixture
def folder(saved):
    return saved[0]


# -- round trips ------------------------------------------------------------------------------------
def test_save_then_load_restores_config_and_every_weight(saved):
    folder, model = saved
    cfg, loaded = load_hf_vit(folder)
    assert cfg == TINY and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_config_round_trip_and_inexpressible_configs():
    assert convert.vit_config_from_hf(convert.vit_config_to_hf(TINY), "config.json") == TINY
    headless = replace(TINY, n_classes=0)
    assert convert.vit_config_to_hf(headless)["architectures"] == ["ViTModel"]
    assert convert.vit_config_from_hf(convert.vit_config_to_hf(headless), "config.json") == headless
    for change in ({"pooling": "mean"}, {"positional": "sinusoidal"}, {"activation": "relu"}, {"norm": "rmsnorm"}):
        with pytest.raises(ValueError, match=next(iter(change))):
            convert.vit_config_to_hf(replace(TINY, **change))


def test_saved_folder_gives_equal_logits_in_hugging_face(folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    _, ours = load_hf_vit(folder)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(pixel_values=images).logits, atol=1e-5, rtol=1e-4)


def test_headless_model_saves_as_identity_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = replace(TINY, n_classes=0)
    ours = randomised(ViT(cfg))
    hf = transformers.ViTForImageClassification.from_pretrained(save_hf_vit(ours, cfg, tmp_path / "f")).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # no labels: HF's classifier is the identity, its logits are the pooled features
        torch.testing.assert_close(ours(images), hf(pixel_values=images).logits, atol=1e-5, rtol=1e-4)


def test_hub_style_transformers4_checkpoint_loads_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = randomised(transformers.ViTForImageClassification(hf_config(TINY)))
    hf.save_pretrained(tmp_path)  # HF's own config.json
    v4 = transformers4_names(hf.state_dict())
    assert "vit.encoder.layer.1.attention.attention.query.weight" in v4 and "classifier.weight" in v4
    save_file({k: v.contiguous() for k, v in v4.items()}, tmp_path / "model.safetensors")
    cfg, ours = load_hf_vit(tmp_path)
    assert cfg.n_classes == 5 and cfg.norm_eps == hf.config.layer_norm_eps
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(pixel_values=images).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("legacy", [False, True])
def test_headless_vit_model_folder_loads_with_no_head(tmp_path, legacy):
    transformers = pytest.importorskip("transformers")
    hf = randomised(transformers.ViTModel(hf_config(TINY)))  # no "vit." prefix, a pooler
    hf.save_pretrained(tmp_path)
    if legacy:
        save_file({k: v.contiguous() for k, v in transformers4_names(hf.state_dict()).items()},
                  tmp_path / "model.safetensors")
    cfg, ours = load_hf_vit(tmp_path)
    assert cfg.n_classes == 0 and ours.head is None
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(pixel_values=images).last_hidden_state[:, 0],
                                   atol=1e-5, rtol=1e-4)


def test_state_dict_names_are_transformers5_and_invert():
    ours = randomised(ViT(TINY))
    hf = convert.vit_state_dict_to_hf(ours)
    assert hf["vit.embeddings.position_embeddings"].shape == (1, 17, 32)
    assert hf["vit.embeddings.patch_embeddings.projection.weight"].shape == (32, 3, 4, 4)
    assert {"vit.layers.1.attention.q_proj.weight", "classifier.bias"} <= hf.keys()
    back = convert.vit_state_dict_from_hf(transformers4_names(hf), ours, "model.safetensors")
    for key, tensor in ours.state_dict().items():
        assert torch.equal(back[key], tensor), key


# -- errors -----------------------------------------------------------------------------------------
def rewrite(folder, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_key_is_named(folder):
    rewrite(folder, lambda t: t.pop("vit.encoder.layer.1.output.dense.bias"))  # saved with the Hub's names
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors.*missing keys.*vit\.encoder\.layer\.1\.output\.dense\.bias"):
        load_hf_vit(folder)


def test_unexpected_key_is_named(folder):
    rewrite(folder, lambda t: t.update({"vit.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*vit\.extra\.weight"):
        load_hf_vit(folder)


def test_wrong_shape_is_named(folder):
    rewrite(folder, lambda t: t.update({"vit.encoder.layer.0.attention.attention.key.weight": torch.zeros(32, 16)}))
    with pytest.raises(CheckpointError, match=r"safetensors.*layer\.0\.attention\.attention\.key\.weight.*\(32, 16\)"):
        load_hf_vit(folder)


def test_non_gelu_activation_is_named(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*hidden_act='relu'"):
        load_hf_vit(folder)


def test_missing_weights_file_is_named(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf_vit(folder)
