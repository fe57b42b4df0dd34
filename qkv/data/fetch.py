"""Download public data sets from their upstream, checked and written atomically.

``fetch(name, out, url=None)`` for every name in ``DATASETS``; files already present and valid
are kept. Each download is at most ``MAX_DOWNLOAD_BYTES``, each decompressed file at most
``MAX_TEXT_BYTES``; ``url`` may be any URL urllib opens (``file:///mirror/...`` included).

* ``multi30k`` (Elliott et al., 2016), task 1: English descriptions of Flickr30k images with
  German and French translations, aligned line by line: ``{train,val}.{en,de,fr}``.
* ``tinyshakespeare`` (Karpathy's char-rnn): ``input.txt``, 1,115,394 bytes of Shakespeare.
* ``sst2``: GLUE's SST-2 (Socher et al., 2013; Wang et al., 2019), the zip of the GLUE download
  script, whose ``SST-2/train.tsv`` and ``SST-2/dev.tsv`` (``sentence<TAB>label``, labels 0/1)
  become ``train.tsv`` and ``dev.tsv``. A ``url`` not ending in ``.zip`` is a folder holding
  the two files (optionally ``.gz``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
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


# -- every data set by name ----------------------------------------------------------------------------
DATASETS = ("multi30k", "tinyshakespeare", "sst2")
DEFAULT_OUT = {"multi30k": "data/multi30k", "tinyshakespeare": "data/tinyshakespeare", "sst2": "data/sst2"}
"""Where the presets look for each data set (configs/*.yaml), so the default command needs no --set."""
TITLES = {"multi30k": "Multi30k", "tinyshakespeare": "Tiny Shakespeare", "sst2": "SST-2"}
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_BYTES = 1_115_394
"""The size of the upstream input.txt, checked only when downloading from upstream."""
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
"""The zip that GLUE's download_glue_data.py fetches (SST-2/train.tsv, dev.tsv, test.tsv, original/)."""
SST2_ROWS = {"train": 67349, "dev": 872}
"""Rows (header excluded) of the upstream files, checked only when downloading from upstream."""
SST2_SPLITS = ("train", "dev")


def fetch(name: str, out: str | os.PathLike, *, url: str | None = None, timeout: float = 60.0) -> list[Path]:
    """Download data set ``name`` (one of ``DATASETS``) into folder ``out``; return the files' paths.

    ``url`` replaces the upstream: multi30k's base URL, tinyshakespeare's file, sst2's zip (or a
    folder with train.tsv and dev.tsv). The upstream-only size checks run only without it.
    """
    if name not in DATASETS:
        raise DataError(f"name={name!r}: no such data set; qkv fetches {', '.join(DATASETS)}")
    if name == "multi30k":
        return fetch_multi30k(out, base_url=url or MULTI30K_URL, timeout=timeout)
    if name == "tinyshakespeare":
        return fetch_tinyshakespeare(out, url=url or TINYSHAKESPEARE_URL, timeout=timeout)
    return fetch_sst2(out, url=url or SST2_URL, timeout=timeout)


def how_to_fetch(name: str, *, out: str | os.PathLike | None = None) -> str:
    """The command that downloads data set ``name``: ``qkv data tinyshakespeare --out data/tinyshakespeare``."""
    if name not in DATASETS:
        raise DataError(f"name={name!r}: no such data set; qkv fetches {', '.join(DATASETS)}")
    return f"qkv data {name} --out {DEFAULT_OUT[name] if out is None else out}"


_MULTI30K_FILE = re.compile(r"(train|val|test_2016_flickr)\.(en|de|fr)")


def missing_file_hint(path: str | os.PathLike) -> str:
    """For a missing file that one of the fetchers writes, how to get it ("" for any other file)."""
    p = Path(path)
    if p.name == "input.txt":
        name = "tinyshakespeare"
    elif p.name in ("train.tsv", "dev.tsv") and p.parent.name.lower() in ("sst2", "sst-2"):
        name = "sst2"
    elif _MULTI30K_FILE.fullmatch(p.name):
        name = "multi30k"
    else:
        return ""
    return f"; if it is {TITLES[name]}, download it with: {how_to_fetch(name, out=p.parent)}"


# -- Tiny Shakespeare ----------------------------------------------------------------------------------
def fetch_tinyshakespeare(dest_dir: str | os.PathLike, *, url: str = TINYSHAKESPEARE_URL,
                          timeout: float = 60.0) -> list[Path]:
    """Make ``dest_dir/input.txt`` (UTF-8 text, checked; gunzipped if the download is gzip); keep a valid one."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    path, expected = dest / "input.txt", TINYSHAKESPEARE_BYTES if url == TINYSHAKESPEARE_URL else None
    if _present(path, lambda data: _check_text(data, str(path), None)):
        return [path]
    data = _maybe_gunzip(_download(url, timeout), url)
    _check_text(data, url, expected)
    atomic_write_bytes(path, data)
    logger.info("%s: downloaded %d bytes from %s", path, len(data), url)
    return [path]


def _check_text(data: bytes, name: str, expected_bytes: int | None) -> None:
    lines = parse_lines(data, name=name, allow_empty=True)
    if not any(line.strip() for line in lines):
        raise DataError(f"{name}: no text")
    if expected_bytes is not None and len(data) != expected_bytes:
        raise DataError(f"{name}: {len(data):,} bytes, but the upstream file has {expected_bytes:,}")


def _maybe_gunzip(data: bytes, url: str) -> bytes:
    return _decompress(data, url) if data[:2] == b"\x1f\x8b" else data


def _present(path: Path, check) -> bool:
    """Whether ``path`` exists and passes ``check(bytes)`` (a file that fails is downloaded again)."""
    if not path.exists():
        return False
    try:
        check(path.read_bytes())
    except DataError as e:
        logger.warning("%s: present but invalid (%s); downloading it again", path, e)
        return False
    logger.info("%s: present and valid, not downloading", path)
    return True


# -- SST-2 ---------------------------------------------------------------------------------------------
def fetch_sst2(dest_dir: str | os.PathLike, *, url: str = SST2_URL, timeout: float = 60.0) -> list[Path]:
    """Make ``dest_dir/train.tsv`` and ``dest_dir/dev.tsv`` from GLUE's SST-2 zip (or a folder of the two).

    Each is checked: UTF-8, a header with ``sentence`` and ``label``, every row as wide, labels
    0/1; from the upstream ``SST2_URL`` the row counts must match ``SST2_ROWS``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    expected = SST2_ROWS if url == SST2_URL else {}
    paths = {split: dest / f"{split}.tsv" for split in SST2_SPLITS}
    missing = [s for s, p in paths.items() if not _present(p, lambda data, p=p: _check_sst2(data, str(p), None))]
    if missing:
        for split, (name, data) in _sst2_files(url, missing, timeout).items():
            _check_sst2(data, name, expected.get(split))
            atomic_write_bytes(paths[split], data)
            logger.info("%s: written from %s", paths[split], name)
    return [paths[s] for s in SST2_SPLITS]


def _sst2_files(url: str, splits: list[str], timeout: float) -> dict[str, tuple[str, bytes]]:
    """split -> (where it came from, its bytes), from the zip at ``url`` or the folder ``url``."""
    if not url.endswith(".zip"):
        base = url.rstrip("/")
        return {s: (f"{base}/{s}.tsv", _maybe_gunzip(_download(f"{base}/{s}.tsv", timeout), f"{base}/{s}.tsv"))
                for s in splits}
    try:
        archive = zipfile.ZipFile(io.BytesIO(_download(url, timeout)))
    except zipfile.BadZipFile as e:
        raise DataError(f"{url}: not a valid zip file: {e}") from None
    with archive:
        return {s: (f"{url}!{member.filename}", _read_member(archive, member, url))
                for s in splits for member in [_member(archive, f"{s}.tsv", url)]}


def _member(archive: zipfile.ZipFile, name: str, url: str) -> zipfile.ZipInfo:
    """The shallowest member called ``name`` (SST-2/train.tsv, not SST-2/original/...)."""
    found = [m for m in archive.infolist() if not m.is_dir() and m.filename.rsplit("/", 1)[-1] == name]
    if not found:
        raise DataError(f"{url}: the zip holds no {name} (members: {archive.namelist()[:10]})")
    return min(found, key=lambda m: m.filename.count("/"))


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, url: str) -> bytes:
    """A member's bytes, refusing more than MAX_TEXT_BYTES whatever its header claims (a zip bomb)."""
    where = f"{url}!{member.filename}"
    if member.file_size > MAX_TEXT_BYTES:
        raise DataError(f"{where}: {member.file_size:,} bytes uncompressed, more than the limit of "
                        f"{MAX_TEXT_BYTES:,} (qkv.data.fetch.MAX_TEXT_BYTES)")
    try:
        with archive.open(member) as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{where}: cannot unzip: {e}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise DataError(f"{where}: decompresses to more than {MAX_TEXT_BYTES:,} bytes, the limit "
                        "(qkv.data.fetch.MAX_TEXT_BYTES); a zip bomb?")
    return data


def _check_sst2(data: bytes, name: str, expected_rows: int | None) -> None:
    """sentence<TAB>label with a header, labels 0/1 (GLUE's layout; the text may be any column)."""
    lines = parse_lines(data, name=name)
    header = lines[0].split("\t")
    if "sentence" not in header or "label" not in header:
        raise DataError(f"{name}:1: expected a header with 'sentence' and 'label' columns, got {header}")
    label = header.index("label")
    for i, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{name}:{i}: {len(fields)} fields, expected {len(header)} as in the header")
        if fields[label] not in ("0", "1"):
            raise DataError(f"{name}:{i}: label {fields[label]!r}, expected 0 or 1")
    if len(lines) < 2:
        raise DataError(f"{name}: has a header but no rows")
    if expected_rows is not None and len(lines) - 1 != expected_rows:
        raise DataError(f"{name}: {len(lines) - 1} rows, but the upstream file has {expected_rows}")
