"""Attention over an image: the class token's attention in each layer, and attention rollout.

* Per layer: the class token's attention to each patch, averaged over heads (Dosovitskiy et
  al. 2021, Figure 6 shows such maps). With mean pooling (no class token) the map is the mean
  attention that the patches receive from all patch queries.
* Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers",
  sec. 3): the residual connection is accounted for by A~_l = 0.5 A_l + 0.5 I (A_l averaged over
  heads, rows renormalised to sum to 1), and attention is propagated through the layers by
  multiplying them: rollout = A~_L ... A~_2 A~_1. Its class-token row is how much each patch
  contributes, through all layers, to what the classifier reads.

``attention_picture`` is what ``qkv attention RUN_DIR --image F --out F.png`` calls: the image,
one map per layer and the rollout, drawn over the image (matplotlib, headless, written atomically).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv.viz import _save, plt


def head_mean(weights: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
    """{layer: {"self": (B, H, T, T)}} -> (L, B, T, T), averaged over heads, layers in order."""
    return torch.stack([weights[i]["self"].float().mean(dim=1) for i in sorted(weights)])


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


@torch.no_grad()
def image_attention(vit, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Maps for normalised images (B, C, H, W): "layers" (L, B, gh, gw), "rollout" (B, gh, gw), "outputs"."""
    H, W = images.shape[-2:]
    gh, gw = H // vit.cfg.patch_size, W // vit.cfg.patch_size
    outputs, weights = vit(images, return_attention=True)
    attention = head_mean(weights)  # (L, B, T, T)
    k = vit.n_special
    return {"layers": patch_maps(query_rows(attention, k), n_special=k, grid_h=gh, grid_w=gw),
            "rollout": patch_maps(query_rows(attention_rollout(attention), k), n_special=k, grid_h=gh, grid_w=gw),
            "outputs": outputs}


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


def attention_picture(run_dir: str | Path, image_path: str | Path, out: str | Path, *,
                      device: torch.device | str = "cpu") -> dict:
    """Draw the class token's attention per layer and the rollout over one image file of a trained ViT run.

    Returns {"out", "label", "probability"} (label and probability for a classification run).
    """
    from qkv.run import load_run
    from qkv.tasks.vision import read_images_for, vit_of

    cfg, model, artifacts = load_run(run_dir, device=device)
    if cfg.task not in ("image_classification", "image_embedding"):
        raise ValueError(f"{run_dir}: attention over an image needs an image run, got a {cfg.task!r} run")
    std = torch.tensor(artifacts.std)[:, None, None]
    mean = torch.tensor(artifacts.mean)[:, None, None]
    images = read_images_for(cfg, artifacts, [str(image_path)]).to(device)  # (1, C, H, W), normalised
    vit = vit_of(model)
    maps = image_attention(vit, images)
    result = {"out": str(out)}
    title = Path(image_path).name
    if vit.head is not None:
        probs = maps["outputs"].float().softmax(-1)[0]
        best = int(probs.argmax())
        result.update(label=artifacts.label_names[best], probability=float(probs[best]))
        title += f": {result['label']} ({result['probability']:.2f})"
    raw = images[0].cpu() * std + mean  # back to [0, 1] for drawing
    plot_image_attention(raw, maps["layers"][:, 0], maps["rollout"][0], out, title=title)
    return result
