"""Download public data sets from their upstream, checked and written atomically.

Multi30k (Elliott et al., 2016), task 1: English descriptions of Flickr30k images with German
and French translations, aligned line by line. Files already present and valid are kept.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from qkv.data.text import atomic_write_bytes, parse_lines, read_lines
from qkv.errors import DataError

logger = logging.getLogger(__name__)

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_LINES = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
"""Known line counts of the upstream files, checked only when downloading from upstream."""
MAX_DOWNLOAD_BYTES = 64_000_000
"""The largest compressed file fetched (Multi30k's largest is under 1 MB)."""
MAX_TEXT_BYTES = 256_000_000
"""The largest decompressed file: a gzip bomb stops here, after at most this much memory."""


def fetch_multi30k(
    dest_dir: str | os.PathLike,
    *,
    base_url: str = MULTI30K_URL,
    splits: Sequence[str] = ("train", "val"),
    langs: Sequence[str] = ("en", "de", "fr"),
    timeout: float = 60.0,
) -> list[Path]:
    """Make ``dest_dir/{split}.{lang}`` for every split and language; return their paths, split by split.

    Each is ``{base_url}/{split}.{lang}.gz`` decompressed, checked with the strict reader
    (UTF-8, no empty lines) and written atomically. A file already in ``dest_dir`` that passes
    the checks is kept without downloading. The languages of a split must have equal line
    counts; from the upstream ``MULTI30K_URL`` they must also match ``MULTI30K_LINES``.
    ``base_url`` may be any URL urllib opens, such as ``file:///path/to/mirror``. Network and
    format problems raise DataError naming the URL.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    expected = MULTI30K_LINES if base_url == MULTI30K_URL else {}
    paths = []
    for split in splits:
        counts = {}
        for lang in langs:
            name = f"{split}.{lang}"
            counts[name] = _fetch_one(dest / name, f"{base_url}/{name}.gz", expected.get(split), timeout)
            paths.append(dest / name)
        _check_aligned(dest, split, counts)
    return paths


def _fetch_one(path: Path, url: str, expected_lines: int | None, timeout: float) -> int:
    """Keep ``path`` if valid, else download ``url`` into it; return its line count."""
    if path.exists():
        try:
            n = len(read_lines(path))
            _check_count(str(path), n, expected_lines)
            logger.info("%s: present and valid (%d lines), not downloading", path, n)
            return n
        except DataError as e:
            logger.warning("%s: present but invalid (%s); downloading it again", path, e)
    data = _decompress(_download(url, timeout), url)
    n = len(parse_lines(data, name=url))
    _check_count(url, n, expected_lines)
    atomic_write_bytes(path, data)
    logger.info("%s: downloaded %d lines from %s", path, n, url)
    return n


def _download(url: str, timeout: float, *, limit: int | None = None) -> bytes:
    """The bytes at ``url``; more than ``limit`` (MAX_DOWNLOAD_BYTES) of them is a DataError (read no further)."""
    limit = MAX_DOWNLOAD_BYTES if limit is None else limit
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            stated = response.headers.get("Content-Length") if response.headers else None
            if stated and stated.isdigit() and int(stated) > limit:
                raise DataError(f"{url}: the file is {int(stated):,} bytes, more than the limit of {limit:,} "
                                "(qkv.data.fetch.MAX_DOWNLOAD_BYTES)")
            data = response.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: download failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: download failed: {reason}") from None
    if len(data) > limit:
        raise DataError(f"{url}: more than {limit:,} bytes, the download limit (qkv.data.fetch.MAX_DOWNLOAD_BYTES)")
    return data


def _decompress(data: bytes, url: str, *, limit: int | None = None) -> bytes:
    """gunzip ``data`` (all members), refusing to produce more than ``limit`` (MAX_TEXT_BYTES) bytes."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    out = bytearray()
    rest = data
    try:
        while rest:
            inflate = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
            chunk = inflate.decompress(rest, limit + 1 - len(out))
            while True:
                out += chunk
                if len(out) > limit:
                    raise DataError(f"{url}: decompresses to more than {limit:,} bytes, the limit "
                                    "(qkv.data.fetch.MAX_TEXT_BYTES); a gzip bomb?")
                if inflate.eof or not inflate.unconsumed_tail:
                    break
                chunk = inflate.decompress(inflate.unconsumed_tail, limit + 1 - len(out))
            if not inflate.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            rest = inflate.unused_data
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{url}: not a valid gzip file: {e}") from None
    return bytes(out)


def _check_count(name: str, n: int, expected: int | None) -> None:
    if expected is not None and n != expected:
        raise DataError(f"{name}: {n} lines, but the upstream file has {expected}")


def _check_aligned(dest: Path, split: str, counts: dict[str, int]) -> None:
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{dest / name}: {n}" for name, n in counts.items())
        raise DataError(f"split {split!r} is misaligned, line counts differ: {listing}")
