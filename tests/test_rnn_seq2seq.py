"""The recurrent encoder-decoders: decoding invariants, attention weights, learning, and the CLI."""

import json

import pytest
import torch

from qkv.cli import main
from qkv.decode import beam_search, greedy_decode, sequence_scores
from qkv.errors import ConfigError
from qkv.models.rnn_seq2seq import ATTENTIONS, RNNSeq2Seq, RNNSeq2SeqConfig
from qkv.record import AttentionRecord
from qkv.run import from_mapping
from qkv.studies import synthetic
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus

VARIANTS = [(cell, att, feed) for cell in ("gru", "lstm") for att in ATTENTIONS for feed in (False, True)
            if not (att == "none" and feed)]


def tiny(cell="gru", attention="additive", feed_context=False, **kw) -> RNNSeq2Seq:
    torch.manual_seed(0)
    cfg = RNNSeq2SeqConfig(src_vocab_size=20, tgt_vocab_size=20, cell=cell, attention=attention,
                           feed_context=feed_context, d_embed=16, d_hidden=24, dropout=0.0, **kw)
    return RNNSeq2Seq(cfg).eval()


def sources() -> torch.Tensor:
    src = torch.randint(3, 20, (3, 7), generator=torch.Generator().manual_seed(1))  # (B, S)
    src[0, 4], src[0, 5:] = 2, 0  # short sentence: EOS then padding
    src[1:, 6] = 2
    return src


@pytest.mark.parametrize("cell,attention,feed", VARIANTS)
def test_step_by_step_with_state_equals_teacher_forcing(cell, attention, feed):
    model = tiny(cell, attention, feed, n_decoder_layers=2)
    src = sources()
    tgt = torch.randint(3, 20, (3, 5), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = 1
    full = model(src, tgt)  # (B, T, V)
    memory, src_mask = model.encode(src)
    cache = model.new_cache()
    steps = torch.cat([model.decode(tgt[:, t : t + 1], memory, src_mask, cache=cache) for t in range(5)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell,attention,feed", VARIANTS[::3])
def test_greedy_equals_uncached_and_beam_of_one(cell, attention, feed):
    model = tiny(cell, attention, feed)
    src = sources()
    greedy = greedy_decode(model, src, max_len=9)
    assert greedy == greedy_decode(model, src, max_len=9, use_cache=False)
    assert greedy == beam_search(model, src, beam_size=1, max_len=9)


def test_beam_finds_a_hypothesis_at_least_as_good_as_greedy():
    model = tiny("lstm", "general")
    src = sources()
    greedy = greedy_decode(model, src, max_len=6)
    beam = beam_search(model, src, beam_size=4, max_len=6, length_penalty=0.0)
    g, b = (sequence_scores(model, src, h, length_penalty=0.0) for h in (greedy, beam))
    assert all(sb >= sg - 1e-5 for sb, sg in zip(b, g))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padding_does_not_change_the_output(attention):
    model = tiny("gru", attention)
    src = sources()
    longer = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # (B, S + 4): more padding
    tgt = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 9]])
    torch.testing.assert_close(model(longer, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["additive", "dot", "general", "scaled_dot"])
def test_attention_weights_are_distributions_over_real_tokens(attention):
    model = tiny("gru", attention)
    src = sources()
    memory, src_mask = model.encode(src)
    record = AttentionRecord()
    logits = model.decode(torch.tensor([[1, 4], [1, 5], [1, 6]]), memory, src_mask, record=record)
    assert list(record.weights) == ["cross"] and record.weights["cross"][0].shape == (3, 1, 2, 7)
    weights = record.weights["cross"][0][:, 0]  # one head: (B, T, S)
    assert logits.shape == (3, 2, 20)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2))
    assert float(weights[0, :, 5:].detach().abs().max()) == 0.0  # padding gets no weight


def test_no_attention_uses_one_fixed_context():
    model = tiny("gru", "none")
    memory, src_mask = model.encode(sources())
    record = AttentionRecord()
    model.decode(torch.tensor([[1], [1], [1]]), memory, src_mask, record=record)
    assert float(record.weights["cross"][0].abs().max()) == 0.0
    summary = model.summary(memory, src_mask)  # (B, H): forward state at the last token, backward at the first
    assert torch.equal(summary[0, :12], memory[0, 4, :12]) and torch.equal(summary[0, 12:], memory[0, 0, 12:])


@pytest.mark.parametrize("bad,message", [
    ({"cell": "rnn"}, "cell must be one of"),
    ({"attention": "luong"}, "attention must be one of"),
    ({"d_hidden": 25}, "must be even"),
    ({"share_embeddings": True, "tgt_vocab_size": 30}, "joint vocabulary"),
])
def test_bad_configs_name_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping({"task": "translation-rnn", "model": {"src_vocab_size": 20, "tgt_vocab_size": 20, **bad}},
                     source="x.yaml")


def test_unknown_model_key_is_an_error():
    with pytest.raises(ConfigError, match="x.yaml: model: unknown key 'd_model'"):
        from_mapping({"task": "translation-rnn", "model": {"d_model": 32}}, source="x.yaml")


def test_attention_rnn_learns_reverse_and_beats_no_attention():
    task = synthetic.SyntheticTask("reverse", 10, 3, 10)
    size = {"d_embed": 32, "d_hidden": 64}
    acc = {}
    for kind in ("gru-additive", "gru-none"):
        torch.manual_seed(0)
        model = synthetic.build_model(kind, task.vocab_size, size)
        synthetic.train(model, task, steps=150, batch_size=32, lr=5e-3, seed=0, warmup=20, clip=1.0)
        acc[kind] = synthetic.accuracy_by_length(model, task, [10], n=40, seed=1)[10]["token_accuracy"]
    assert acc["gru-additive"] > 0.85
    assert acc["gru-additive"] > acc["gru-none"] + 0.2


def test_translate_and_evaluate_cli_on_an_rnn_run(tmp_path, capsys):
    data = write_copy_corpus(tmp_path / "data", n_train=300, n_valid=10)
    cfg = tiny_translation_config(data, max_steps=6, save_every=3)
    cfg["task"] = "translation-rnn"
    cfg["model"] = {"cell": "lstm", "attention": "general", "d_embed": 16, "d_hidden": 32, "share_embeddings": True}
    path = write_config(tmp_path / "rnn.yaml", cfg)
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["translate", str(run), "--input", str(data / "val.src"), "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 10
    assert main(["evaluate", str(run), "--src", str(data / "val.src"), "--ref", str(data / "val.tgt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "translation-rnn" and result["sentences"] == 10 and "bleu" in result
