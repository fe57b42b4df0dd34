"""Labelled text: a reader for classification files, a label vocabulary, and sentence batches.

A file is delimited text, one example a line:

* with a header naming its columns: ``.csv`` files are comma-separated with CSV quoting (a
  quoted field may hold commas and newlines); any other file is tab-separated and strict (no
  quoting, so every row must have the header's number of fields). The label and text columns
  are named in the config, or guessed from the header (``LABEL_NAMES``, ``TEXT_NAMES``, in
  that order of preference, case-insensitively); the choice is logged. Other columns are ignored.
* without a header: exactly two fields, ``label<TAB>text`` (or ``label,text``), or any number of
  fields with the label and text columns given as 0-based indices.

A column is chosen by header name or by 0-based index (``label_column: 0``); an index works
with a header or without one (``header: false``).

Whether the first line is a header is guessed unless given: it is one when it holds both a
label-column and a text-column name (the configured names, else the guess lists).

Labels are strings ("0", "pos", ...). The label vocabulary is the sorted set of the training
labels -- numerically when every label is an integer, so "10" comes after "2" -- and a label's
index in it is its class id. Errors name ``path:line`` (1-based, the header is line 1).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qkv.data.batching import _split_to_multiple, pad_sequences
from qkv.data.text import read_tsv
from qkv.data.tokenizer import TextTokenizer
from qkv.data.wordpiece import WordPieceBatch
from qkv.errors import CheckpointError, DataError
from qkv.fileio import atomic_write_text

log = logging.getLogger(__name__)

LABEL_NAMES = ("label", "labels", "class", "category", "target", "y")
TEXT_NAMES = ("sentence", "text", "content", "review", "document", "x")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class LabelledTexts:
    """Examples of one file: ``texts[i]`` has class ``labels[i]`` (an index into ``label_names``)
    and is on line ``lines[i]`` of ``path``."""

    path: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}


# -- reading ---------------------------------------------------------------------------------------
def read_labelled(path: str | os.PathLike, *, label_column: str | int | None = None,
                  text_column: str | int | None = None, header: bool | None = None,
                  label_names: Sequence[str] | None = None) -> LabelledTexts:
    """Read ``path`` into examples; ``label_names`` maps labels to ids (default: this file's vocabulary).

    A label outside ``label_names``, an empty label or text, and a row with missing or extra
    fields are DataErrors naming ``path:line``.
    """
    rows, lines = _read_rows(path)
    guessed = header is None
    header = _has_header(rows[0], label_column, text_column) if guessed else header
    label_i, text_i, rows, lines = _choose_columns(str(path), rows, lines, header, label_column, text_column)
    if guessed and not header and label_names is not None and rows[0][label_i].strip() not in label_names:
        raise DataError(f"{path}:1: {list(rows[0])} was read as data (it names no known column), but "
                        f"{rows[0][label_i].strip()!r} is not a label of the training data {list(label_names)[:20]}; "
                        "if line 1 is a header, choose the columns: data.label_column=NAME data.text_column=NAME "
                        "(or data.header=true)")
    texts, raw = [], []
    for row, line in zip(rows, lines):
        label, text = row[label_i].strip(), row[text_i]
        if not label:
            raise DataError(f"{path}:{line}: empty label")
        if not text.strip():
            raise DataError(f"{path}:{line}: empty text")
        texts.append(text)
        raw.append(label)
    names = label_vocabulary(raw) if label_names is None else list(label_names)
    labels = _label_ids(raw, names, str(path), lines, given=label_names is not None)
    out = LabelledTexts(path=str(path), texts=texts, labels=labels, label_names=names, lines=lines)
    counts = ", ".join(f"{k}={v}" for k, v in out.class_counts().items())
    log.info("%s: %d examples; class counts %s", path, len(out), counts)
    return out


def label_vocabulary(labels: Sequence[str]) -> list[str]:
    """The sorted distinct labels: numerically when all are integers, else as strings."""
    distinct = set(labels)
    if all(_INTEGER.fullmatch(x) for x in distinct):
        return sorted(distinct, key=lambda x: (int(x), x))
    return sorted(distinct)


def _label_ids(raw: list[str], names: list[str], path: str, lines: list[int], *, given: bool) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for label, line in zip(raw, lines):
        if label not in index:
            shown = names if len(names) <= 20 else [*names[:20], "..."]
            raise DataError(f"{path}:{line}: label {label!r} does not occur in the training data (labels: {shown})")
        ids.append(index[label])
    if not given and lines[0] == 1 and len(raw) > 2:
        if Counter(raw)[raw[0]] == 1:
            log.warning("%s:%d: label %r occurs only on this first line; is the line a header? "
                        "(set data.header=true)", path, lines[0], raw[0])
    return ids


def _read_rows(path: str | os.PathLike) -> tuple[list[tuple[str, ...]], list[int]]:
    """All rows (fields) and their 1-based lines, header included; every row as wide as the first."""
    if Path(path).suffix.lower() != ".csv":
        table = read_tsv(path, header=False)
        return table.rows, [table.line_of(i) for i in range(len(table.rows))]
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (file offset {e.start}): {e.reason}") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, lines = [], []
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = tuple(next(reader))
            except StopIteration:
                break
            if not row:
                raise DataError(f"{path}:{start}: empty line")
            if rows and len(row) != len(rows[0]):
                raise DataError(f"{path}:{start}: {len(row)} fields, expected {len(rows[0])} as in line 1")
            rows.append(row)
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows, lines


def _has_header(first: Sequence[str], label_column: str | int | None, text_column: str | int | None) -> bool:
    """The first row is a header when one field names the label column and another the text column."""
    names = [f.strip().lower() for f in first]
    sides = [[column.lower()] if isinstance(column, str) else guesses
             for column, guesses in ((label_column, LABEL_NAMES), (text_column, TEXT_NAMES))
             if not isinstance(column, int)]  # a column given by index says nothing about the header
    return all(any(n in side for n in names) for side in sides or [LABEL_NAMES, TEXT_NAMES])


def _choose_columns(path: str, rows, lines, header: bool, label_column: str | int | None,
                    text_column: str | int | None):
    """(label index, text index, data rows, their lines) for a file with or without a header."""
    if not header:
        return (*_headerless_columns(path, rows[0], label_column, text_column), rows, lines)
    columns = [c.strip() for c in rows[0]]
    if len(set(columns)) != len(columns) or not all(columns):
        raise DataError(f"{path}:1: header has empty or duplicate column names: {columns}")
    if len(rows) < 2:
        raise DataError(f"{path}: has a header but no rows")
    label_i = _column(path, columns, label_column, LABEL_NAMES, "label_column")
    text_i = _column(path, columns, text_column, TEXT_NAMES, "text_column")
    if label_i == text_i:
        raise DataError(f"{path}:1: the label and text columns are the same column {columns[label_i]!r}")
    how = "given" if label_column is not None and text_column is not None else "guessed from the header"
    log.info("%s: label column %r, text column %r (%s)", path, columns[label_i], columns[text_i], how)
    return label_i, text_i, rows[1:], lines[1:]


def _headerless_columns(path: str, first, label_column: str | int | None,
                        text_column: str | int | None) -> tuple[int, int]:
    """Columns of a file without a header: indices given, or label<TAB>text."""
    named = {k: v for k, v in (("data.label_column", label_column), ("data.text_column", text_column))
             if isinstance(v, str)}
    if named:
        given = ", ".join(f"{k}={v!r}" for k, v in named.items())
        raise DataError(f"{path}:1: {given} names a column, but the first line is not a header with it: "
                        f"{list(first)} (give a 0-based index, or set data.header=true if line 1 is the header)")
    if (label_column is None or text_column is None) and len(first) != 2:
        raise DataError(f"{path}:1: without a header a line must be label<TAB>text (2 fields), got "
                        f"{len(first)}; give the file a header naming its columns, or set data.label_column "
                        "and data.text_column to 0-based indices")
    label_i = 0 if label_column is None else _index(path, len(first), label_column, "label_column")
    text_i = 1 if text_column is None else _index(path, len(first), text_column, "text_column")
    if label_i == text_i:
        raise DataError(f"{path}: data.label_column and data.text_column are the same column {label_i}")
    log.info("%s: no header; label column %d, text column %d", path, label_i, text_i)
    return label_i, text_i


def _index(path: str, n: int, index: int, arg: str) -> int:
    if isinstance(index, bool) or not 0 <= index < n:
        raise DataError(f"data.{arg}={index!r}: {path} has {n} columns (indices 0..{n - 1})")
    return index


def _column(path: str, columns: list[str], name: str | int | None, guesses: Sequence[str], arg: str) -> int:
    if isinstance(name, int):
        return _index(path, len(columns), name, arg)
    lowered = [c.lower() for c in columns]
    for candidate in [name] if name else guesses:
        if candidate.lower() in lowered:
            return lowered.index(candidate.lower())
    if name:
        raise DataError(f"data.{arg}={name!r}: {path}:1: header has no such column; it has {columns}")
    raise DataError(f"{path}:1: cannot tell which column is the {arg[:-7]} from the header {columns} "
                    f"(known names: {list(guesses)}); set data.{arg}")


# -- the label vocabulary in a run directory ------------------------------------------------------
def save_labels(path: str | os.PathLike, names: Sequence[str]) -> None:
    """labels.json: the label vocabulary as a JSON list; a class id is its position."""
    atomic_write_text(path, json.dumps(list(names), ensure_ascii=False, indent=1) + "\n")


def load_labels(path: str | os.PathLike) -> list[str]:
    try:
        names = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no label vocabulary") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON label list: {e}") from None
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise CheckpointError(f"{path}: expected a JSON list of distinct label strings, got {names!r}")
    return names


# -- tokens ----------------------------------------------------------------------------------------
def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> WordPieceBatch:
    """Right-pad single-text id lists into (ids, segment_ids all 0, mask True = token), each (B, T)."""
    ids = pad_sequences(seqs, pad_id)  # (B, T)
    lengths = torch.tensor([len(s) for s in seqs])  # (B,)
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, T)
    return WordPieceBatch(ids, torch.zeros_like(ids), mask)


class BpeSentenceTokenizer:
    """A BPE ``TextTokenizer`` used as BERT uses WordPiece: ``<s> text </s>``, truncated to ``max_length``.

    ``<s>`` (bos, id 1) plays [CLS] (the first token, which cls pooling reads) and ``</s>``
    (eos, id 2) plays [SEP]; pad is id 0. A longer text loses tokens from its end; ``</s>`` stays.
    """

    def __init__(self, tokenizer: TextTokenizer, *, max_length: int) -> None:
        if max_length < 3:
            raise DataError(f"max_length must be >= 3 (<s> token </s>), got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id, self.cls_id, self.sep_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        keep = self.max_length - 2
        return [[self.cls_id, *ids[:keep], self.sep_id] for ids in self.tokenizer.encode_batch(list(texts))]

    def collate(self, texts: Sequence[str]) -> WordPieceBatch:
        if len(texts) == 0:
            raise DataError("texts: empty batch")
        return pad_batch(self.encode_batch(texts), self.pad_id)

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(path)

    def __repr__(self) -> str:
        return f"BpeSentenceTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


# -- batches ---------------------------------------------------------------------------------------
def sentence_batches(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """Shuffled batches of ``batch_size`` example indices (the last may be smaller); this rank's share.

    With ``world_size`` > 1 the largest batches are split in two until the count divides by it,
    so that every rank takes as many steps and every example is seen once per epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = _split_to_multiple([order[i:i + batch_size] for i in range(0, n, batch_size)], world_size)
    return _shard(batches, rank, world_size)


def class_balanced_batches(labels: Sequence[int], batch_size: int, per_class: int, *, seed: int, epoch: int,
                           rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Hermans et al. 2017, sec. 2, "PK" batches: P = batch_size // K classes, K = ``per_class`` examples each.

    Each batch takes the classes in a fresh random order (cycled when there are fewer than P),
    and from each class the next K examples of its own shuffled stream, which starts over,
    reshuffled, once used up. So every anchor has positives and negatives in its batch, and
    classes are drawn uniformly (a rare class is seen more often than its frequency, and one
    with fewer than K examples repeats them within its group). An epoch
    has as many batches as plain shuffled ones, ceil(N / batch_size), each of P * K examples
    (rounded up to a multiple of ``world_size``, which deals them out to the ranks).
    """
    rng = np.random.default_rng([seed, epoch])
    labels = np.asarray(labels)
    classes = np.unique(labels)
    streams = [_ClassStream(np.flatnonzero(labels == c), rng) for c in classes]
    n_picks = max(1, batch_size // per_class)
    batches = []
    n_batches = -(-len(labels) // batch_size)
    for _ in range(-(-n_batches // max(world_size, 1)) * world_size):  # drawn up to a multiple of the ranks
        picks = np.resize(rng.permutation(len(classes)), n_picks)  # P classes, distinct while they last
        batches.append(np.concatenate([streams[c].take(per_class) for c in picks]))
    return _shard(batches, rank, world_size)


class _ClassStream:
    """One class's examples in shuffled order, reshuffled and restarted when used up."""

    def __init__(self, members: np.ndarray, rng: np.random.Generator) -> None:
        self.members, self.rng = members, rng
        self.order, self.next = rng.permutation(members), 0

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.next == len(self.order):
                self.order, self.next = self.rng.permutation(self.members), 0
            got = self.order[self.next:self.next + k]
            out.append(got)
            self.next, k = self.next + len(got), k - len(got)
        return np.concatenate(out)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths (little padding), for evaluation; order by length, ties by index."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _shard(batches: list, rank: int, world_size: int) -> list[list[int]]:
    """Every ``world_size``-th batch from ``rank``, wrapping round so all ranks get as many."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if batches and len(batches) % world_size:
        batches = batches + [batches[i % len(batches)] for i in range(world_size - len(batches) % world_size)]
    return [[int(i) for i in b] for b in batches[rank::world_size]]
