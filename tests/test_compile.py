"""Style rule 19: nothing in a model's forward reads tensor data under torch.compile.

``torch._dynamo.explain`` traces each family's forward on a tiny config and counts graph breaks:
a break is a data-dependent Python branch (``int(x.max())``, ``.item()``, ``.any()`` in an ``if``)
or a data-dependent shape (``nonzero``), i.e. a host sync on a GPU and a split graph. The checks
that read data run once at the model's public entry, skipped while compiling.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SentenceEncoder, SequenceClassifier
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.models.vit import ViT, ViTConfig

TINY = dict(d_model=32, n_heads=4, d_ff=64)


def _ids(*shape, padded: bool = False) -> torch.Tensor:
    ids = torch.randint(3, 20, shape, generator=torch.Generator().manual_seed(0))
    if padded:
        ids[1, shape[1] // 2:] = 0  # pad_id: 0
    return ids


def _bert(**changes) -> EncoderOnly:
    return EncoderOnly(EncoderOnlyConfig(vocab_size=20, max_len=16, n_layers=2, n_classes=3, **TINY, **changes))


FAMILIES = {
    "Transformer": lambda: (Transformer(TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, n_encoder_layers=2,
                                                          n_decoder_layers=2, **TINY)),
                            (_ids(2, 7, padded=True), _ids(2, 6))),
    "Transformer-rope-prenorm": lambda: (Transformer(TransformerConfig(
        src_vocab_size=20, tgt_vocab_size=20, n_encoder_layers=1, n_decoder_layers=1, positional="rope",
        norm_first=True, **TINY)), (_ids(2, 7, padded=True), _ids(2, 6))),
    "DecoderOnly": lambda: (DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, n_layers=2, **TINY)),
                            (_ids(2, 8),)),
    "DecoderOnly-alibi-gqa": lambda: (DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, n_layers=2,
                                                                    positional="alibi", n_kv_heads=2, **TINY)),
                                      (_ids(2, 8),)),
    "EncoderOnly": lambda: (_bert(), (_ids(2, 8, padded=True),)),  # padding: the unpadded path when eager
    "SentenceEncoder": lambda: (SentenceEncoder(_bert()), (_ids(2, 8, padded=True),)),
    "SequenceClassifier": lambda: (SequenceClassifier(_bert()), (_ids(2, 8, padded=True),)),
    "ViT": lambda: (ViT(ViTConfig(image_size=8, channels=1, patch_size=2, n_layers=2, n_classes=10, **TINY)),
                    (torch.randn(2, 1, 8, 8),)),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_has_no_graph_breaks(family):
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    model.eval()
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(*inputs)
    finally:
        torch._logging.set_logs()
    where = [f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno}: {str(b.reason).splitlines()[0]}"
             for b in explained.break_reasons if b.user_stack]
    assert explained.graph_break_count == 0, where
    assert explained.graph_count == 1


@pytest.mark.parametrize("family", ["DecoderOnly", "EncoderOnly"])
def test_the_boundary_checks_still_run_eagerly(family):
    model, (ids,) = FAMILIES[family]()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 20\), got range \[\d+, 25\]"):
        model(torch.cat([ids[:, :-1], torch.full_like(ids[:, :1], 25)], dim=1))
