"""Attention over an image: the class token's attention in each layer, and attention rollout.

* Per layer: the class token's attention to each patch, averaged over heads (Dosovitskiy et
  al. 2021, Figure 6 shows such maps). With mean pooling (no class token) the map is the mean
  attention that the patches receive from all patch queries.
* Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers",
  sec. 3): the residual connection is accounted for by A~_l = 0.5 A_l + 0.5 I (A_l averaged over
  heads, rows renormalised to sum to 1), and attention is propagated through the layers by
  multiplying them: rollout = A~_L ... A~_2 A~_1. Its class-token row is how much each patch
  contributes, through all layers, to what the classifier reads.

``attention_picture`` is what ``qkv attention RUN_DIR --image F --out F.png`` calls: from an image
run's AttentionSet (``qkv.load(run_dir).attention(image=F)``), the image, one map per layer and
the rollout, drawn over the image (matplotlib, headless, written atomically).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv.viz import _save, plt


def head_mean(weights: dict[int, torch.Tensor]) -> torch.Tensor:
    """One stack's weights {layer: (B, H, T, T)} (an AttentionRecord's ``weights["encoder"]``) -> (L, B, T, T),
    averaged over heads, layers in order. (The per-block form {layer: {"self": w}} is read too.)"""
    per_layer = [weights[i]["self"] if isinstance(weights[i], dict) else weights[i] for i in sorted(weights)]
    return torch.stack([w.float().mean(dim=1) for w in per_layer])


def attention_rollout(attention: torch.Tensor, *, residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema 2020, sec. 3: prod_l (residual I + (1 - residual) A_l), rows renormalised.

    attention (L, B, T, T), rows summing to 1 -> rollout (B, T, T); row i says how much each
    input token flows into token i's output after the last layer.
    """
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must have shape (L, B, T, T), got {tuple(attention.shape)}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    T = attention.shape[-1]
    eye = torch.eye(T, dtype=attention.dtype, device=attention.device)
    rollout = eye.expand(attention.shape[1], T, T)  # (B, T, T)
    for a in attention:  # first layer first: rollout_l = A~_l rollout_{l-1}
        a = residual * eye + (1.0 - residual) * a  # (B, T, T)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def patch_maps(rows: torch.Tensor, *, n_special: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Rows over tokens (..., T) -> their patch part as maps (..., gh, gw), each rescaled to sum to 1."""
    patches = rows[..., n_special:]  # (..., N)
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return patches.reshape(*rows.shape[:-1], grid_h, grid_w)


def query_rows(attention: torch.Tensor, n_special: int) -> torch.Tensor:
    """The row the classifier reads: the class token's (index 0), or the patches' mean. (..., T, T) -> (..., T)."""
    return attention[..., 0, :] if n_special else attention.mean(dim=-2)


def class_token_maps(attention: torch.Tensor, *, n_special: int, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Head-averaged attention (L, B, T, T) -> "layers" (L, B, gh, gw) and "rollout" (B, gh, gw) patch maps."""
    gh, gw = grid
    return {"layers": patch_maps(query_rows(attention, n_special), n_special=n_special, grid_h=gh, grid_w=gw),
            "rollout": patch_maps(query_rows(attention_rollout(attention), n_special), n_special=n_special,
                                  grid_h=gh, grid_w=gw)}


@torch.no_grad()
def image_attention(vit, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Maps for normalised images (B, C, H, W): "layers" (L, B, gh, gw), "rollout" (B, gh, gw), "outputs"."""
    from qkv.record import AttentionRecord

    H, W = images.shape[-2:]
    record = AttentionRecord(True)
    outputs = vit(images, record=record)
    maps = class_token_maps(head_mean(record.weights["encoder"]), n_special=vit.n_special,
                            grid=(H // vit.cfg.patch_size, W // vit.cfg.patch_size))
    return {**maps, "outputs": outputs}


def _overlay(ax, image, heat, title: str) -> None:
    """The image (H, W) grey or (H, W, 3) colour, with ``heat`` (gh, gw) upsampled over it."""
    H, W = image.shape[:2]
    up = F.interpolate(heat[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None, interpolation="nearest")
    ax.imshow(up.numpy(), cmap="jet", alpha=0.5, interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_image_attention(image: torch.Tensor, layers: torch.Tensor, rollout: torch.Tensor,
                         path: str | os.PathLike, *, title: str = "") -> Path:
    """image (C, H, W) in [0, 1], layers (L, gh, gw), rollout (gh, gw) -> one row of pictures in ``path``."""
    picture = image.permute(1, 2, 0).clamp(0, 1).cpu()  # (H, W, C)
    picture = picture[..., 0] if picture.shape[-1] == 1 else picture  # (H, W) grey or (H, W, 3)
    n = len(layers) + 2
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(picture.numpy(), cmap="gray" if picture.dim() == 2 else None, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    axes[0].axis("off")
    for i, heat in enumerate(layers):
        _overlay(axes[i + 1], picture, heat.cpu(), f"layer {i + 1}")
    _overlay(axes[-1], picture, rollout.cpu(), "rollout")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def attention_picture(aset, out: str | Path) -> dict:
    """Draw an image run's AttentionSet: the class token's attention per layer and the rollout, over the image.

    ``aset`` must hold every layer (``attention(image=F, layers=True)``): the rollout multiplies them
    all. Returns {"out"} and, for a classifier, "label" and "probability".
    """
    group = aset.group("encoder")
    if aset.image is None or group.grid is None:
        raise ValueError(f"{aset.title}: the class-token picture needs an image run's attention")
    if sorted(group.layers) != list(range(len(group.layers))):
        raise ValueError(f"the rollout needs every layer's attention, got layers {sorted(group.layers)}")
    attention = torch.stack([group.layers[i].float().mean(dim=0) for i in sorted(group.layers)])  # (L, T, T)
    attention = attention[:, None]  # (L, 1, T, T): a batch of one
    maps = class_token_maps(attention, n_special=group.n_special, grid=group.grid)
    result = {"out": str(out)}
    if aset.prediction is not None:
        result.update(label=aset.prediction[0], probability=aset.prediction[1])
    plot_image_attention(aset.image, maps["layers"][:, 0], maps["rollout"][0], out, title=aset.title)
    return result
