"""qkv.attention_maps: one API for every family's weights; asking changes no output, other layers stay fused."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import qkv.attention
from qkv.attention_maps import AttentionGroup, AttentionSet, collect, token_labels
from qkv.data.tokenizer import CharTokenizer
from qkv.data.wordpiece import WordPieceTokenizer
from qkv.layers import MultiHeadAttention
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SentenceEncoder, SequenceClassifier
from qkv.models.rnn_seq2seq import RNNSeq2Seq, RNNSeq2SeqConfig
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.models.vit import ImageEmbedder, ViT, ViTConfig
from qkv.record import AttentionRecord

TINY = {"d_model": 32, "n_heads": 4, "dropout": 0.0}


def transformer():
    cfg = TransformerConfig(src_vocab_size=40, tgt_vocab_size=40, d_ff=64, n_encoder_layers=3, n_decoder_layers=3,
                            **TINY)
    return Transformer(cfg).eval(), (torch.randint(3, 40, (2, 7)), torch.randint(3, 40, (2, 5)))


def gpt():
    return DecoderOnly(DecoderOnlyConfig(vocab_size=40, block_size=16, n_layers=3, **TINY)).eval(), \
        (torch.randint(3, 40, (2, 9)),)


def bert(wrapper=None):
    encoder = EncoderOnly(EncoderOnlyConfig(vocab_size=40, max_len=16, d_ff=64, n_layers=3, n_classes=3,
                                            attn_dropout=0.0, **TINY))
    ids = torch.randint(3, 40, (3, 10))
    ids[1, 4:] = 0  # padding: the fused path then runs on the real tokens only
    ids[2, 7:] = 0
    return (wrapper(encoder) if wrapper else encoder).eval(), (ids,)


def vit(wrapper=None):
    model = ViT(ViTConfig(image_size=8, channels=1, patch_size=4, d_ff=64, n_layers=3, n_classes=2, **TINY))
    return (wrapper(model) if wrapper else model).eval(), (torch.randn(2, 1, 8, 8),)


FAMILIES = {"transformer": transformer, "gpt": gpt, "bert": bert, "classifier": lambda: bert(SequenceClassifier),
            "sentence": lambda: bert(SentenceEncoder), "vit": vit, "image-embedder": lambda: vit(ImageEmbedder)}
KINDS = {"transformer": {"encoder", "decoder", "cross"}, "gpt": {"decoder"}}


def plain(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weights_change_no_output(family):
    model, inputs = FAMILIES[family]()
    expected = plain(model, inputs)
    real = inputs[0] != 0 if family == "bert" else ...  # hidden states at padding are unspecified
    for layers in (True, [1], [0, 2], False):
        outputs, weights = collect(model, *inputs, layers=layers)
        torch.testing.assert_close(outputs[real], expected[real], atol=1e-5, rtol=1e-5)
        wanted = {0, 1, 2} if layers is True else set(layers or [])
        assert set(weights) == (KINDS.get(family, {"encoder"}) if wanted else set())
        for per_layer in weights.values():
            assert set(per_layer) == wanted
            for w in per_layer.values():
                assert w.dim() == 4 and w.shape[1] == 4  # (B, H, T, S)
                torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # rows are distributions


def test_weights_are_those_of_the_math_path():
    """The weights returned reproduce the layer: softmax(q k^T / sqrt(d_k)) recomputed from the projections."""
    model, (ids,) = gpt()
    seen = {}
    block = model.layers[1]
    block.self_attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0]), with_kwargs=True)
    _, weights = collect(model, ids, layers=[1])
    q, k, _ = block.self_attn.qkv_proj(seen["x"]).split(32, dim=-1)
    q, k = q.view(2, 9, 4, 8).transpose(1, 2), k.view(2, 9, 4, 8).transpose(1, 2)  # (B, H, T, Dh)
    scores = (q @ k.transpose(-2, -1)) / 8 ** 0.5  # (B, H, T, T)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(weights["decoder"][1], scores.softmax(-1))


class PathSpy:
    """Counts, per attention module, calls of the fused kernel and of the explicit math path."""

    def __init__(self, model, monkeypatch):
        self.counts: Counter = Counter()
        self.current = None
        fused, math = torch.nn.functional.scaled_dot_product_attention, qkv.attention.attention_from_scores

        def fused_spy(*args, **kwargs):
            self.counts[(self.current, "fused")] += 1
            return fused(*args, **kwargs)

        def math_spy(*args, **kwargs):
            self.counts[(self.current, "math")] += 1
            return math(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fused_spy)
        monkeypatch.setattr(qkv.attention, "attention_from_scores", math_spy)
        for name, module in model.named_modules():
            if isinstance(module, MultiHeadAttention):
                module.register_forward_pre_hook(lambda m, args, name=name: setattr(self, "current", name))

    def paths(self) -> dict[str, str]:
        return {name: "+".join(sorted(path for (n, path) in self.counts if n == name)) for name, _ in self.counts}


def test_only_the_layers_asked_leave_the_fused_kernel(monkeypatch):
    model, inputs = transformer()
    spy = PathSpy(model, monkeypatch)
    collect(model, *inputs, layers={"encoder": [2], "decoder": [0]})
    paths = spy.paths()
    assert paths == {
        "encoder.0.self_attn": "fused", "encoder.1.self_attn": "fused", "encoder.2.self_attn": "math",
        "decoder.0.self_attn": "math", "decoder.0.cross_attn": "math",
        "decoder.1.self_attn": "fused", "decoder.1.cross_attn": "fused",
        "decoder.2.self_attn": "fused", "decoder.2.cross_attn": "fused",
    }
    assert all(n == 1 for n in spy.counts.values())  # one call per layer: nothing is computed twice


@pytest.mark.parametrize("family", ["gpt", "classifier", "vit"])
def test_other_families_keep_fused_layers(family, monkeypatch):
    model, inputs = FAMILIES[family]()
    spy = PathSpy(model, monkeypatch)
    collect(model, *inputs, layers=[1])
    paths = spy.paths()
    assert len(paths) == 3
    assert [p for n, p in sorted(paths.items())] == ["fused", "math", "fused"]


def test_encoder_only_keeps_its_unpadded_fast_path_when_not_asked(monkeypatch):
    model, (ids,) = bert(SequenceClassifier)
    calls = Counter()
    original = MultiHeadAttention.forward

    def spy(self, *args, **kwargs):
        calls["unpadded" if kwargs.get("unpadded") is not None else "padded"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "forward", spy)
    expected = plain(model, (ids,))
    assert calls == {"unpadded": 3}  # every layer skipped the padding
    outputs, weights = collect(model, ids, layers=[0])
    assert calls == {"unpadded": 3, "padded": 3}  # asking for weights uses the padded layout, for every layer
    torch.testing.assert_close(outputs, expected, atol=1e-5, rtol=1e-5)
    assert weights["encoder"][0][1, :, :, 4:].abs().max() == 0  # padding gets no weight


def test_rnn_attention_is_reported_as_one_head_cross_attention():
    cfg = RNNSeq2SeqConfig(src_vocab_size=30, tgt_vocab_size=30)
    model = RNNSeq2Seq(cfg).eval()
    src, tgt = torch.randint(3, 30, (2, 6)), torch.randint(3, 30, (2, 4))
    outputs, weights = collect(model, src, tgt)
    torch.testing.assert_close(outputs, plain(model, (src, tgt)))
    assert set(weights) == {"cross"} and weights["cross"][0].shape == (2, 1, 4, 6)
    assert collect(model, src, tgt, layers=False).weights == {}


def test_transformer_forward_records_weights_per_stack():
    model, (src, tgt) = transformer()
    record = AttentionRecord({"decoder": [2]})
    with torch.no_grad():
        logits = model(src, tgt, record=record)
    torch.testing.assert_close(logits, plain(model, (src, tgt)))  # the return type and value do not change
    assert set(record.weights) == {"decoder", "cross"} and set(record.weights["decoder"]) == {2}
    record = AttentionRecord(True)
    with torch.no_grad():
        model(src, tgt, record=record)
    assert {kind: set(w) for kind, w in record.weights.items()} == {k: {0, 1, 2} for k in ("encoder", "decoder",
                                                                                            "cross")}


def test_bad_layers_are_named():
    model, inputs = gpt()
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        collect(model, *inputs, layers=[7])
    with pytest.raises(TypeError, match="does not know"):
        collect(torch.nn.Linear(2, 2), torch.zeros(1, 2))


def test_token_labels_for_every_tokenizer():
    chars = CharTokenizer("ab \n")
    assert token_labels(chars, [chars.bos_id, *chars.encode("a b\n")]) == ["<bos>", "a", " ", "b", "\n"]
    wp = WordPieceTokenizer.from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "##ing", "a"])
    ids = wp.encode_batch(["a playing"])[0]
    assert token_labels(wp, ids) == ["[CLS]", "a", "play", "##ing", "[SEP]"]


def test_attention_set_picks_the_alignment_by_default():
    w = {0: torch.full((1, 2, 3), 1 / 3)}
    groups = [AttentionGroup("encoder", list("abc"), list("abc"), {0: torch.eye(3)[None]}),
              AttentionGroup("cross", ["x", "y"], list("abc"), w)]
    aset = AttentionSet("t", groups)
    assert aset.group().kind == "cross" and aset.group("encoder").n_heads == 1
    with pytest.raises(Exception, match="no 'decoder' attention"):
        aset.group("decoder")
