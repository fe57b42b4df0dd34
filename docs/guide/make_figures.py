"""Draw the guide's pictures into docs/guide/img/ with qkv's own functions.

    OMP_NUM_THREADS=1 .venv/bin/python docs/guide/make_figures.py all          # every picture
    OMP_NUM_THREADS=1 .venv/bin/python docs/guide/make_figures.py saturation   # one of them

Pictures of trained models read the run directories of docs/results.md (runs/multi30k-de-en);
the others need nothing but qkv. Each picture is named in the chapter that shows it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from qkv.attention import retrieve, scaled_dot_product_attention  # noqa: E402
from qkv.masks import causal_mask, combine_masks, padding_mask, sliding_window_mask  # noqa: E402
from qkv.positional import sinusoidal_table  # noqa: E402
from qkv.record import AttentionRecord  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"
DE_EN = Path("runs/multi30k-de-en")
DIGITS_VIT = Path("runs/digits-vit")
SENTENCE_DE = "Ein Mann in einem blauen Hemd spielt Gitarre auf der Straße."
DPI = 80


def save(fig, name: str) -> Path:
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"{name}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"{path} ({path.stat().st_size // 1024} KB)")
    return path


def retrieval() -> Path:
    """Chapter 1: one query against four keys."""
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.7, 0.7, 0.0]])
    values = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [5.0, 5.0]])
    found = retrieve(torch.tensor([2.0, 0.5, 0.0]), keys, values)
    names = ["k1", "k2", "k3", "k4"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    axes[0].bar(names, found.scores.numpy(), color="tab:blue")
    axes[0].set_title("similarities s_i = q . k_i / sqrt(d_k)")
    axes[1].bar(names, found.weights.numpy(), color="tab:orange")
    axes[1].set_title("weights a = softmax(s)")
    axes[1].set_ylim(0, 1)
    for i, v in enumerate(values):
        axes[2].arrow(0, 0, *v.tolist(), color="0.7", width=0.15, length_includes_head=True)
        axes[2].annotate(f"v{i + 1}", v.tolist(), color="0.4")
    axes[2].arrow(0, 0, *found.output.tolist(), color="tab:red", width=0.3, length_includes_head=True)
    axes[2].annotate("output", found.output.tolist(), color="tab:red")
    axes[2].set_xlim(-12, 12)
    axes[2].set_ylim(-2, 12)
    axes[2].set_title("output = sum_i a_i v_i")
    return save(fig, "retrieval")


def saturation() -> Path:
    """Chapter 2: the softmax's largest weight and Jacobian norm against d_k, scaled or not."""
    g = torch.Generator().manual_seed(0)
    sizes = [2 ** i for i in range(1, 12)]
    curves = {"unscaled (scale 1)": ([], []), "scaled (1/sqrt(d_k), Eq. 1)": ([], [])}
    for d_k in sizes:
        q = torch.randn(1, 1, 256, d_k, generator=g)
        k = torch.randn(1, 1, 32, d_k, generator=g)
        v = torch.randn(1, 1, 32, 8, generator=g)
        for name, scale in zip(curves, (1.0, 1 / math.sqrt(d_k))):
            _, w = scaled_dot_product_attention(q, k, v, scale=scale, return_weights=True)
            w = w[0, 0]
            jacobian = torch.diag_embed(w) - w[:, :, None] * w[:, None, :]
            curves[name][0].append(w.max(-1).values.mean().item())
            curves[name][1].append(torch.linalg.matrix_norm(jacobian).mean().item())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, (largest, jac) in curves.items():
        axes[0].plot(sizes, largest, "o-", label=name)
        axes[1].plot(sizes, jac, "o-", label=name)
    for ax, title in zip(axes, ("mean largest weight of a row (1 = one-hot)", "mean norm of the softmax Jacobian")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_k")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("random q, k ~ N(0, 1): 256 queries against 32 keys")
    return save(fig, "saturation")


def masks() -> Path:
    """Chapter 3: padding, causal, both, sliding window."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0]])
    panels = {
        "padding (3 pad keys)": padding_mask(ids, 0).expand(1, 1, 8, 8),
        "causal": causal_mask(8),
        "padding AND causal": combine_masks(padding_mask(ids, 0), causal_mask(8)),
        "sliding window 3": sliding_window_mask(8, window=3),
    }
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (title, mask) in zip(axes, panels.items()):
        ax.imshow(mask[0, 0].int().numpy(), cmap="Greys", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return save(fig, "masks")


def positional() -> Path:
    """Chapter 6: the sinusoidal table and PE . PE."""
    pe = sinusoidal_table(100, 64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    image = axes[0].imshow(pe.numpy(), aspect="auto", cmap="RdBu")
    axes[0].set_xlabel("dimension")
    axes[0].set_ylabel("position")
    axes[0].set_title("PE(pos, i), d_model = 64")
    fig.colorbar(image, ax=axes[0])
    image = axes[1].imshow((pe @ pe.T).numpy(), cmap="viridis")
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("position")
    axes[1].set_title("PE(m) . PE(n): a function of m - n")
    fig.colorbar(image, ax=axes[1])
    return save(fig, "positional")


def _de_en():
    from qkv.run import load_run

    if not (DE_EN / "config.json").is_file():
        raise SystemExit(f"{DE_EN} not found: train it first (docs/results.md)")
    cfg, model, (src_tok, tgt_tok) = load_run(DE_EN)
    src = torch.tensor([src_tok.encode(SENTENCE_DE) + [src_tok.eos_id]])
    src_labels = [src_tok.tokenizer.id_to_token(i) for i in src[0].tolist()]
    return cfg, model, src_tok, tgt_tok, src, src_labels


def heads() -> Path:
    """Chapter 4: every head of the last encoder layer of the de-en model."""
    from qkv.viz import plot_heads

    cfg, model, _, _, src, labels = _de_en()
    last = cfg.model.n_encoder_layers - 1
    record = AttentionRecord(layers=[last])
    with torch.no_grad():
        model.encode(src, record=record)
    path = plot_heads(record.weights["encoder"][last][0], labels, labels, IMG / "heads.png",
                      title=f"de-en encoder, layer {last + 1}: self-attention of each head")
    _shrink(path)
    return path


def alignment() -> Path:
    """Chapter 7: cross-attention of the last decoder layer while translating one sentence."""
    from qkv.decode import greedy_decode

    cfg, model, _, tgt_tok, src, src_labels = _de_en()
    hyp = greedy_decode(model, src)[0]
    tgt_in = torch.tensor([[cfg.model.bos_id, *hyp]])
    last = cfg.model.n_decoder_layers - 1
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        record = AttentionRecord(layers=[last])
        model.decode(tgt_in, memory, src_mask, record=record)
    cross = record.weights["cross"][last][0].mean(0)  # (T, S), averaged over heads
    rows = [tgt_tok.tokenizer.id_to_token(i) for i in hyp] + ["</s>"]  # row t predicts token t
    fig, ax = plt.subplots(figsize=(0.45 * len(src_labels) + 1.5, 0.4 * len(rows) + 1.5))
    ax.imshow(cross.numpy(), cmap="viridis", vmin=0)
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("German source (keys, values: the encoder)")
    ax.set_ylabel("English output (queries: the decoder)")
    ax.set_title(f"de-en, decoder layer {last + 1}, cross-attention\n(mean of {cfg.model.n_heads} heads)")
    print("translation:", tgt_tok.decode(hyp))
    return save(fig, "alignment")


def kv_cache() -> Path:
    """Chapter 8: seconds per generated token against context length, cached and uncached."""
    from qkv.generate import SamplingConfig, generate
    from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig

    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig(vocab_size=64, block_size=512, d_model=128, n_heads=4, n_layers=4,
                                          dropout=0.0)).eval()
    greedy = SamplingConfig(max_new_tokens=400, temperature=0.0, stop_at_eos=False)
    window = 25
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for use_cache, label in ((True, "KV cache"), (False, "no cache (re-run the context)")):
        stamps = [time.perf_counter()]
        for _ in generate(model, [[5, 6, 7]], greedy, use_cache=use_cache):
            stamps.append(time.perf_counter())
        per_token = [(stamps[i + window] - stamps[i]) / window * 1e3 for i in range(0, len(stamps) - window, window)]
        positions = [i + window // 2 for i in range(0, len(stamps) - window, window)]
        ax.plot(positions, per_token, "o-", label=f"{label}: {stamps[-1] - stamps[0]:.1f} s for 400 tokens")
    ax.set_xlabel("tokens generated so far (context length)")
    ax.set_ylabel("ms per token")
    ax.set_title("greedy generation, 4 layers, d_model 128, one CPU thread")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, "kv_cache")


def vit_digit() -> Path:
    """Chapter 10: a digit cut into patches, and a trained ViT's attention rollout over it."""
    from sklearn.datasets import load_digits

    from qkv.run import load_run
    from qkv.tasks.vision import vit_of
    from qkv.viz_image import image_attention

    cfg, model, artifacts = load_run(DIGITS_VIT)
    digit = torch.tensor(load_digits().images[0], dtype=torch.float32) / 16.0  # (8, 8) in [0, 1], a "0"
    image = ((digit[None] - torch.tensor(artifacts.mean)[:, None, None])
             / torch.tensor(artifacts.std)[:, None, None])[None]  # (1, 1, 8, 8), normalised as in training
    maps = image_attention(vit_of(model), image)
    p = cfg.model.patch_size
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
    axes[0].imshow(digit, cmap="gray_r")
    for i in range(0, 8 + 1, p):
        axes[0].axhline(i - 0.5, color="tab:red")
        axes[0].axvline(i - 0.5, color="tab:red")
    axes[0].set_title(f"{(8 // p) ** 2} patches of {p}x{p} pixels")
    axes[1].imshow(maps["layers"][-1, 0], cmap="viridis")
    axes[1].set_title("class token's attention, last layer")
    axes[2].imshow(digit, cmap="gray_r")
    axes[2].imshow(maps["rollout"][0].repeat_interleave(p, 0).repeat_interleave(p, 1), cmap="viridis", alpha=0.6)
    label = artifacts.label_names[int(maps["outputs"][0].argmax())]
    axes[2].set_title(f"attention rollout (predicted: {label})")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return save(fig, "vit_digit")


def _shrink(path: Path) -> None:
    """qkv.viz writes at 120 dpi; re-save a big picture at the guide's resolution."""
    if path.stat().st_size > 150_000:
        image = plt.imread(path)
        fig = plt.figure(figsize=(image.shape[1] / 120, image.shape[0] / 120))
        fig.figimage(image)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


FIGURES = {f.__name__: f for f in (retrieval, saturation, masks, positional, heads, alignment, kv_cache, vit_digit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="+", choices=[*FIGURES, "all"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in FIGURES if "all" in args.figures else args.figures:
        FIGURES[name]()


if __name__ == "__main__":
    main()
