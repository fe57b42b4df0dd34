"""Hugging Face export (qkv.export.hf): transformers loads each folder and computes what qkv computes.

Logits within 1e-4 (fp32) on the same inputs, greedy tokens identical (HF generate, do_sample=False,
num_beams=1), the tokenizer files encode as qkv's tokenizers do; runs without an exact HF
counterpart are refused naming the keys, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qkv
from qkv.cli import main
from qkv.errors import ConfigError
from qkv.export import MARKER
from qkv.export.hf import marian_permutation
from tests.bad_inputs.conftest import TEXT, classification_config, image_config, lm_config
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus

transformers = pytest.importorskip("transformers")

SENTENCES = ["the red dog runs", "a cat sits on the big ball", "the small child"]


def _train(config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder / "config.yaml", config)
    assert main(["train", str(path), "--out", str(folder / "run"), "--quiet", "--threads", "1"]) == 0
    return folder / "run"


def _lm(text: Path, **model) -> dict:
    config = lm_config(text)
    config["model"] = {**config["model"], "n_layers": 2, **model}
    return config


def _configs(root: Path) -> dict[str, dict]:
    data = write_copy_corpus(root / "copy", n_train=40, n_valid=4)
    marian = tiny_translation_config(data, max_steps=3, save_every=3)
    marian["model"] = {**marian["model"], "norm_first": False, "n_encoder_layers": 2, "n_decoder_layers": 2,
                       "dropout": 0.0}
    separate = {**marian, "data": {**marian["data"], "joint_vocab": False},
                "model": {**marian["model"], "share_embeddings": False, "activation": "gelu"}}
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    bpe = _lm(root / "text.txt", positional="rope", norm="rmsnorm", activation="swiglu", bias=False,
              n_heads=4, n_kv_heads=2, tie_embeddings=False)
    bpe["data"] = {**bpe["data"], "tokenizer": "bpe", "vocab_size": 80}
    (root / "cls").mkdir()
    cls = classification_config(root / "cls")
    cls["model"] = {**cls["model"], "pooling": "cls", "n_layers": 2}
    embedding = {**cls, "task": "embedding", "data": {**cls["data"], "samples_per_class": 2},
                 "model": {**cls["model"], "pooling": "mean"}}
    image = image_config(root / "images.npz")
    swish = {**marian, "model": {**marian["model"], "activation": "silu"}}  # opus-mt's activation
    return {"marian": marian, "marian_separate": separate, "marian_silu": swish,
            "gpt2": _lm(root / "text.txt", activation="gelu_tanh"),
            "llama": bpe, "classifier": cls, "embedding": embedding, "vit": image,
            "vit_embedding": {**image, "task": "image_embedding"},
            "rnn": {**marian, "task": "translation-rnn",
                    "model": {"cell": "gru", "d_embed": 16, "d_hidden": 16, "attention": "additive"}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {name: _train(config, root / name) for name, config in _configs(root).items()}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, run_dir in runs.items():
        if name == "rnn":  # refused: test_rnn_translation_is_refused
            continue
        summary = qkv.load(run_dir).export("hf", root / name)
        assert summary["format"] == "hf" and summary["out"] == str(root / name)
        assert CONFIG_FILE in summary["files"] and MARKER not in summary["files"]
        out[name] = root / name
    return out


CONFIG_FILE = "config.json"


def _quiet(cls, folder):
    transformers.logging.set_verbosity_error()
    return cls.from_pretrained(folder).eval()


# -- translation -> Marian -------------------------------------------------------------------------
def test_marian_permutation_maps_the_interleaved_table_onto_marians():
    from qkv.positional import sinusoidal_table

    table = sinusoidal_table(7, 8)
    perm = marian_permutation(8)
    position = torch.arange(7, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, 8, 2) / 8)
    marian = torch.cat([position.sin(), position.cos()], dim=1).float()  # HF's create_weight layout
    torch.testing.assert_close(table[:, perm], marian)


@pytest.mark.parametrize("name", ["marian", "marian_separate", "marian_silu"])
def test_marian_logits_greedy_tokens_and_tokenizer_equal_qkv(runs, exported, name):
    from qkv.decode import greedy_decode

    run = qkv.load(runs[name])
    wanted = {"relu": "relu", "gelu": "gelu", "silu": "swish"}[run.cfg.model.activation]
    assert json.loads((exported[name] / CONFIG_FILE).read_text())["activation_function"] == wanted
    src_tok, tgt_tok = run.artifacts
    hf = _quiet(transformers.MarianMTModel, exported[name])
    tok = transformers.AutoTokenizer.from_pretrained(exported[name])
    ids = [src_tok.encode(s) + [src_tok.eos_id] for s in SENTENCES]
    assert tok(SENTENCES).input_ids == ids
    width = max(map(len, ids))
    src = torch.tensor([i + [run.model.pad_id] * (width - len(i)) for i in ids])  # (B, S), right-padded
    tgt = torch.tensor([[tgt_tok.bos_id] + tgt_tok.encode("the red dog sits")] * len(ids))  # (B, T)
    with torch.no_grad():
        ours = run.model(src, tgt)  # (B, T, V)
        theirs = hf(input_ids=src, attention_mask=src != run.model.pad_id, decoder_input_ids=tgt).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    greedy = greedy_decode(run.model, src, max_len=10)
    with torch.no_grad():
        generated = hf.generate(input_ids=src, attention_mask=src != run.model.pad_id, do_sample=False, num_beams=1,
                                max_new_tokens=10)
    for row, want in zip(generated.tolist(), greedy):
        row = row[1:]  # the decoder start (qkv's BOS)
        got = row[:row.index(run.model.eos_id)] if run.model.eos_id in row else row
        assert got == want
    if name == "marian_separate":
        target = transformers.AutoTokenizer.from_pretrained(exported[name] / "target_tokenizer")
        assert target("the red dog", add_special_tokens=False).input_ids == tgt_tok.encode("the red dog")


def test_pre_norm_translation_is_refused_naming_the_keys(runs, tmp_path):
    run = qkv.load(runs["marian"])
    from dataclasses import replace

    from qkv.models.transformer import Transformer

    run.model = Transformer(replace(run.model.cfg, norm_first=True, norm="rmsnorm", positional="rope"))
    with pytest.raises(ConfigError, match=r"model.norm_first=True, model.norm=rmsnorm, model.positional=rope "
                                          r"has no Marian counterpart: .*paper-base.yaml"):
        run.export("hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rnn_translation_is_refused(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"task 'translation-rnn' \(RNNSeq2Seq\) has no Marian counterpart"):
        qkv.load(runs["rnn"]).export("hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- language models -> GPT-2 / Llama --------------------------------------------------------------
@pytest.mark.parametrize("name, architecture", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_lm_logits_greedy_tokens_and_tokenizer_equal_qkv(runs, exported, name, architecture):
    run = qkv.load(runs[name])
    assert json.loads((exported[name] / CONFIG_FILE).read_text())["architectures"] == [architecture]
    hf = _quiet(transformers.AutoModelForCausalLM, exported[name])
    assert type(hf).__name__ == architecture
    tok = transformers.AutoTokenizer.from_pretrained(exported[name])
    prompt = "KING:\nTo"  # 8 new tokens stay inside block_size=16
    ids = run.artifacts.encode(prompt)
    assert tok(prompt).input_ids == ids and tok.decode(ids) == prompt
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model(x), atol=1e-4, rtol=0)
        generated = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                max_new_tokens=8)[0, len(ids):].tolist()
    ours = run.generate([prompt], max_new_tokens=8, temperature=0)[0]
    assert prompt + run.artifacts.decode(generated) == ours


def test_lm_without_a_counterpart_is_refused(runs, tmp_path):
    from dataclasses import replace

    from qkv.models.decoder_only import DecoderOnly

    run = qkv.load(runs["gpt2"])
    for changes, pattern in [({"norm": "rmsnorm", "bias": False}, r"model.norm=rmsnorm, model.bias=False has no "
                                                                  r"GPT-2 counterpart"),
                             ({"positional": "alibi"}, r"model.positional=alibi has no Hugging Face counterpart"),
                             ({"positional": "rope", "activation": "gelu", "norm": "rmsnorm"},
                              r"model.activation=gelu has no Llama counterpart: Llama needs .*swiglu")]:
        run.model = DecoderOnly(replace(run.cfg.model, **changes))
        with pytest.raises(ConfigError, match=pattern):
            run.export("hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- text encoders -> BERT ---------------------------------------------------------------------------
def test_classifier_exports_as_bert_for_sequence_classification(runs, exported):
    run = qkv.load(runs["classifier"])
    hf = _quiet(transformers.AutoModelForSequenceClassification, exported["classifier"])
    assert type(hf).__name__ == "BertForSequenceClassification"
    assert [hf.config.id2label[i] for i in range(2)] == run.artifacts.label_names
    tok = transformers.AutoTokenizer.from_pretrained(exported["classifier"])
    texts = ["good film number 3", "bad film", "a " * 40]
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    ids = run.artifacts.tokenizer.encode_batch(texts)
    assert [row[:len(i)] for row, i in zip(batch.input_ids.tolist(), ids)] == ids
    with torch.no_grad():
        ours = run.model(batch.input_ids, mask=batch.attention_mask.bool())  # (B, C)
        theirs = hf(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    probs = [p for _, p in run.classify(texts)]
    np.testing.assert_allclose(theirs.softmax(-1).max(-1).values.numpy(), probs, atol=1e-5)


def test_mean_pooled_classifier_is_refused(runs, tmp_path):
    run = qkv.load(runs["classifier"])
    run.model.pooling = "mean"
    with pytest.raises(ConfigError, match=r"model.pooling=mean has no BertForSequenceClassification counterpart"):
        run.export("hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embedding_run_loads_in_sentence_transformers(runs, exported):
    st = pytest.importorskip("sentence_transformers")
    run = qkv.load(runs["embedding"])
    model = st.SentenceTransformer(str(exported["embedding"]), device="cpu")
    texts = ["good film number 3", "bad film", "a " * 40]
    np.testing.assert_allclose(model.encode(texts), run.embed(texts), atol=1e-5, rtol=0)


# -- ViT -----------------------------------------------------------------------------------------------
def test_vit_classifier_and_embedder_equal_qkv(runs, exported):
    images = torch.randn(3, 1, 8, 8)
    run = qkv.load(runs["vit"])
    hf = _quiet(transformers.ViTForImageClassification, exported["vit"])
    assert [hf.config.id2label[i] for i in range(2)] == run.artifacts.label_names
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images).logits, run.model(images), atol=1e-4, rtol=0)
    run = qkv.load(runs["vit_embedding"])
    hf = _quiet(transformers.ViTModel, exported["vit_embedding"])
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(hf(pixel_values=images).last_hidden_state[:, 0], dim=-1)
        torch.testing.assert_close(theirs, run.model(images), atol=1e-5, rtol=0)


# -- the folder rule and the CLI ------------------------------------------------------------------------
def test_export_refuses_a_foreign_folder_and_reuses_its_own(runs, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    run = qkv.load(runs["gpt2"])
    with pytest.raises(ConfigError, match=r"--out .*mine: the folder is not empty and was not made by qkv export"):
        run.export("hf", foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match=r"cannot export to 'nope' \(it can: "):
        run.export("nope", tmp_path / "x")
    capsys.readouterr()
    assert main(["export", str(runs["gpt2"]), "--format", "hf", "--out", str(tmp_path / "cli")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["export", str(runs["gpt2"]), "--format", "hf", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first
    assert first["architecture"] == "GPT2LMHeadModel" and "model.safetensors" in first["files"]
