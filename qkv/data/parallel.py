"""Parallel corpora for translation: two aligned files, or two columns of a TSV file.

Everything is read and checked eagerly, so a misaligned or damaged corpus fails before
training starts, with the ``path:line`` of the problem.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from qkv.data.text import read_lines, read_tsv
from qkv.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 4096
"""A sentence longer than this is almost always a file whose line breaks were lost."""


@dataclass(frozen=True)
class ParallelCorpus:
    """Aligned (source, target) sentence pairs.

    ``lines[i]`` is the 1-based file line of ``pairs[i]`` (for error messages after reading);
    ``skipped`` holds the lines of the pairs dropped because a side was empty (only with
    ``skip_empty=True``); ``source`` says where the pairs came from.
    """

    pairs: list[tuple[str, str]]
    lines: tuple[int, ...]
    skipped: tuple[int, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.pairs[i]

    @property
    def src(self) -> list[str]:
        """The source sentences, in order."""
        return [s for s, _ in self.pairs]

    @property
    def tgt(self) -> list[str]:
        """The target sentences, in order."""
        return [t for _, t in self.pairs]


def read_parallel(
    src_path: str | os.PathLike,
    tgt_path: str | os.PathLike,
    *,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    skip_empty: bool = False,
) -> ParallelCorpus:
    """Read two line-aligned files (line i of one translates line i of the other).

    Different line counts are an error naming both files, both counts and the first line that
    has no partner. An empty or whitespace-only line is an error naming ``file:line``, unless
    ``skip_empty``: then every pair with an empty side is dropped, logged and recorded in
    ``ParallelCorpus.skipped``. Every other check of ``read_lines`` applies to both files.
    """
    src = read_lines(src_path, max_chars=max_chars, allow_empty=skip_empty)
    tgt = read_lines(tgt_path, max_chars=max_chars, allow_empty=skip_empty)
    if len(src) != len(tgt):
        longer = src_path if len(src) > len(tgt) else tgt_path
        raise DataError(
            f"misaligned parallel files: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
            f"{longer}:{min(len(src), len(tgt)) + 1} is the first line without a partner"
        )
    source = f"{src_path} | {tgt_path}"
    return _drop_empty(list(zip(src, tgt)), [i + 1 for i in range(len(src))], source)


def read_parallel_tsv(
    path: str | os.PathLike,
    *,
    src_col: str | int,
    tgt_col: str | int,
    header: bool = True,
    delimiter: str = "\t",
    max_chars: int | None = DEFAULT_MAX_CHARS,
    skip_empty: bool = False,
    keys: tuple[str, str] = ("src_col", "tgt_col"),
) -> ParallelCorpus:
    """Read pairs from two columns of a delimited file, chosen by header name or 0-based index.

    Without a ``header`` every line is a pair and the columns must be indices. A row with a
    different number of fields than the header (or first row) is an error naming ``path:line``;
    so is an empty cell in either chosen column, unless ``skip_empty`` (then the row is dropped,
    logged and recorded). ``max_chars`` limits whole lines. ``keys`` name the two column
    arguments in errors (a config says ``data.src_column``).
    """
    table = read_tsv(path, header=header, delimiter=delimiter, max_chars=max_chars)
    i_src = table.column_index(src_col, arg=keys[0])
    i_tgt = table.column_index(tgt_col, arg=keys[1])
    if i_src == i_tgt:
        raise DataError(f"{keys[0]}={src_col!r} and {keys[1]}={tgt_col!r} are the same column of {path}")
    pairs = [(row[i_src], row[i_tgt]) for row in table.rows]
    line_numbers = [table.line_of(i) for i in range(len(pairs))]
    if not skip_empty:
        for (s, t), line in zip(pairs, line_numbers):
            for text, col in ((s, src_col), (t, tgt_col)):
                if not text.strip():
                    raise DataError(f"{path}:{line}: empty cell in column {col!r}")
    return _drop_empty(pairs, line_numbers, str(path))


def _drop_empty(pairs: list[tuple[str, str]], line_numbers: list[int], source: str) -> ParallelCorpus:
    """Drop the pairs with an empty or whitespace-only side; log how many and where."""
    kept, lines, skipped = [], [], []
    for (s, t), line in zip(pairs, line_numbers):
        if s.strip() and t.strip():
            kept.append((s, t))
            lines.append(line)
        else:
            skipped.append(line)
    if skipped:
        logger.warning(
            "%s: skipped %d of %d pairs with an empty side (first at line %d)",
            source,
            len(skipped),
            len(pairs),
            skipped[0],
        )
    if not kept:
        raise DataError(f"{source}: no pairs left after skipping {len(skipped)} with an empty side")
    return ParallelCorpus(pairs=kept, lines=tuple(lines), skipped=tuple(skipped), source=source)
