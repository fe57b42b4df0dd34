"""Tokenizers: BPE over HF tokenizers, and the character vocabulary (qkv.data.tokenizer)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from qkv.data.text import read_lines
from qkv.data.tokenizer import (
    CharTokenizer,
    TextTokenizer,
    load_tokenizer,
    train_bpe,
    train_translation_tokenizers,
)
from qkv.errors import DataError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MULTI30K = DATA / "multi30k"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"

EN = [
    "Two young, White males are outside near many bushes.",
    "Several men in hard hats are operating a giant pulley system.",
    "A little girl climbing into a wooden playhouse.",
    "A man in a blue shirt is standing on a ladder cleaning windows.",
    "Two men are at the stove preparing food.",
    "A man in green holds a guitar while the other man observes his shirt.",
    "A man is smiling at a stuffed lion",
    "A trendy girl talking on her cellphone while gliding slowly down the street.",
    "A woman with a large purse is walking by a gate.",
    "Boys dancing on poles in the middle of the night.",
    "\"It's 5 o'clock!\" - she said (quietly); 3.5 km/h?",
]
DE = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Ein Mann in einem blauen Hemd steht auf einer Leiter und putzt Fenster.",
    "Zwei Männer stehen am Herd und bereiten Essen zu.",
    "Ein Mann in grün hält eine Gitarre, während der andere Mann sein Hemd ansieht.",
    "Ein Mann lächelt einen ausgestopften Löwen an.",
    "Ein schickes Mädchen spricht mit dem Handy während sie langsam die Straße entlangschwebt.",
    "Eine Frau mit einer großen Geldbörse geht an einem Tor vorbei.",
    "Jungen tanzen mitten in der Nacht auf Pfosten.",
    "„Es ist 5 Uhr!“ – sagte sie (leise); 3,5 km/h?",
]
PAIRS = list(zip(EN, DE))
TEXTS = [s for pair in PAIRS for s in pair]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_bpe(TEXTS, 300, min_frequency=1)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert 4 < tok.vocab_size <= 300


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(i > 3 for i in ids)  # no unk: every character was seen in training
    assert tok.decode(ids) == text


def test_bos_eos_and_decode_stops_at_eos(tok):
    text = "Ein Mann lächelt."
    plain = tok.encode(text)
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *plain, 2]
    assert tok.decode([1, *plain, 2, *tok.encode("Zwei Männer"), 0, 0]) == text
    assert tok.decode(torch.tensor([1, *plain, 0, 0])) == text


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(TEXTS[:5], add_eos=True) == [tok.encode(t, add_eos=True) for t in TEXTS[:5]]
    assert tok.decode_batch(tok.encode_batch(TEXTS[:5])) == TEXTS[:5]


def test_nfc_normalisation(tok):
    nfd = unicodedata.normalize("NFD", "Männer Mädchen Büsche")
    assert nfd != "Männer Mädchen Büsche"
    assert tok.decode(tok.encode(nfd)) == "Männer Mädchen Büsche"


def test_unseen_character_becomes_unk_and_is_dropped(tok):
    ids = tok.encode("Ein Hund 🐕")
    assert tok.unk_id in ids
    assert tok.decode(ids).startswith("Ein Hund")


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(DataError, match=f"ids: {tok.vocab_size} is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])


def test_training_is_deterministic():
    assert train_bpe(TEXTS, 200).tokenizer.to_str() == train_bpe(TEXTS, 200).tokenizer.to_str()


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left
    loaded = TextTokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert isinstance(load_tokenizer(path), TextTokenizer)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, r"missing\.json: no such tokenizer file"),
        ('{\n  "model": \n', r"bad\.json:3: not a tokenizer JSON file"),
        ('{"vocab": {}}', r"bad\.json: not a tokenizers JSON file \(no 'model' key\)"),
        ('{"model": 7}', r"bad\.json: not a valid tokenizers JSON file"),
        ('{"type": "qkv.CharTokenizer", "specials": ["<pad>", "<s>", "</s>"], "chars": ["a"]}', r"CharTokenizer"),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, expected):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=expected):
        TextTokenizer.load(path)


def test_load_rejects_a_tokenizer_without_our_specials(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "other.json"
    path.write_text(Tokenizer(models.BPE()).to_str())
    with pytest.raises(DataError, match=r"other\.json: tokenizer: id 0 must be the special pad token"):
        TextTokenizer.load(path)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"vocab_size": 4}, "vocab_size=4 must exceed"),
        ({"min_frequency": 0}, "min_frequency=0"),
        ({"special_tokens": ("<pad>", "<s>", "</s>")}, "special_tokens="),
        ({"texts": []}, "texts: nothing to train"),
    ],
)
def test_train_bpe_argument_errors(kwargs, expected):
    args = {"texts": TEXTS, "vocab_size": 100, **kwargs}
    with pytest.raises(DataError, match=expected):
        train_bpe(**args)


def test_extra_special_tokens_follow_the_fixed_four():
    tok = train_bpe(TEXTS, 100, special_tokens=("<pad>", "<s>", "</s>", "<unk>", "<mask>"))
    assert tok.token_to_id("<mask>") == 4


def test_translation_tokenizers_joint_or_separate():
    src, tgt = train_translation_tokenizers(PAIRS, 200, True, min_frequency=1)
    assert src is tgt
    src, tgt = train_translation_tokenizers(PAIRS, 200, False, min_frequency=1)
    assert src is not tgt
    assert src.decode(src.encode(PAIRS[4][0])) == PAIRS[4][0]
    assert tgt.decode(tgt.encode(PAIRS[4][1])) == PAIRS[4][1]
    assert src.token_to_id("ß") is None and tgt.token_to_id("ß") is not None


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k is absent")
def test_multi30k_joint_bpe_round_trips_validation():
    en, de = read_lines(MULTI30K / "train.en")[:6000], read_lines(MULTI30K / "train.de")[:6000]
    src, tgt = train_translation_tokenizers(zip(en, de), 4000, True)
    seen = set("".join(en + de))
    for name in ("val.en", "val.de"):
        lines = [s for s in read_lines(MULTI30K / name) if set(s) <= seen and s == s.strip() and "  " not in s]
        assert len(lines) > 950
        assert tgt.decode_batch(tgt.encode_batch(lines)) == lines
    mean_len = sum(map(len, src.encode_batch(de[:500]))) / 500
    assert mean_len < 25  # subwords, not characters


# --- characters ----------------------------------------------------------------------------


def test_char_tokenizer_vocabulary_is_sorted_and_round_trips():
    text = "hello, world!\nÄpfel"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == tuple(sorted(set(text)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, None)
    assert tok.vocab_size == 3 + len(set(text))
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and min(ids[1:-1]) >= 3
    assert tok.decode(ids + [5, 6]) == text
    assert tok.encode_batch(["he", "lo"]) == [tok.encode("he"), tok.encode("lo")]
    assert CharTokenizer.from_text(["ab", "ba"]).chars == ("a", "b")


def test_char_tokenizer_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"text: 2 characters not in the vocabulary: 'x' \(U\+0078\), 'é' .*index 1"):
        tok.encode("axbéx")
    skipping = CharTokenizer.from_text("abc", unknown="skip")
    assert skipping.decode(skipping.encode("axbéx")) == "ab"
    with pytest.raises(DataError, match="unknown='drop'"):
        CharTokenizer("abc", unknown="drop")


def test_char_tokenizer_save_load(tmp_path):
    tok = CharTokenizer.from_text("the quick brown fox\n", unknown="skip")
    path = tmp_path / "chars.json"
    tok.save(path)
    loaded = CharTokenizer.load(path)
    assert loaded.chars == tok.chars and loaded.unknown == "skip"
    assert isinstance(load_tokenizer(path), CharTokenizer)
    assert json.loads(path.read_text())["type"] == "qkv.CharTokenizer"
    with pytest.raises(DataError, match=r"nothere\.json: no such tokenizer file"):
        CharTokenizer.load(tmp_path / "nothere.json")
    tok_path = tmp_path / "bpe.json"
    train_bpe(TEXTS, 100).save(tok_path)
    with pytest.raises(DataError, match=r"bpe\.json: not a CharTokenizer file"):
        CharTokenizer.load(tok_path)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare is absent")
def test_char_tokenizer_on_tinyshakespeare():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 3 + 65
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_other_than_0_to_3_round_trip_through_a_sidecar(tmp_path):
    from tokenizers import Tokenizer, models

    from qkv.data.tokenizer import specials_path

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None))
    tok.add_special_tokens(["<|endoftext|>"])
    ours = TextTokenizer(tok, pad_id=2, bos_id=2, eos_id=2, unk_id=None)
    ours.save(tmp_path / "tokenizer.json")
    assert specials_path(tmp_path / "tokenizer.json") == tmp_path / "tokenizer.specials.json"
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert again.special_ids == {"pad": 2, "bos": 2, "eos": 2, "unk": None}
    assert again.decode([0, 1, 2, 0]) == again.tokenizer.decode([0, 1], skip_special_tokens=True)  # stops at eos
    with pytest.raises(DataError, match=r"id 1 must be the special eos token \(eos_id\), got 'b'"):
        TextTokenizer(tok, pad_id=2, bos_id=2, eos_id=1, unk_id=None)
    default = train_bpe(["a b c a b c"] * 5, 30)
    default.save(tmp_path / "bpe.json")
    assert not (tmp_path / "bpe.specials.json").exists()  # ids 0..3: the file set is what it always was
