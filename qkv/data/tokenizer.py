"""Tokenizers: subword BPE (a thin wrapper over HF ``tokenizers``) and a character vocabulary.

Both share one interface: ``encode(text, *, add_bos, add_eos)``, ``encode_batch``,
``decode(ids)`` (stops at eos, skips specials), ``vocab_size``, ``pad_id/bos_id/eos_id/unk_id``,
``save(path)`` and ``load(path)``. Special ids: pad=0, bos=1, eos=2 (and unk=3 for BPE) unless a
TextTokenizer is given others (an imported GPT-2 or opus-mt vocabulary: see ``TextTokenizer``).

BPE follows the paper's setup (sec. 5.1: byte-pair encoding, a shared source-target vocabulary
for English-German): NFC normalisation, a Metaspace pre-tokenizer that turns spaces into ``▁``
and a Metaspace decoder that turns them back, so ``decode(encode(text)) == text`` for normal
text (single spaces, no leading or trailing whitespace, characters seen in training).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qkv.data.text import atomic_write_text
from qkv.errors import DataError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
"""pad, bos, eos, unk: their ids are their positions, 0..3. Extra specials may follow."""
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAR_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
_CHAR_FORMAT = "qkv.CharTokenizer"


ROLES = ("pad", "bos", "eos", "unk")
_SPECIALS_FORMAT = "qkv.TokenizerSpecials"


def specials_path(path: str | os.PathLike) -> Path:
    """Where a TextTokenizer file's special-id sidecar lives: ``tokenizer.json`` -> ``tokenizer.specials.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.specials.json")


class TextTokenizer:
    """A trained HF ``tokenizers.Tokenizer`` and the ids of its pad, bos, eos and unk tokens.

    By default they are ids 0..3 (what ``train_bpe`` makes). Other vocabularies name their own:
    GPT-2's byte-level BPE has one special, ``<|endoftext|>`` (its last id), which is bos, eos and
    pad (a decoder-only model never attends to padding: generation masks it) with no unk (bytes are
    never unknown): ``TextTokenizer(tok, pad_id=50256, bos_id=50256, eos_id=50256, unk_id=None)``.
    opus-mt has ``</s>`` = 0, ``<unk>`` = 1, ``<pad>`` = its last id and starts the decoder at pad, so
    bos = pad. Each id must be a special (added) token. ``save`` writes non-default ids to a sidecar,
    ``specials_path(path)``, which ``load`` reads; without one the ids are 0..3, as always.
    """

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                 unk_id: int | None = UNK_ID) -> None:
        specials = tokenizer.get_added_tokens_decoder()
        ids = {"pad": pad_id, "bos": bos_id, "eos": eos_id, "unk": unk_id}
        for role, i in ids.items():
            if i is None and role == "unk":
                continue
            if not isinstance(i, int) or isinstance(i, bool) or i not in specials or not specials[i].special:
                token = tokenizer.id_to_token(i) if isinstance(i, int) else None
                raise DataError(f"tokenizer: id {i!r} must be the special {role} token ({role}_id), got {token!r}")
        self.tokenizer = tokenizer
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id

    @property
    def special_ids(self) -> dict[str, int | None]:
        """Role -> id: {"pad": ..., "bos": ..., "eos": ..., "unk": ... or None}."""
        return {role: getattr(self, f"{role}_id") for role in ROLES}

    @property
    def default_specials(self) -> bool:
        """True when pad, bos, eos, unk are ids 0..3 (no sidecar is written)."""
        return self.special_ids == dict(zip(ROLES, (PAD_ID, BOS_ID, EOS_ID, UNK_ID)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; characters not seen in training become unk."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return _wrap(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (tokenized in parallel by the Rust library)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        bos, eos = self.bos_id if add_bos else None, self.eos_id if add_eos else None
        return [_wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first eos; pad, bos, unk and other specials are dropped."""
        ids = _until_eos(ids, self.eos_id, self.vocab_size)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON (HF format, loadable by ``tokenizers.Tokenizer.from_file``) atomically,
        and, when the special ids are not 0..3, their sidecar (``specials_path``) before it."""
        sidecar = specials_path(path)
        if not self.default_specials:
            roles = {role: None if i is None else {"id": i, "token": self.tokenizer.id_to_token(i)}
                     for role, i in self.special_ids.items()}
            obj = {"type": _SPECIALS_FORMAT, "version": 1, **roles}
            atomic_write_text(sidecar, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
        elif _is_specials_file(sidecar):  # a sidecar qkv wrote for another vocabulary: it no longer applies
            sidecar.unlink()
        atomic_write_text(path, self.tokenizer.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Read a tokenizer saved by ``save`` (and its sidecar, when there is one); DataError names the
        file when it is missing or wrong."""
        text, obj = _read_json(path)
        if isinstance(obj, dict) and obj.get("type") == _CHAR_FORMAT:
            raise DataError(f"{path}: is a CharTokenizer file; use CharTokenizer.load or load_tokenizer")
        if not isinstance(obj, dict) or "model" not in obj:
            raise DataError(f"{path}: not a tokenizers JSON file (no 'model' key)")
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception
            raise DataError(f"{path}: not a valid tokenizers JSON file: {e}") from None
        ids = _read_specials(specials_path(path), tokenizer)
        try:
            return cls(tokenizer, **ids)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        specials = "" if self.default_specials else f", specials={self.special_ids}"
        return f"TextTokenizer(vocab_size={self.vocab_size}{specials})"


def _is_specials_file(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("type") == _SPECIALS_FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _read_specials(path: Path, tokenizer: Tokenizer) -> dict[str, int | None]:
    """``{pad_id: .., bos_id: .., eos_id: .., unk_id: ..}`` from a sidecar; {} (ids 0..3) when there is none.

    Each role's id must still hold the token the sidecar names (a sidecar of another vocabulary is refused).
    """
    if not path.exists():
        return {}
    _, obj = _read_json(path)
    if not isinstance(obj, dict) or obj.get("type") != _SPECIALS_FORMAT:
        raise DataError(f'{path}: not a special-token file (no "type": "{_SPECIALS_FORMAT}")')
    ids = {}
    for role in ROLES:
        entry = obj.get(role)
        if entry is None and role == "unk":
            ids["unk_id"] = None
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise DataError(f'{path}: "{role}" must be {{"id": int, "token": str}}, got {entry!r}')
        if tokenizer.id_to_token(entry["id"]) != entry.get("token"):
            found = tokenizer.id_to_token(entry["id"])
            raise DataError(f"{path}: {role} is {entry.get('token')!r} at id {entry['id']}, but the tokenizer has "
                            f"{found!r} there (the files belong to different vocabularies)")
        ids[f"{role}_id"] = entry["id"]
    return ids


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    byte_level: bool = False,
) -> TextTokenizer:
    """Learn a BPE vocabulary of at most ``vocab_size`` tokens (specials included) from ``texts``.

    ``byte_level`` (GPT-2's scheme, for language models): BPE over UTF-8 bytes, so every text
    round-trips exactly (newlines, any character) and nothing is ever unknown; otherwise the
    Metaspace scheme described above.

    ``special_tokens`` are pad, bos, eos, unk in that order (ids 0..3), then any extras. A small
    corpus may end with fewer tokens than asked; that is logged. Training is deterministic.
    """
    special_tokens = tuple(special_tokens)
    if len(special_tokens) < 4 or len(set(special_tokens)) != len(special_tokens):
        raise DataError(f"special_tokens={special_tokens!r}: need 4+ distinct tokens (pad, bos, eos, unk, ...)")
    if vocab_size <= len(special_tokens):
        raise DataError(f"vocab_size={vocab_size} must exceed the {len(special_tokens)} special tokens")
    if min_frequency < 1:
        raise DataError(f"min_frequency={min_frequency} must be >= 1")
    tokenizer = Tokenizer(models.BPE(unk_token=special_tokens[UNK_ID]))
    alphabet = []
    if byte_level:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, initial_alphabet=alphabet,
                                  special_tokens=list(special_tokens), show_progress=False)
    counter = _Counter(texts)
    tokenizer.train_from_iterator(counter, trainer=trainer)
    if counter.n == 0:
        raise DataError("texts: nothing to train the tokenizer on")
    for i, token in enumerate(special_tokens):
        assert tokenizer.token_to_id(token) == i, f"special token {token!r} did not get id {i}"
    if tokenizer.get_vocab_size() < vocab_size:
        logger.info("BPE vocabulary has %d tokens, fewer than vocab_size=%d", tokenizer.get_vocab_size(), vocab_size)
    return TextTokenizer(tokenizer)


def train_translation_tokenizers(
    pairs: Iterable[tuple[str, str]],
    vocab_size: int,
    joint: bool,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> tuple[TextTokenizer, TextTokenizer]:
    """(src_tokenizer, tgt_tokenizer) for translation pairs.

    ``joint``: one vocabulary learned from both sides (the paper's shared EN-DE vocabulary),
    returned twice as the same object; otherwise one per side, each of ``vocab_size``.
    """
    pairs = list(pairs)
    src = [s for s, _ in pairs]
    tgt = [t for _, t in pairs]
    kwargs = dict(min_frequency=min_frequency, special_tokens=special_tokens)
    if joint:
        tokenizer = train_bpe(src + tgt, vocab_size, **kwargs)
        return tokenizer, tokenizer
    return train_bpe(src, vocab_size, **kwargs), train_bpe(tgt, vocab_size, **kwargs)


class CharTokenizer:
    """One token per character (char-level LMs such as char-rnn's tinyshakespeare).

    Ids: pad=0, bos=1, eos=2, then ``chars`` in order. ``unknown`` says what ``encode`` does
    with a character outside the vocabulary: ``"error"`` raises DataError naming the
    characters, ``"skip"`` drops them. There is no unk token (``unk_id`` is None).
    """

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, None

    def __init__(self, chars: Sequence[str], *, unknown: str = "error") -> None:
        chars = tuple(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad or len(set(chars)) != len(chars) or not chars:
            raise DataError(f"chars: need distinct single characters, at least one; got {len(chars)} with {bad[:5]!r}")
        if unknown not in ("error", "skip"):
            raise DataError(f"unknown={unknown!r} must be 'error' or 'skip'")
        self.chars, self.unknown = chars, unknown
        self._offset = len(CHAR_SPECIAL_TOKENS)
        self._ids = {c: i + self._offset for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str | Iterable[str], *, unknown: str = "error") -> CharTokenizer:
        """The vocabulary of the characters in ``text`` (a string or strings), sorted by code point."""
        chars = set(text) if isinstance(text, str) else set().union(*map(set, text))
        if not chars:
            raise DataError("text: empty, no characters to build a vocabulary from")
        return cls(sorted(chars), unknown=unknown)

    @property
    def vocab_size(self) -> int:
        return self._offset + len(self.chars)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._ids
        if self.unknown == "skip":
            out = [ids[c] for c in text if c in ids]
        else:
            try:
                out = [ids[c] for c in text]
            except KeyError:
                raise DataError(_unknown_message(text, ids)) from None
        return _wrap(out, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first eos; pad and bos are dropped."""
        ids = _until_eos(ids, self.eos_id, self.vocab_size)
        return "".join(self.chars[i - self._offset] for i in ids if i >= self._offset)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically."""
        obj = {"type": _CHAR_FORMAT, "version": 1, "specials": list(CHAR_SPECIAL_TOKENS)}
        obj.update(chars=list(self.chars), unknown=self.unknown)
        atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        _, obj = _read_json(path)
        if not isinstance(obj, dict) or obj.get("type") != _CHAR_FORMAT:
            raise DataError(f'{path}: not a CharTokenizer file (no "type": "{_CHAR_FORMAT}")')
        if obj.get("specials") != list(CHAR_SPECIAL_TOKENS):
            raise DataError(f"{path}: specials must be {list(CHAR_SPECIAL_TOKENS)}, got {obj.get('specials')!r}")
        try:
            return cls(obj.get("chars", ()), unknown=obj.get("unknown", "error"))
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unknown={self.unknown!r})"


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer | CharTokenizer:
    """Load either kind of tokenizer file, recognised by its content."""
    _, obj = _read_json(path)
    if isinstance(obj, dict) and obj.get("type") == _CHAR_FORMAT:
        return CharTokenizer.load(path)
    return TextTokenizer.load(path)


def _read_json(path: str | os.PathLike) -> tuple[str, object]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such tokenizer file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read tokenizer file: {e}") from None
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not a tokenizer JSON file: {e.msg} (column {e.colno})") from None


def _wrap(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    return ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])


def _until_eos(ids: Iterable[int], eos: int, vocab_size: int) -> list[int]:
    """``ids`` (a list or a 1-D tensor) up to, not including, the first eos; checks the range."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if eos in ids:
        ids = ids[: ids.index(eos)]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise DataError(f"ids: {i} is outside the vocabulary (size {vocab_size})")
    return ids


def _unknown_message(text: str, ids: dict[str, int]) -> str:
    unknown = sorted({c for c in text if c not in ids})
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    first = next(i for i, c in enumerate(text) if c not in ids)
    return f"text: {len(unknown)} characters not in the vocabulary: {shown}{more}; first at index {first}"


class _Counter:
    """Iterates over texts and counts them, so an empty corpus can be reported."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.n = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.n += 1
            yield text
