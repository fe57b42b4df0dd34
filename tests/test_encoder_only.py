"""Encoder-only Transformer (BERT): shapes, padding invariance, a torch reference, pooling, heads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkv.models.encoder_only import (
    EncoderOnly,
    EncoderOnlyConfig,
    SentenceEncoder,
    SequenceClassifier,
    cls_pool,
    embed,
    mean_pool,
)
from qkv.record import AttentionRecord

TINY = EncoderOnlyConfig(vocab_size=50, max_len=16, d_model=32, n_heads=4, d_ff=64, n_layers=2)


def tiny(**changes) -> EncoderOnly:
    return EncoderOnly(dataclasses.replace(TINY, **changes)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """ids (3, 7) with 7, 4 and 2 real tokens (pad_id 0 after them), and the (3, 7) real-token mask."""
    lengths = torch.tensor([7, 4, 2])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (3, 7)
    ids = torch.randint(1, TINY.vocab_size, (3, 7)).masked_fill(~mask, 0)
    return ids, mask


def test_shapes_and_attention_weights():
    model = tiny()
    ids, mask = padded_batch()
    hidden = model(ids)
    assert hidden.shape == (3, 7, 32)
    record = AttentionRecord()
    hidden_again = model(ids, record=record)
    attention = record.weights["encoder"]
    assert list(record.weights) == ["encoder"] and sorted(attention) == [0, 1]
    assert attention[0].shape == (3, 4, 7, 7)
    assert torch.allclose(attention[1].sum(-1), torch.ones(3, 4, 7))
    assert attention[0][1, :, :, 4:].abs().max() == 0  # padded keys get no weight
    # asking for weights changes nothing at real tokens (padding: zeros on the unpadded path)
    torch.testing.assert_close(hidden_again[mask], hidden[mask], rtol=0, atol=1e-6)
    only_last = AttentionRecord(layers=[-1])
    model(ids, record=only_last)
    assert list(only_last.weights["encoder"]) == [1]
    nothing = AttentionRecord(layers=False)
    assert torch.equal(model(ids, record=nothing), hidden) and nothing.weights == {}  # fused, unpadded path


def test_padding_does_not_change_real_tokens():
    model = tiny()
    ids, mask = padded_batch()
    batched = model(ids)
    for row, n in enumerate(mask.sum(1).tolist()):
        alone = model(ids[row:row + 1, :n])  # (1, n, D), no padding at all
        torch.testing.assert_close(batched[row:row + 1, :n], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids, mask=mask), batched, rtol=0, atol=0)  # default mask = ids != pad_id


def test_segments_and_positions_matter():
    model = tiny()
    ids, _ = padded_batch()
    segments = torch.ones_like(ids)
    assert (model(ids, segment_ids=segments) - model(ids)).abs().max() > 1e-3
    assert (model(ids.flip(1)).flip(1) - model(ids)).abs().max() > 1e-3  # learned positions: order matters


def test_matches_torch_transformer_encoder_with_copied_weights():
    """Reference: BERT's embedding sum + LayerNorm, then nn.TransformerEncoderLayer (post-norm, GELU)."""
    model = tiny().double()
    ids, mask = padded_batch()
    segments = (torch.arange(7) >= 3).long().expand(3, 7)
    layers = []
    for block in model.layers:
        ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", layer_norm_eps=1e-12,
                                         batch_first=True, norm_first=False).double().eval()
        attn = block.self_attn
        ref.self_attn.in_proj_weight.data.copy_(attn.qkv_proj.weight)  # rows q, k, v in both
        ref.self_attn.in_proj_bias.data.copy_(attn.qkv_proj.bias)
        ref.self_attn.out_proj.load_state_dict(attn.out_proj.state_dict())
        ref.linear1.load_state_dict(block.ff.w_1.state_dict())
        ref.linear2.load_state_dict(block.ff.w_2.state_dict())
        ref.norm1.load_state_dict(block.attn_residual.norm.state_dict())
        ref.norm2.load_state_dict(block.ff_residual.norm.state_dict())
        layers.append(ref)
    x = model.embed.weight[ids] + model.positions.embedding.weight[:7] + model.segment_embed.weight[segments]
    x = F.layer_norm(x, (32,), model.embed_norm.weight, model.embed_norm.bias, eps=1e-12)
    for ref in layers:
        x = ref(x, src_key_padding_mask=~mask)
    ours = model(ids, segment_ids=segments)
    torch.testing.assert_close(ours[mask], x[mask], rtol=0, atol=1e-10)


def test_pooling_functions():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(mean_pool(hidden, mask)[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(mean_pool(hidden, mask)[1], hidden[1].mean(0))
    assert torch.equal(cls_pool(hidden), hidden[:, 0])
    empty = mean_pool(hidden, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(2, 3))  # all padding: zeros, not NaN


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_encoder(pooling):
    model = tiny()
    ids, mask = padded_batch()
    hidden = model(ids)
    expected = mean_pool(hidden, mask) if pooling == "mean" else cls_pool(hidden)
    raw = SentenceEncoder(model, pooling=pooling, normalize=False)(ids)
    torch.testing.assert_close(raw, expected)
    unit = SentenceEncoder(model, pooling=pooling)(ids)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(unit, F.normalize(expected, dim=-1))


class _Collater:
    """The smallest tokenizer ``embed`` accepts: one id per character."""

    def collate(self, texts):
        lengths = torch.tensor([len(t) for t in texts])
        T = int(lengths.max())
        mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
        ids = torch.tensor([[1 + ord(c) % 40 for c in t] + [0] * (T - len(t)) for t in texts])
        return ids, torch.zeros_like(ids), mask


def test_embed_keeps_order_and_mode():
    model = tiny().train()
    encoder = SentenceEncoder(model)
    texts = ["ab", "abcdefg", "abc", "x"]
    out = embed(encoder, _Collater(), texts, batch_size=3)
    assert model.training  # mode restored
    model.eval()
    one_by_one = torch.cat([encoder(_Collater().collate([t])[0]) for t in texts])
    torch.testing.assert_close(out, one_by_one, rtol=0, atol=1e-5)
    assert embed(encoder, _Collater(), []).shape == (0, 32)


def test_classifier_shape_and_learning():
    """Two classes: does token 7 occur? A tiny classifier must get every example right."""
    cfg = dataclasses.replace(TINY, n_classes=2, pooling="cls", dropout=0.0, attn_dropout=0.0)
    classifier = SequenceClassifier(EncoderOnly(cfg))
    ids = torch.randint(8, cfg.vocab_size, (32, 6))
    ids[:, 0] = 1  # a [CLS]-like first token
    labels = torch.arange(32) % 2
    ids[labels == 1, 3] = 7
    assert classifier(ids).shape == (32, 2)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    for _ in range(60):
        loss = F.cross_entropy(classifier(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.eval()
    assert (classifier(ids).argmax(-1) == labels).all(), loss.item()
    assert SequenceClassifier(tiny(), n_classes=5, pooling="mean")(ids).shape == (32, 5)


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=30), "not divisible by n_heads"),
    (dict(pooling="max"), "pooling must be one of"),
    (dict(type_vocab_size=0), "type_vocab_size must be >= 1"),
    (dict(n_classes=-1), "n_classes must be >= 0"),
    (dict(positional="wavelet"), "positional must be one of"),
    (dict(dropout=1.5), "dropout must be in"),
])
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_bad_inputs():
    model = tiny()
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="vocab_size must be set"):
        EncoderOnly(dataclasses.replace(TINY, vocab_size=0))
    with pytest.raises(ValueError, match=r"ids must have shape \(B, T\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="mask must be a bool"):
        model(ids, mask=mask.long())
    with pytest.raises(ValueError, match=r"segment_ids must be in \[0, 2\)"):
        model(ids, segment_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="exceeds the learned position table"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_classes must be >= 1"):
        SequenceClassifier(model)
    with pytest.raises(ValueError, match="pooling must be one of"):
        SentenceEncoder(model, pooling="max")


def test_pre_norm_variant_and_rope_run():
    for model in (tiny(norm_first=True), tiny(positional="rope")):
        ids, mask = padded_batch()
        assert torch.isfinite(model(ids)[mask]).all()


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_skipping_padding_matches_the_padded_path(positional, monkeypatch):
    """The unpadded layers (qkv.unpad) give the padded path's outputs and gradients at real tokens."""
    import qkv.models.encoder_only as encoder_only

    torch.manual_seed(0)
    model = EncoderOnly(dataclasses.replace(TINY, positional=positional)).eval()  # no dropout
    ids, mask = padded_batch()
    outputs, grads = [], []
    for skip in (True, False):
        monkeypatch.setattr(encoder_only, "worth_unpadding", lambda m, skip=skip: skip)
        model.zero_grad()
        hidden = model(ids)
        (hidden[mask] ** 2).sum().backward()
        outputs.append(hidden)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert outputs[0][~mask].abs().max() == 0  # padding comes back as zeros
    torch.testing.assert_close(outputs[0][mask], outputs[1][mask], rtol=0, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_worth_unpadding_threshold():
    from qkv.unpad import Unpadded, worth_unpadding

    full = torch.ones(4, 10, dtype=torch.bool)
    assert not worth_unpadding(full)
    some = full.clone()
    some[:, 9:] = False  # 10% padding
    assert worth_unpadding(some)
    tokens = Unpadded.from_mask(some)
    x = torch.randn(4, 10, 3)
    assert tokens.n_tokens == 36
    torch.testing.assert_close(tokens.pad(tokens.unpad(x))[some], x[some])
    with pytest.raises(ValueError, match="bool"):
        Unpadded.from_mask(some.long())


def test_wrappers_keep_the_encoders_mode():
    """load_hf_bert returns an encoder in eval mode; wrapping it must not switch dropout back on."""
    encoder = tiny().eval()
    assert not SentenceEncoder(encoder).training and not encoder.training
    assert not SequenceClassifier(encoder, n_classes=2).training
    assert SentenceEncoder(tiny().train()).training
