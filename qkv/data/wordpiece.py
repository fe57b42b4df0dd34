"""BERT's WordPiece tokenizer: a thin wrapper over an HF ``tokenizers.Tokenizer`` (tokenizer.json).

BERT-family vocabularies put their specials where the original vocab.txt had them ([PAD]=0,
[UNK]=100, [CLS]=101, [SEP]=102 for bert-base-uncased and MiniLM), so they do not fit
``TextTokenizer``'s fixed ids 0..3; this wrapper looks the specials up by name instead.

The tokenizer's post-processor wraps text as ``[CLS] A [SEP]`` and a pair as
``[CLS] A [SEP] B [SEP]``, with segment (token type) ids 0 for the first part and 1 for B.

Truncation: every encoding, specials included, has at most ``max_length`` tokens (the model's
position table, 512 for BERT). Longer text loses tokens from its end; for a pair, tokens are
removed one at a time from the end of whichever text is longer ("longest first", HF's default).
The tokenizer.json's own padding is switched off (``collate`` pads to the longest in the batch)
and its truncation is replaced by ``max_length``, which ``save`` writes back into the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qkv.data.batching import pad_sequences
from qkv.errors import DataError
from qkv.fileio import atomic_write_text

SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]"}
MIN_LENGTH = 3  # [CLS] [SEP] [SEP]: the shortest pair encoding


class WordPieceBatch(NamedTuple):
    """Right-padded model inputs: ids (B, T) long, segment_ids (B, T) long, mask (B, T) bool (True = token)."""

    ids: torch.Tensor
    segment_ids: torch.Tensor
    mask: torch.Tensor


class WordPieceTokenizer:
    """A WordPiece ``tokenizers.Tokenizer`` with BERT's specials and post-processor."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int = 512) -> None:
        if not isinstance(max_length, int) or max_length < MIN_LENGTH:
            raise DataError(f"max_length must be an int >= {MIN_LENGTH} ([CLS] A [SEP] B [SEP]), got {max_length!r}")
        if not isinstance(tokenizer.model, models.WordPiece):
            raise DataError(f"tokenizer: model must be WordPiece, got {type(tokenizer.model).__name__}")
        ids = {}
        for role, token in SPECIALS.items():
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise DataError(f"tokenizer: the vocabulary has no {token} token")
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a private copy: padding/truncation change below
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        probe = tokenizer.encode("a").ids
        if probe[:1] != [ids["cls"]] or probe[-1:] != [ids["sep"]]:
            raise DataError("tokenizer: its post-processor must wrap text as [CLS] ... [SEP]")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = ids["pad"], ids["unk"], ids["cls"], ids["sep"]
        self.mask_id = tokenizer.token_to_id("[MASK]")

    @classmethod
    def from_vocab(cls, vocab: Sequence[str], *, lowercase: bool = True, max_length: int = 512) -> WordPieceTokenizer:
        """BERT's tokenizer for a vocab.txt-style token list (id = position), as HF's BertTokenizerFast builds it."""
        tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=SPECIALS["unk"]))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        present = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
        tokenizer.add_special_tokens(present)
        cls_, sep = SPECIALS["cls"], SPECIALS["sep"]
        if cls_ in vocab and sep in vocab:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{cls_}:0 $A:0 {sep}:0", pair=f"{cls_}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                special_tokens=[(cls_, vocab.index(cls_)), (sep, vocab.index(sep))])
        return cls(tokenizer, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, pair: str | None = None) -> list[int]:
        """[CLS] text [SEP] (or [CLS] text [SEP] pair [SEP]), truncated to ``max_length`` tokens."""
        return self._check(self.tokenizer.encode(text, pair).ids)

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[list[int]]:
        """``encode`` for many texts (and as many ``pairs``), tokenized in parallel by the Rust library."""
        return [self._check(e.ids) for e in self._encodings(texts, pairs)]

    def collate(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> WordPieceBatch:
        """Encode and right-pad a batch into model inputs, with segment ids 0 for text and 1 for pair."""
        if len(texts) == 0:
            raise DataError("texts: empty batch")
        encodings = self._encodings(texts, pairs)
        ids = pad_sequences([self._check(e.ids) for e in encodings], self.pad_id)  # (B, T)
        segment_ids = pad_sequences([e.type_ids for e in encodings], 0)  # (B, T)
        lengths = torch.tensor([len(e.ids) for e in encodings])  # (B,)
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, T)
        return WordPieceBatch(ids, segment_ids, mask)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D tensor); [CLS], [SEP], [PAD] are dropped unless ``skip_special=False``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise DataError(f"ids: {i} is outside the vocabulary (size {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json (HF format, with truncation at ``max_length`` and no padding) atomically."""
        atomic_write_text(path, self.tokenizer.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_length: int | None = None) -> WordPieceTokenizer:
        """Read a tokenizer.json; ``max_length`` defaults to the file's truncation length, else 512."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            obj = json.loads(text)
        except FileNotFoundError:
            raise DataError(f"{path}: no such tokenizer file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a readable tokenizer JSON file: {e}") from None
        if not isinstance(obj, dict) or "model" not in obj:
            raise DataError(f"{path}: not a tokenizers JSON file (no 'model' key)")
        if max_length is None:
            max_length = (obj.get("truncation") or {}).get("max_length", 512)
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception
            raise DataError(f"{path}: not a valid tokenizers JSON file: {e}") from None
        try:
            return cls(tokenizer, max_length=max_length)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def _encodings(self, texts: Sequence[str], pairs: Sequence[str] | None):
        texts = list(texts)
        if pairs is None:
            return self.tokenizer.encode_batch(texts)
        pairs = list(pairs)
        if len(pairs) != len(texts):
            raise DataError(f"pairs: {len(pairs)} second texts for {len(texts)} first texts")
        return self.tokenizer.encode_batch(list(zip(texts, pairs)))

    def _check(self, ids: list[int]) -> list[int]:
        if len(ids) > self.max_length:  # tokenizers silently skips a cut that its specials make impossible
            raise DataError(f"tokenizer: could not truncate to max_length={self.max_length} ({len(ids)} tokens); "
                            "does its post-processor add more than [CLS] A [SEP] B [SEP]?")
        return ids

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"
