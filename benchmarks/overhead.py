"""Fixed cost of qkv's attention layers, and torch.compile graph breaks per model family (issue 18).

Two measurements:

    graph_breaks   torch._dynamo.explain on each family's forward with a tiny config (d_model 32,
                   2 layers, 4 heads): Transformer(src, tgt), DecoderOnly(ids), EncoderOnly(ids with
                   padding), SequenceClassifier(ids with padding), ViT(images), all in eval mode.
                   A break is where dynamo gives the graph back to Python (a data-dependent branch,
                   ``int(x.max())``, ``.item()``): a host sync on a GPU and a split graph for the
                   compiler. Printed as {"bench": "graph_breaks", "family": ..., "breaks": N, "graphs": G}.
    mha / encoder_block (and *_masked, with a (B, 1, 1, T) padding mask)
                   the per-call time of ``MultiHeadAttention.forward`` (self-attention) and of one
                   ``EncoderBlock`` at B=2, T=16, D=64, H=4 (eval, no_grad), against bare
                   ``F.scaled_dot_product_attention`` on the same (B, H, T, Dh) q, k, v. At this
                   shape the kernel is tens of microseconds, so the difference is the layers' own
                   cost: projections, reshapes, argument checks. ratio = baseline_s / ours_s (< 1:
                   ours costs more than the bare kernel, as it must: it also projects).

Run: python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from _common import emit, emit_info, parser, time_fns

from qkv.blocks import BlockConfig, EncoderBlock
from qkv.layers import MultiHeadAttention
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SequenceClassifier
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.models.vit import ViT, ViTConfig

TINY = dict(d_model=32, n_heads=4, d_ff=64)


def families() -> dict[str, tuple[torch.nn.Module, tuple]]:
    """family -> (model in eval mode, its forward's positional inputs)."""
    torch.manual_seed(0)
    src = torch.randint(3, 20, (2, 7))
    src[1, 5:] = 0  # padding
    tgt = torch.randint(3, 20, (2, 6))
    ids = torch.randint(3, 20, (2, 8))
    padded = ids.clone()
    padded[1, 4:] = 0
    transformer = Transformer(TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, n_encoder_layers=2,
                                                n_decoder_layers=2, **TINY))
    gpt = DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, n_layers=2, **TINY))
    bert_cfg = EncoderOnlyConfig(vocab_size=20, max_len=16, n_layers=2, n_classes=3, **TINY)
    vit = ViT(ViTConfig(image_size=8, channels=1, patch_size=2, n_layers=2, n_classes=10, **TINY))
    models = {
        "Transformer": (transformer, (src, tgt)),
        "DecoderOnly": (gpt, (ids,)),
        "EncoderOnly": (EncoderOnly(bert_cfg), (padded,)),
        "SequenceClassifier": (SequenceClassifier(EncoderOnly(bert_cfg)), (padded,)),
        "ViT": (vit, (torch.randn(2, 1, 8, 8),)),
    }
    return {name: (model.eval(), inputs) for name, (model, inputs) in models.items()}


def graph_breaks() -> None:
    for family, (model, inputs) in families().items():
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(*inputs)
        reasons = sorted({str(b.reason).splitlines()[0][:120] for b in explained.break_reasons})
        emit_info("graph_breaks", family=family, breaks=explained.graph_break_count,
                  graphs=explained.graph_count, reasons=reasons)


def overhead(quick: bool) -> None:
    B, T, D, H = 2, 16, 64, 4
    torch.manual_seed(0)
    x = torch.randn(B, T, D)
    q, k, v = (torch.randn(B, H, T, D // H) for _ in range(3))
    mha = MultiHeadAttention(D, H).eval()
    block = EncoderBlock(BlockConfig(d_model=D, n_heads=H, d_ff=4 * D, dropout=0.0)).eval()
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., T // 2:] = False  # padding: (B, 1, 1, T), True = may attend
    repeats = 200 if quick else 2000
    cases = (("mha", lambda: mha(x), lambda: F.scaled_dot_product_attention(q, k, v)),
             ("mha_masked", lambda: mha(x, mask=mask), lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
             ("encoder_block", lambda: block(x), lambda: F.scaled_dot_product_attention(q, k, v)),
             ("encoder_block_masked", lambda: block(x, mask=mask),
              lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
    with torch.no_grad():
        for bench, ours_fn, bare_fn in cases:
            ours, bare = time_fns(ours_fn, bare_fn, warmup=50, repeats=repeats)
            emit(bench, ours, "F.sdpa", bare, shape=[B, T, D, H], ours_us=round(ours * 1e6, 1),
                 baseline_us=round(bare * 1e6, 1))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    torch._logging.set_logs(dynamo=logging.ERROR)  # the breaks are counted, not printed
    overhead(args.quick)
    graph_breaks()


if __name__ == "__main__":
    main()
