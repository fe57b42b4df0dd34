"""One AttentionRecord for every family (style rule 17), and the model contracts of issue 18.

The weights a record collects are the explicit math path of ``scaled_dot_product_attention`` on the
very q, k, v the layer projected (captured by a hook on its input); only the asked layers leave the
fused kernel; outputs are bit-identical when no layer is asked; ``layer_groups`` holds every
parameter once, one group per layer.
"""

from __future__ import annotations

import pytest
import torch

import qkv.layers
from qkv.attention import scaled_dot_product_attention
from qkv.checkpoint import load_weights, save_weights, unique_state_dict
from qkv.layers import MultiHeadAttention
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SentenceEncoder, SequenceClassifier
from qkv.models.rnn_seq2seq import RNNSeq2Seq, RNNSeq2SeqConfig
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.models.vit import ImageEmbedder, ViT, ViTConfig
from qkv.record import AttentionRecord

TINY = dict(d_model=32, n_heads=4, d_ff=64)


def ids(*shape, padded=False):
    out = torch.randint(3, 20, shape, generator=torch.Generator().manual_seed(1))
    if padded:
        out[1, shape[1] // 2:] = 0
    return out


def transformer(positional="sinusoidal"):
    return Transformer(TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, n_encoder_layers=2, n_decoder_layers=3,
                                         positional=positional, dropout=0.0, **TINY)).eval()


def bert():
    return EncoderOnly(EncoderOnlyConfig(vocab_size=20, max_len=16, n_layers=2, n_classes=3, dropout=0.0,
                                         attn_dropout=0.0, **TINY)).eval()


def vit():
    return ViT(ViTConfig(image_size=8, channels=1, patch_size=2, n_layers=2, n_classes=10, **TINY)).eval()


def seq2seq_case(positional):
    m = transformer(positional)
    return m, (ids(2, 7, padded=True), ids(2, 5)), {
        "encoder": [b.self_attn for b in m.encoder], "decoder": [b.self_attn for b in m.decoder],
        "cross": [b.cross_attn for b in m.decoder]}


def gpt_case(**changes):
    m = DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, n_layers=3, **TINY, **changes)).eval()
    return m, (ids(2, 8),), {"decoder": [b.self_attn for b in m.layers]}


def bert_case(wrap=None):
    m = bert()
    return (wrap(m).eval() if wrap else m), (ids(2, 8, padded=True),), {"encoder": [b.self_attn for b in m.layers]}


def vit_case():
    m = vit()
    return m, (torch.randn(2, 1, 8, 8),), {"encoder": [b.self_attn for b in m.layers]}


# family -> (a fresh model, its inputs, {kind: the attention modules of that kind, in layer order})
FAMILIES = {
    "Transformer": lambda: seq2seq_case("sinusoidal"),
    "Transformer-t5": lambda: seq2seq_case("t5"),
    "DecoderOnly-alibi-gqa": lambda: gpt_case(positional="alibi", n_kv_heads=2),
    "DecoderOnly-rope": lambda: gpt_case(positional="rope"),
    "EncoderOnly": bert_case,
    "SequenceClassifier": lambda: bert_case(SequenceClassifier),
    "ViT": vit_case,
}


def capture_inputs(modules: list[MultiHeadAttention]) -> list[dict]:
    """Each module's last call: x and its keyword arguments."""
    seen = [{} for _ in modules]
    for module, slot in zip(modules, seen):
        module.register_forward_pre_hook(lambda _, args, kwargs, slot=slot: slot.update(x=args[0], **kwargs),
                                         with_kwargs=True)
    return seen


def math_path_weights(attn: MultiHeadAttention, call: dict) -> torch.Tensor:
    """The public explicit path on the layer's own projections: softmax(q k^T / sqrt(d_k) + bias), masked."""
    q, k, v, offset = attn.project(call["x"], memory=call.get("memory"))
    bias = attn.position.bias(q.shape[2], k.shape[2], offset=offset) if attn.position is not None else None
    _, weights = scaled_dot_product_attention(q, k, v, mask=call.get("mask"), causal=call.get("causal", False),
                                              bias=bias, return_weights=True)
    return weights


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_weights_are_the_math_path_on_the_layers_own_q_k_v(family):
    model, inputs, attention = FAMILIES[family]()
    calls = {kind: capture_inputs(modules) for kind, modules in attention.items()}
    record = AttentionRecord()
    with torch.no_grad():
        model(*inputs, record=record)
        assert set(record.weights) == set(attention)
        for kind, modules in attention.items():
            assert sorted(record.weights[kind]) == list(range(len(modules)))
            for i, attn in enumerate(modules):
                assert torch.equal(record.weights[kind][i], math_path_weights(attn, calls[kind][i])), (kind, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_bit_identical_without_asked_layers_and_close_with_them(family):
    model, inputs, _ = FAMILIES[family]()
    with torch.no_grad():
        plain = model(*inputs)
        nothing = AttentionRecord(layers=False)
        assert torch.equal(model(*inputs, record=nothing), plain) and nothing.weights == {}
        recorded = model(*inputs, record=AttentionRecord())
    if family == "EncoderOnly":  # the fused run skipped the padding (zeros there): compare real tokens
        real = inputs[0] != 0
        recorded, plain = recorded[real], plain[real]
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)


def test_only_the_asked_layers_leave_the_fused_kernel(monkeypatch):
    model, inputs, _ = FAMILIES["Transformer"]()
    math_calls = []
    kernel = qkv.layers.attend

    def spy(*args, weights=False, **kwargs):
        math_calls.append(weights)
        return kernel(*args, weights=weights, **kwargs)

    monkeypatch.setattr(qkv.layers, "attend", spy)
    record = AttentionRecord(layers={"encoder": [-1], "decoder": [0, 2]})
    with torch.no_grad():
        model(*inputs, record=record)
    assert {kind: sorted(w) for kind, w in record.weights.items()} == {"encoder": [1], "decoder": [0, 2],
                                                                      "cross": [0, 2]}
    assert len(math_calls) == 2 + 2 * 3 and sum(math_calls) == 1 + 2 + 2  # 5 of 8 attentions on the math path


def test_cached_decoding_records_each_steps_rows():
    model, (src, tgt), _ = FAMILIES["Transformer"]()
    full = AttentionRecord()
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        model.decode(tgt, memory, src_mask, record=full)
        cache = model.new_cache()
        for t in range(tgt.shape[1]):
            step = AttentionRecord(layers={"decoder": [1]})
            model.decode(tgt[:, t:t + 1], memory, src_mask, cache=cache, record=step)
            torch.testing.assert_close(step.weights["decoder"][1][:, :, 0], full.weights["decoder"][1][:, :, t, :t + 1])
            torch.testing.assert_close(step.weights["cross"][1][:, :, 0], full.weights["cross"][1][:, :, t])
    assert cache.length == tgt.shape[1]


@pytest.mark.parametrize("attention", ["additive", "general", "scaled_dot", "none"])
def test_rnn_records_its_one_attention_as_cross_layer_0(attention):
    model = RNNSeq2Seq(RNNSeq2SeqConfig(src_vocab_size=20, tgt_vocab_size=20, attention=attention, d_embed=8,
                                        d_hidden=16, dropout=0.0)).eval()
    src, tgt = ids(2, 6, padded=True), ids(2, 4)
    record = AttentionRecord()
    with torch.no_grad():
        logits = model(src, tgt, record=record)
        assert torch.equal(logits, model(src, tgt))
    assert list(record.weights) == ["cross"] and list(record.weights["cross"]) == [0]
    weights = record.weights["cross"][0]
    assert weights.shape == (2, 1, 4, 6)
    if attention == "none":
        assert not weights.any()
        return
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        s, _ = model.decoder(model.tgt_embed(tgt), model.initial_state(memory, src_mask))  # the queries s_t
        torch.testing.assert_close(weights[:, 0], model.attend(s, memory, src_mask)[1])


# ---------------------------------------------------------------- layer_groups, Seq2Seq fields, checkpoints

def rnn():
    return RNNSeq2Seq(RNNSeq2SeqConfig(src_vocab_size=20, tgt_vocab_size=20, d_embed=8, d_hidden=16,
                                       n_encoder_layers=2, n_decoder_layers=2, attention="general"))


GROUPED = {  # model, its layers in depth order
    "Transformer": lambda: (transformer("t5"), 5),
    "Transformer-tied-shared": lambda: (Transformer(TransformerConfig(
        src_vocab_size=20, tgt_vocab_size=20, n_encoder_layers=1, n_decoder_layers=2, share_embeddings=True,
        norm_first=True, positional="learned", **TINY)), 3),
    "DecoderOnly": lambda: (DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, n_layers=3, **TINY)), 3),
    "EncoderOnly": lambda: (bert(), 2),
    "SentenceEncoder": lambda: (SentenceEncoder(bert()), 2),
    "SequenceClassifier": lambda: (SequenceClassifier(bert()), 2),
    "ViT": lambda: (vit(), 2),
    "ImageEmbedder": lambda: (ImageEmbedder(vit()), 2),
    "RNNSeq2Seq": lambda: (rnn(), 4),
}


@pytest.mark.parametrize("family", GROUPED)
def test_layer_groups_hold_every_parameter_once_one_group_per_layer(family):
    model, n_layers = GROUPED[family]()
    groups = model.layer_groups()
    assert len(groups) == n_layers + 2
    flat = [id(p) for group in groups for p in group]
    assert len(flat) == len(set(flat)) == len({id(p) for p in model.parameters()})
    assert all(groups[1:-1]), "every layer has parameters of its own"


def test_layer_groups_put_embeddings_first_and_heads_last():
    model = SequenceClassifier(bert())
    groups = model.layer_groups()
    assert any(p is model.encoder.embed.weight for p in groups[0])
    assert any(p is model.head.weight for p in groups[-1])
    assert {id(p) for p in groups[1]} == {id(p) for p in model.encoder.layers[0].parameters()}


@pytest.mark.parametrize("make", [transformer, rnn], ids=["Transformer", "RNNSeq2Seq"])
def test_seq2seq_fields(make):
    model = make()
    assert (model.pad_id, model.bos_id, model.eos_id) == (0, 1, 2)
    assert model.max_target_len is None and model.max_source_len is None
    cache = model.new_cache()
    assert cache.length == 0 and callable(cache.reorder)


def test_learned_positions_cap_the_seq2seq_lengths():
    model = Transformer(TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, positional="learned", max_len=24,
                                          n_encoder_layers=1, n_decoder_layers=1, **TINY))
    assert model.max_target_len == 24 and model.max_source_len == 24


def test_a_stacks_position_scheme_is_one_object_and_round_trips_through_a_checkpoint(tmp_path):
    model = transformer("t5")
    assert all(b.self_attn.position is model.encoder_position for b in model.encoder)
    assert all(b.self_attn.position is model.decoder_position for b in model.decoder)
    assert all(b.cross_attn.position is None for b in model.decoder)
    names = [n for n in unique_state_dict(model) if "position" in n]
    assert names and all(n.startswith(("encoder_position.", "decoder_position.")) for n in names)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_weights(model, tmp_path / "w.safetensors")
    again = transformer("t5")
    load_weights(again, tmp_path / "w.safetensors")
    src, tgt = ids(2, 7, padded=True), ids(2, 5)
    with torch.no_grad():
        assert torch.equal(again(src, tgt), model(src, tgt))
