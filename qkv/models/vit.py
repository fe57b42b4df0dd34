"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", sec. 3.1).

The image x (B, C, H, W) is cut into N = (H/P)(W/P) patches of P x P pixels; each patch is
flattened to P*P*C values and projected to D by one linear map E (Eq. 1). A learned class token
x_class is put at position 0, position embeddings E_pos are added, and the sequence goes through
pre-norm encoder blocks (Eq. 2-3: z' = MSA(LN(z)) + z, z = MLP(LN(z')) + z'); the class token's
output, after a final LayerNorm, is classified by one linear layer (Eq. 4: y = LN(z_L^0)).

Design decisions (where the paper leaves a choice):

* A patch is flattened channel-first, (C, P, P), so the projection's weight (D, C*P*P) viewed as
  (D, C, P, P) *is* the kernel of the equivalent strided convolution. ``patch_embed`` picks the
  computation (``"linear"``: unfold + matmul, the paper's description; ``"conv"``: one
  ``conv2d`` with stride P, the usual implementation and faster); both share one weight, so a
  checkpoint works with either, and a test proves they agree.
* ``pooling="mean"`` (the paper's sec. D.3 alternative, "GAP") drops the class token altogether
  and classifies the mean of the patch outputs.
* Positions: ``"learned"`` (the paper's 1-D table over the patch grid, plus one for the class
  token) or ``"sinusoidal"`` (2-D sin-cos as in MAE: half the features encode the row, half the
  column, each with sec. 3.5 of Vaswani et al.; the class token's position is zero). When an
  image of another size comes in, the grid part of either table is resized bicubically to the
  new grid (the paper's sec. 3.2 "2D interpolation of the pre-trained position embeddings").
* Only the class token's output is classified, so ``forward`` computes the last layer for that
  token alone (``class_token_block``: every token is still a key and a value, but their
  projections fold into the one query and the weighted sum): the same logits and gradients,
  without the last layer's key and value projections, output projection and MLP for the N
  patches. ``encode`` (every token's output) and attention maps run the full stack.
* Inference (eval mode, autograd off) runs the other layers as ``encoder_block_inference`` on the
  flat (B*T, D) token matrix (the same arithmetic with less fixed cost per layer) and, on CPU,
  the patch projection as the matmul.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qkv.blocks import BlockConfig, EncoderBlock, encoder_block_inference, layer_groups
from qkv.config import check_ranges, ranged
from qkv.layers import make_norm
from qkv.positional import sinusoidal_table
from qkv.record import AttentionRecord, layer_records

POOLING = ("cls", "mean")
POSITIONAL = ("learned", "sinusoidal")
PATCH_EMBED = ("conv", "linear")


@dataclass(frozen=True)
class ViTConfig:
    """Defaults are ViT-B/16 at 224 x 224 (Table 1); n_classes comes from the labels (0 = no head)."""

    image_size: int = ranged(224, ge=1)
    channels: int = ranged(3, ge=1)
    patch_size: int = ranged(16, ge=1)
    d_model: int = ranged(768, ge=1)
    n_heads: int = ranged(12, ge=1)
    d_ff: int = ranged(3072, ge=1)
    n_layers: int = ranged(12, ge=1)
    dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    attn_dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = ranged(1e-6, gt=0.0)
    positional: str = "learned"      # "learned" or "sinusoidal" (2-D)
    pooling: str = "cls"             # "cls" (class token) or "mean" (no class token; mean of the patches)
    patch_embed: str = "conv"        # "conv" or "linear": two computations of the same projection
    n_classes: int = ranged(0, ge=0, note="0 = from the labels, or no head")

    def __post_init__(self):
        check_ranges(self)
        for name, allowed in (("pooling", POOLING), ("positional", POSITIONAL), ("patch_embed", PATCH_EMBED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.positional == "sinusoidal" and self.d_model % 4:
            raise ValueError(f"d_model={self.d_model} must be divisible by 4 for 2-D sinusoidal positions")
        BlockConfig.from_config(self, norm_first=True)

    @property
    def grid(self) -> int:
        """Patches per side at the training size."""
        return self.image_size // self.patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*P*P), patches in row-major order, each flattened channel-first."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, P, gw, P)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, P, P)
    return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*P*P)


class PatchEmbedding(nn.Module):
    """Eq. 1: x_p^i E for every flattened patch, as a matmul on patches or a strided convolution."""

    def __init__(self, channels: int, patch_size: int, d_model: int, *, kind: str = "conv"):
        super().__init__()
        if kind not in PATCH_EMBED:
            raise ValueError(f"patch_embed must be one of {PATCH_EMBED}, got {kind!r}")
        self.channels, self.patch_size, self.kind = channels, patch_size, kind
        self.proj = nn.Linear(channels * patch_size * patch_size, d_model)  # E: (D, C*P*P)

    def forward(self, images: torch.Tensor, *, kind: str | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D); ``kind`` overrides the configured computation.

        For inference on CPU (autograd off) the matmul runs whatever the configured kind: the same
        projection, and faster there than oneDNN's convolution at these sizes (0.07 vs 0.15 ms,
        digits model; 0.7 vs 1.0 ms, 32 x 32 x 3 images, patch 4, D 192, batch 32).
        """
        if kind is None:
            cpu_inference = images.device.type == "cpu" and not torch.is_grad_enabled()
            kind = "linear" if cpu_inference else self.kind
        if kind == "linear":
            return self.proj(patchify(images, self.patch_size))  # (B, N, D)
        D, p = self.proj.out_features, self.patch_size
        kernel = self.proj.weight.view(D, self.channels, p, p)  # (D, C, P, P)
        x = F.conv2d(images, kernel, self.proj.bias, stride=p)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def sincos_2d(grid_h: int, grid_w: int, d_model: int) -> torch.Tensor:
    """2-D sin-cos positions (MAE): [PE(row) | PE(column)], each of D/2 features. (gh*gw, D)."""
    rows = sinusoidal_table(grid_h, d_model // 2)  # (gh, D/2)
    cols = sinusoidal_table(grid_w, d_model // 2)  # (gw, D/2)
    table = torch.cat([rows[:, None, :].expand(grid_h, grid_w, -1),
                       cols[None, :, :].expand(grid_h, grid_w, -1)], dim=-1)  # (gh, gw, D)
    return table.reshape(grid_h * grid_w, d_model)


def resize_grid(table: torch.Tensor, grid: int, new_h: int, new_w: int) -> torch.Tensor:
    """Bicubic 2-D interpolation of a (grid*grid, D) position table to (new_h*new_w, D) (ViT sec. 3.2)."""
    if (new_h, new_w) == (grid, grid):
        return table
    D = table.shape[-1]
    x = table.reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    x = F.interpolate(x.float(), size=(new_h, new_w), mode="bicubic", align_corners=False).to(table.dtype)
    return x.permute(0, 2, 3, 1).reshape(new_h * new_w, D)  # (gh*gw, D)


class ViT(nn.Module):
    """images (B, C, H, W) -> logits (B, n_classes), or pooled features (B, D) when n_classes is 0."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, n_patches = cfg.d_model, cfg.grid * cfg.grid
        self.patch_embed = PatchEmbedding(cfg.channels, cfg.patch_size, D, kind=cfg.patch_embed)
        self.class_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pooling == "cls" else None
        n_special = 1 if self.class_token is not None else 0
        if cfg.positional == "learned":
            self.positions = nn.Parameter(torch.zeros(n_special + n_patches, D))  # (1 + N, D)
        else:
            table = torch.cat([torch.zeros(n_special, D), sincos_2d(cfg.grid, cfg.grid, D)])
            self.register_buffer("positions", table, persistent=False)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        block = BlockConfig.from_config(cfg, norm_first=True)  # Eq. 2-3: pre-norm
        self.layers = nn.ModuleList(EncoderBlock(block) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg.norm, D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.n_classes) if cfg.n_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) for matrices, tokens and positions; biases 0."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.trunc_normal_(p, std=0.02)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    @property
    def n_special(self) -> int:
        """Tokens before the patches: 1 (class token) or 0 (mean pooling)."""
        return 1 if self.class_token is not None else 0

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """E_pos for a (grid_h x grid_w) patch grid, interpolated from the training grid. (n_special + N, D)."""
        if (grid_h, grid_w) == (self.cfg.grid, self.cfg.grid):
            return self.positions
        k = self.n_special
        grid = resize_grid(self.positions[k:], self.cfg.grid, grid_h, grid_w)
        return torch.cat([self.positions[:k], grid])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos. (B, C, H, W) -> (B, n_special + N, D)."""
        cfg = self.cfg
        if images.dim() != 4 or images.shape[1] != cfg.channels:
            raise ValueError(f"images must have shape (B, C={cfg.channels}, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"image size {H}x{W} is not divisible by patch_size={cfg.patch_size}")
        x = self.patch_embed(images)  # (B, N, D)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.position_table(H // cfg.patch_size, W // cfg.patch_size).to(x.dtype)
        return self.embed_dropout(x)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Patch embedding, class token and learned positions; each layer; the final norm and the head."""
        positions = self.positions if isinstance(self.positions, nn.Parameter) else None
        return layer_groups(self, [self.patch_embed, self.class_token, positions], self.layers)

    def encode(self, images: torch.Tensor, *, record: AttentionRecord | None = None) -> torch.Tensor:
        """Eq. 2-3: (B, C, H, W) -> z_L after the final norm (B, n_special + N, D).

        record: an AttentionRecord; the asked layers put their weights (B, H, T, T) under "encoder".
        """
        x = self.embed(images)
        if record is None or not record.wants("encoder", len(self.layers)):
            return self.final_norm(self.run_layers(x, self.layers))
        for layer, slot in zip(self.layers, layer_records(record, "encoder", len(self.layers))):
            x = layer(x, record=slot)
        return self.final_norm(x)

    @staticmethod
    def run_layers(x: torch.Tensor, layers: Iterable[EncoderBlock]) -> torch.Tensor:
        """x (B, T, D) through ``layers`` -> (B, T, D).

        For inference (autograd off, blocks in eval mode) each block runs as
        ``encoder_block_inference`` on the flat (B*T, D) token matrix: the same outputs with less
        fixed cost per layer, a few per cent of a small ViT's time on CPU.
        """
        layers = list(layers)
        if torch.is_grad_enabled() or any(layer.training for layer in layers):
            for layer in layers:
                x = layer(x)
            return x
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (B*T, D)
        for layer in layers:
            flat = encoder_block_inference(layer, flat, B)
        return flat.view(B, T, D)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Eq. 4's LN(z_L^0) (the class token), or the mean of the patch outputs. (B, T, D) -> (B, D)."""
        return hidden[:, 0] if self.class_token is not None else hidden.mean(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled (B, D).

        With the class token, only its output is read, so the last layer runs its query, its
        feed-forward and the final norm for that one token (``class_token_block``; every token
        still serves as a key and a value), so the result is LN(z_L^0) of ``encode``.
        """
        if self.class_token is None:
            return self.pool(self.encode(images))
        x = self.run_layers(self.embed(images), self.layers[:-1])  # (B, 1 + N, D)
        x = class_token_block(self.layers[-1], x)  # (B, 1, D)
        return self.final_norm(x[:, 0])  # (B, D)

    def forward(self, images: torch.Tensor, *, record: AttentionRecord | None = None) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, n_classes) (features (B, D) without a head).

        record: an AttentionRecord; then every token's output is computed (``encode``), not the
        class token's alone, so the asked layers' weights (B, H, T, T) land under "encoder".
        """
        if record is not None and record.wants("encoder", len(self.layers)):
            out = self.pool(self.encode(images, record=record))  # (B, D)
        else:
            out = self.features(images)  # (B, D)
        return self.head(out) if self.head is not None else out  # (B, n_classes)


def class_token_block(block: EncoderBlock, x: torch.Tensor) -> torch.Tensor:
    """A pre-norm EncoderBlock computed for the class token's output only. x (B, T, D) -> (B, 1, D).

    Eq. 2-3 for position 0: z'_0 = MSA(LN(z))_0 + z_0, then z'_0 + MLP(LN(z'_0)). With h = LN(z),
    one query q_i = h_0 W_i^Q + b^Q_i per head i, and keys and values linear in h, the projections
    of the T keys and values fold into the query and into the attention-weighted sum:

        scores_i = q_i (h W_i^K + b^K_i)^T / sqrt(d_k) = (q_i W_i^K^T) h^T / sqrt(d_k) + const
        head_i   = a_i (h W_i^V + b^V_i) = (a_i h) W_i^V + b^V_i        (the weights a_i sum to one)

    (W_i^K: (D, d_k), the head's slice of the key projection.) The constant q_i . b^K_i is the same
    for every key, so softmax ignores it; attention dropout (training) scales b^V by the kept weight.
    The same numbers, up to rounding, as projecting all T keys and values (tests compare logits
    and gradients with the full block), for O(T D H) work instead of O(T D^2): the last layer costs
    little more than its LayerNorm over the T tokens.
    """
    attn = block.self_attn
    if not attn.is_plain or not block.attn_residual.norm_first:
        raise ValueError("class_token_block needs a pre-norm block with plain multi-head self-attention")
    D, H, Dh = attn.d_model, attn.n_heads, attn.head_dim
    B, T, _ = x.shape
    h = block.attn_residual.norm(x)  # (B, T, D)
    (w_q, w_k, w_v), (b_q, _, b_v) = attn.qkv_weights()  # W^Q, W^K, W^V: (H*Dh, D) each
    w_k, w_v = w_k.view(H, Dh, D), w_v.view(H, Dh, D)  # W_i^K^T, W_i^V^T: (H, Dh, D)
    dropping = attn.training and attn.dropout > 0

    def attend(h0: torch.Tensor) -> torch.Tensor:  # h0 = LN(z_0), (B, 1, D)
        q = F.linear(h0[:, 0], w_q, b_q)  # (B, H*Dh)
        q = q.view(B, H, Dh).transpose(0, 1) * Dh ** -0.5  # (H, B, Dh)
        q_keys = torch.bmm(q, w_k).transpose(0, 1)  # q_i W_i^K^T: (H, B, D) -> (B, H, D)
        weights = torch.softmax(torch.bmm(q_keys, h.transpose(1, 2)), dim=-1)  # (B, H, T)
        if dropping:
            weights = F.dropout(weights, p=attn.dropout)
        pooled = torch.bmm(weights, h).transpose(0, 1)  # a_i h: (B, H, D) -> (H, B, D)
        heads = torch.bmm(pooled, w_v.transpose(1, 2)).transpose(0, 1)  # (H, B, Dh) -> (B, H, Dh)
        if b_v is not None:  # sum_t a_t b^V = b^V, unless dropout removed some of the weight
            b_v_heads = b_v.view(H, Dh)
            heads = heads + (weights.sum(-1, keepdim=True) * b_v_heads if dropping else b_v_heads)
        return attn.output(heads[:, :, None])  # (B, H, 1, Dh) -> (B, 1, D)

    x0 = block.attn_residual(x[:, :1], attend)  # (B, 1, D)
    return block.ff_residual(x0, block.ff)


class ImageEmbedder(nn.Module):
    """Unit-length image embeddings from a ViT's pooled output, for metric learning. -> (B, D)."""

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The ViT's groups."""
        return self.vit.layer_groups()

    def forward(self, images: torch.Tensor, *, record: AttentionRecord | None = None) -> torch.Tensor:
        """(B, C, H, W) -> unit-length embeddings (B, D); ``record`` as in ViT."""
        if record is not None and record.wants("encoder", len(self.vit.layers)):
            pooled = self.vit.pool(self.vit.encode(images, record=record))  # (B, D)
        else:
            pooled = self.vit.features(images)  # (B, D)
        return F.normalize(pooled, p=2.0, dim=-1)
