"""Vision Transformer speed (issue 7): qkv's ViT against Hugging Face's ViTForImageClassification.

Both models have the same configuration and the same weights (copied into HF's names, and the
logits checked equal, max abs difference < 1e-4, before anything is timed): pre-norm blocks, GELU,
a class token, learned positions, a strided-convolution patch embedding (qkv computes the same
projection as unfold + matmul at CPU inference), fp32, CPU, one torch thread, HF with its default
SDPA attention. Configurations:

    digits    the configs/digits-vit.yaml model: 8 x 8 x 1, patch 2 (16 patches + class token),
              d_model 64, 4 layers, 4 heads, d_ff 128, 10 classes; batch 64.
    mnist     the configs/mnist-vit.yaml model: 28 x 28 x 1, patch 4 (49 patches + class token),
              d_model 64, 4 layers, 4 heads, d_ff 128, 10 classes; batch 64.
    tiny32    a ViT-Tiny-width model on 32 x 32 x 3 images (CIFAR-sized): patch 4 (64 patches),
              d_model 192, 6 layers, 3 heads, d_ff 768, 10 classes; batch 32 (full run only).

    train     images/s of one training step: forward, cross-entropy, backward, fused AdamW step (lr 1e-3;
              fused is what qkv's Trainer and HF's Trainer (torch >= 2.8) use),
              dropout off in both (so the two compute the same thing).
    infer     images/s of a forward pass in eval mode under torch.inference_mode.
    infer_fresh  the same in a fresh process that has run nothing else (what `qkv classify` meets):
              glibc's heap is not yet warm there, so page faults weigh in on both sides.

Each comparison line's ours_s / baseline_s are the median seconds of one batch (the two timed in
turns); images_per_s_ours / images_per_s_baseline say the same as throughput; ratio > 1: qkv is faster.

Run: python benchmarks/vit.py [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import emit, emit_info, parser, run_isolated, time_fns

from qkv.convert import vit_state_dict_to_hf
from qkv.models.vit import ViT, ViTConfig

CONFIGS = {
    "digits": (ViTConfig(image_size=8, channels=1, patch_size=2, d_model=64, n_heads=4, d_ff=128, n_layers=4,
                         n_classes=10), 64),
    "mnist": (ViTConfig(image_size=28, channels=1, patch_size=4, d_model=64, n_heads=4, d_ff=128, n_layers=4,
                        n_classes=10), 64),
    "tiny32": (ViTConfig(image_size=32, channels=3, patch_size=4, d_model=192, n_heads=3, d_ff=768, n_layers=6,
                         n_classes=10), 32),
}


def hf_model(cfg: ViTConfig):
    import transformers

    hf_cfg = transformers.ViTConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                                    num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    layer_norm_eps=cfg.norm_eps, image_size=cfg.image_size,
                                    patch_size=cfg.patch_size, num_channels=cfg.channels, qkv_bias=True,
                                    num_labels=cfg.n_classes)
    return transformers.ViTForImageClassification(hf_cfg)


def trainer(model, images, labels, logits_of):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # both trainers' default on torch >= 2.8
    model.train()

    def step():
        loss = F.cross_entropy(logits_of(model, images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def inferer(model, images, logits_of):
    def forward():
        model.eval()
        with torch.inference_mode():
            logits_of(model, images)
    return forward


def ours_logits(model, images):
    return model(images)


def hf_logits(model, images):
    return model(pixel_values=images).logits


def bench(name: str, cfg: ViTConfig, batch: int, *, repeats: int) -> None:
    torch.manual_seed(0)
    ours = ViT(cfg)
    hf = hf_model(cfg)
    hf.load_state_dict(vit_state_dict_to_hf(ours), strict=True)
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    labels = torch.randint(0, cfg.n_classes, (batch,))
    with torch.no_grad():
        diff = (ours.eval()(images) - hf.eval()(pixel_values=images).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"{name}: qkv and HF logits differ by {diff:.3g}; not timing different models")
    emit_info(f"vit_{name}_check", max_abs_logit_diff=diff, batch=batch,
              params=sum(p.numel() for p in ours.parameters()))
    for kind, fns in (("train", (trainer(ours, images, labels, ours_logits), trainer(hf, images, labels, hf_logits))),
                      ("infer", (inferer(ours, images, ours_logits), inferer(hf, images, hf_logits)))):
        ours_s, hf_s = time_fns(*fns, warmup=2, repeats=repeats)
        emit(f"vit_{name}_{kind}", ours_s, "transformers.ViTForImageClassification", hf_s, batch=batch,
             images_per_s_ours=round(batch / ours_s, 1), images_per_s_baseline=round(batch / hf_s, 1))


def fresh_inference(name: str, repeats: int) -> tuple[float, float]:
    """Median inference seconds (ours, HF) in this process, before anything else has run in it."""
    torch.set_num_threads(1)
    cfg, batch = CONFIGS[name]
    torch.manual_seed(0)
    ours = ViT(cfg)
    hf = hf_model(cfg)
    hf.load_state_dict(vit_state_dict_to_hf(ours), strict=True)
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    return tuple(time_fns(inferer(ours, images, ours_logits), inferer(hf, images, hf_logits), warmup=2,
                          repeats=repeats))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    names = ["digits", "mnist"] if args.quick else list(CONFIGS)
    for name in names:
        cfg, batch = CONFIGS[name]
        bench(name, cfg, batch, repeats=5 if args.quick else 20)
        ours_s, hf_s = run_isolated(fresh_inference, name, 5 if args.quick else 20)
        emit(f"vit_{name}_infer_fresh", ours_s, "transformers.ViTForImageClassification", hf_s, batch=batch,
             images_per_s_ours=round(batch / ours_s, 1), images_per_s_baseline=round(batch / hf_s, 1))


if __name__ == "__main__":
    main()
