"""Property tests (issue 11) with Hypothesis: tokenizers round-trip and never crash on any Unicode,
ids stay in range; readers never crash on arbitrary bytes (they return or raise DataError);
masks and attention stay finite for any lengths."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.attention import scaled_dot_product_attention
from qkv.data.classification import read_labelled
from qkv.data.parallel import read_parallel
from qkv.data.text import parse_lines
from qkv.data.tokenizer import CharTokenizer, train_bpe
from qkv.errors import DataError
from qkv.masks import causal_mask, combine_masks, lengths_mask

EXAMPLES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CORPUS = ["the red dog runs", "a small cat sits on the big ball", "Ünïcödé, 水, emoji \U0001f600 and tabs\there"]


@pytest.fixture(scope="module")
def byte_bpe():
    return train_bpe(CORPUS * 3, 300, min_frequency=1, byte_level=True)


@pytest.fixture(scope="module")
def metaspace_bpe():
    return train_bpe(CORPUS * 3, 120, min_frequency=1)


@EXAMPLES
@given(text=st.text())
def test_byte_level_bpe_round_trips_any_unicode(byte_bpe, text):
    ids = byte_bpe.encode(text)
    assert all(0 <= i < byte_bpe.vocab_size for i in ids)
    assert byte_bpe.decode(ids) == text


@EXAMPLES
@given(text=st.text())
def test_metaspace_bpe_never_crashes_and_ids_stay_in_range(metaspace_bpe, text):
    ids = metaspace_bpe.encode(text)
    assert all(0 <= i < metaspace_bpe.vocab_size for i in ids)
    assert isinstance(metaspace_bpe.decode(ids), str)


@EXAMPLES
@given(text=st.text(alphabet="the red dog runs ", max_size=60))
def test_metaspace_bpe_round_trips_text_from_its_alphabet(metaspace_bpe, text):
    """Metaspace BPE keeps the words; runs of spaces may come back as one."""
    assert metaspace_bpe.decode(metaspace_bpe.encode(text)).split() == text.split()


@EXAMPLES
@given(vocab=st.text(min_size=1, max_size=40), text=st.text(max_size=80))
def test_char_tokenizer_round_trips_or_names_unknown_characters(vocab, text):
    tok = CharTokenizer.from_text(vocab)
    if set(text) <= set(vocab):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    else:
        with pytest.raises(DataError, match="not in the vocabulary"):
            tok.encode(text)
        assert set(tok.decode(CharTokenizer.from_text(vocab, unknown="skip").encode(text))) <= set(vocab)


@EXAMPLES
@given(data=st.binary(max_size=300))
def test_line_reader_never_crashes_on_bytes(data):
    try:
        lines = parse_lines(data, name="f.txt", allow_empty=True)
    except DataError as err:
        assert str(err).startswith("f.txt")
    else:
        assert all("\n" not in line for line in lines)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@EXAMPLES
@given(data=st.binary(max_size=200), tsv=st.booleans())
def test_labelled_reader_never_crashes_on_bytes(data, tsv):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "d.tsv" if tsv else "d.csv", data)
        try:
            texts = read_labelled(path)
        except DataError as err:
            assert str(path) in str(err)
        else:
            assert len(texts.labels) == len(texts.texts)


@EXAMPLES
@given(src=st.binary(max_size=120), tgt=st.binary(max_size=120))
def test_parallel_reader_never_crashes_on_bytes(src, tgt):
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _write(Path(tmp), "x.src", src), _write(Path(tmp), "x.tgt", tgt)
        try:
            corpus = read_parallel(a, b)
        except DataError:
            pass
        else:
            assert len(corpus.src) == len(corpus.tgt)


@EXAMPLES
@given(T=st.integers(1, 12), S=st.integers(1, 12), B=st.integers(1, 3), causal=st.booleans(),
       lengths=st.lists(st.integers(0, 12), min_size=3, max_size=3), fused=st.booleans())
def test_attention_is_finite_for_any_lengths_and_masks(T, S, B, causal, lengths, fused):
    """Any mix of padding (even all keys masked) and causal masking: finite outputs and gradients."""
    q = torch.randn(B, 2, T, 8, requires_grad=True)
    k, v = torch.randn(B, 2, S, 8), torch.randn(B, 2, S, 8)
    keys = lengths_mask(torch.tensor([min(n, S) for n in lengths[:B]]), S)  # (B, 1, 1, S)
    mask = combine_masks(keys, causal_mask(T, S) if causal else None)
    out = scaled_dot_product_attention(q, k, v, mask=mask) if fused else \
        scaled_dot_product_attention(q, k, v, mask=mask, return_weights=True)[0]
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
