"""Strict UTF-8 line and TSV readers, and atomic file writes.

Lines are split on ``\\n`` only. Every other character that ``str.splitlines`` splits on (a lone
``\\r``, ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``, U+0085, U+2028, U+2029) is an error naming
``path:line``: another tool would end a line there and shift every later line number, so a
"parallel" corpus would silently misalign. A file is read and decoded line by line from bytes,
so an error names the exact ``path:line`` (1-based) and byte offset, and memory stays bounded by
``MAX_LINE_CHARS`` per line: a 10 GB line is refused after reading a few MB of it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qkv.errors import DataError
from qkv.fileio import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
MAX_LINE_CHARS = 1_000_000
"""The longest line any reader accepts, whatever ``max_chars`` says (a line is tokenised whole)."""
_CHUNK = 1 << 23
_CONTINUATION = bytes(range(0x80, 0xC0))


def read_lines(path: str | os.PathLike, *, max_chars: int | None = None, allow_empty: bool = False) -> list[str]:
    """Read a UTF-8 text file strictly into its lines, without line terminators.

    A UTF-8 byte-order mark at the start is dropped; a ``\\r`` before ``\\n`` (CRLF) is dropped;
    a missing final newline is fine. Raises DataError naming ``path:line`` for: a missing file,
    invalid UTF-8 (with the byte offset), a NUL byte, a character other tools end lines at, an
    empty or whitespace-only line (unless ``allow_empty``), a line longer than ``max_chars`` (or
    ``MAX_LINE_CHARS``) characters, and an empty file.
    """
    path = Path(path)
    with open_input(path) as f:
        try:
            return list(iter_lines(f, name=str(path), max_chars=max_chars, allow_empty=allow_empty))
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def open_input(path: str | os.PathLike) -> BinaryIO:
    """``open(path, "rb")``, its failure one DataError naming the file (and, for a file a fetcher writes,
    the command that gets it)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        from qkv.data.fetch import missing_file_hint  # fetch reads through this module

        raise DataError(f"{path}: no such file{missing_file_hint(Path(path))}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


# Characters that str.splitlines() and many tools treat as line ends, besides "\n" and "\r\n".
_NAMES = {"\r": "carriage return", "\x0b": "VERTICAL TAB (U+000B)", "\x0c": "FORM FEED (U+000C)",
          "\x1c": "FILE SEPARATOR (U+001C)", "\x1d": "GROUP SEPARATOR (U+001D)",
          "\x1e": "RECORD SEPARATOR (U+001E)", "\x85": "NEXT LINE (U+0085)",
          "\u2028": "LINE SEPARATOR (U+2028)", "\u2029": "PARAGRAPH SEPARATOR (U+2029)"}
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def parse_lines(data: bytes, *, name: str, max_chars: int | None = None, allow_empty: bool = False) -> list[str]:
    """The checks of ``read_lines`` on bytes already in memory; ``name`` is used in messages."""
    return list(iter_lines(io.BytesIO(data), name=name, max_chars=max_chars, allow_empty=allow_empty))


def iter_lines(f: BinaryIO, *, name: str, max_chars: int | None, allow_empty: bool) -> Iterator[str]:
    """Decode ``f`` line by line; no line of more than the character limit is ever held whole."""
    if max_chars is not None and max_chars < 1:
        raise DataError(f"max_chars={max_chars} must be positive or None")
    limit = MAX_LINE_CHARS if max_chars is None else min(max_chars, MAX_LINE_CHARS)
    most_bytes = 4 * limit + 2  # UTF-8 takes at most 4 bytes a character; + "\r\n"
    raw, offset, lineno = f.readline(most_bytes + 1), 0, 0
    if raw.startswith(_UTF16_BOMS):
        raise DataError(f"{name}:1: file starts with a UTF-16 byte-order mark; expected UTF-8")
    if raw.startswith(_BOM):
        raw, offset = raw[len(_BOM):], len(_BOM)
        raw = raw or f.readline(most_bytes + 1)
    if not raw:
        raise DataError(f"{name}: file is empty")
    while raw:
        lineno += 1
        if len(raw) > most_bytes and not raw.endswith(b"\n"):
            _too_long(name, lineno, _count_chars(raw) + _skip_line(f), max_chars)
        yield _decode_line(raw[:-1] if raw.endswith(b"\n") else raw, name, lineno, offset, max_chars, allow_empty)
        offset += len(raw)
        raw = f.readline(most_bytes + 1)


def _count_chars(data: bytes) -> int:
    """UTF-8 characters in ``data``: every byte that is not a continuation byte (0b10xxxxxx)."""
    return len(data.translate(None, _CONTINUATION))


def _skip_line(f: BinaryIO) -> int:
    """Read the rest of an over-long line in chunks, counting its characters (without the ``\\n``).

    The line is an error, so reading past its end does not matter."""
    count = 0
    while chunk := f.read(_CHUNK):
        end = chunk.find(b"\n")
        if end >= 0:
            return count + _count_chars(chunk[:end].removesuffix(b"\r"))
        count += _count_chars(chunk)
    return count


def _too_long(name: str, lineno: int, n: int, max_chars: int | None) -> None:
    if max_chars is not None and max_chars <= MAX_LINE_CHARS:
        raise DataError(f"{name}:{lineno}: line has {n} characters, more than max_chars={max_chars}")
    raise DataError(f"{name}:{lineno}: line has {n} characters, more than the limit of {MAX_LINE_CHARS:,} "
                    "(qkv.data.text.MAX_LINE_CHARS); split the line")


def _decode_line(raw: bytes, name: str, lineno: int, offset: int, max_chars: int | None, allow_empty: bool) -> str:
    """One line's bytes (no ``\\n``) to text; ``offset`` is the line's first byte in the file."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{name}:{lineno}: NUL byte at byte {nul} of the line (file offset {offset + nul})")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise DataError(
            f"{name}:{lineno}: invalid UTF-8 at byte {e.start} of the line (file offset {offset + e.start}, "
            f"bytes {bad!r}): {e.reason}"
        ) from None
    breaks = _LINE_BREAKS.search(line)
    if breaks:
        char = breaks.group()
        what = "a lone carriage return (old Mac line ends?)" if char == "\r" else f"{_NAMES[char]}"
        raise DataError(f"{name}:{lineno}: {what} at character {breaks.start()} of the line; other tools split "
                        f"lines there, so parallel files would fall out of step (replace it with a space or \\n)")
    if not allow_empty and not line.strip():
        kind = "empty line" if not line else "whitespace-only line"
        raise DataError(f"{name}:{lineno}: {kind}")
    if max_chars is not None and len(line) > max_chars:
        raise DataError(f"{name}:{lineno}: line has {len(line)} characters, more than max_chars={max_chars}")
    if len(line) > MAX_LINE_CHARS:
        _too_long(name, lineno, len(line), max_chars)
    return line


@dataclass(frozen=True)
class Table:
    """A TSV file's rows. ``columns`` is the header (None without one); ``rows[i]`` is on
    line ``first_line + i`` of ``path``."""

    path: str
    columns: tuple[str, ...] | None
    rows: list[tuple[str, ...]]
    first_line: int

    def line_of(self, i: int) -> int:
        """The 1-based file line of ``rows[i]``."""
        return self.first_line + i

    def column_index(self, col: str | int, *, arg: str = "column") -> int:
        """Resolve a column given by header name or 0-based index; ``arg`` names it in errors."""
        n = len(self.columns) if self.columns is not None else len(self.rows[0])
        if isinstance(col, bool) or not isinstance(col, (str, int)):
            raise DataError(f"{arg}={col!r} must be a column name or a 0-based index")
        if isinstance(col, int):
            if not 0 <= col < n:
                raise DataError(f"{arg}={col}: {self.path} has {n} columns (indices 0..{n - 1})")
            return col
        if self.columns is None:
            raise DataError(f"{arg}={col!r}: {self.path} is read without a header; give a 0-based index")
        if col not in self.columns:
            raise DataError(f"{arg}={col!r}: {self.path}:1: header has no such column; it has {list(self.columns)}")
        return self.columns.index(col)


def read_tsv(
    path: str | os.PathLike, *, header: bool = True, delimiter: str = "\t", max_chars: int | None = None
) -> Table:
    """Read a delimited file strictly (no quoting: fields are split on ``delimiter``).

    Every row must have as many fields as the header (or, without one, the first row): a stray
    tab inside a sentence would otherwise shift the columns silently. Header names must be
    unique and non-empty. Errors name ``path:line``.
    """
    if not delimiter or "\n" in delimiter:
        raise DataError(f"delimiter={delimiter!r} must be a non-empty string without a newline")
    lines = read_lines(path, max_chars=max_chars)
    fields = [tuple(line.split(delimiter)) for line in lines]
    columns = None
    if header:
        columns = fields.pop(0)
        _check_header(columns, str(path))
        if not fields:
            raise DataError(f"{path}: has a header but no rows")
    first_line = 2 if header else 1
    expected = len(fields[0]) if columns is None else len(columns)
    for i, row in enumerate(fields):
        if len(row) != expected:
            what = "the header" if header else f"line {first_line}"
            raise DataError(f"{path}:{first_line + i}: {len(row)} fields, expected {expected} as in {what}")
    return Table(path=str(path), columns=columns, rows=fields, first_line=first_line)


def _check_header(columns: Sequence[str], path: str) -> None:
    for name in columns:
        if not name.strip():
            raise DataError(f"{path}:1: header has an empty column name: {list(columns)}")
    if len(set(columns)) != len(columns):
        raise DataError(f"{path}:1: header has duplicate column names: {list(columns)}")
