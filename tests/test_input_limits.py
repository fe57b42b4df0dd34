"""Bounded inputs (issue 20, item 3): image pixel limits, gzip and download limits, line ends and line length.

The memory bombs run the reader in a child process under ``resource.setrlimit(RLIMIT_AS)``, so a
regression fails fast with a MemoryError instead of eating the machine.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from qkv.data import fetch, images
from qkv.data.fetch import MAX_TEXT_BYTES, fetch_multi30k
from qkv.data.images import MAX_IMAGE_PIXELS, read_image, read_npz
from qkv.data.lm import read_text
from qkv.data.text import MAX_LINE_CHARS, parse_lines, read_lines
from qkv.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30


def run_under_memory_limit(code: str, *, limit: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose address space is capped at ``limit`` bytes."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    """The child printed ``DataError: <one line>`` holding every part (and no traceback)."""
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip()
    assert out.startswith("DataError: ") and "\n" not in out, out
    for part in parts:
        assert part in out, out
    return out


# -- text: line ends and line length -----------------------------------------------------------
SPLITLINES_BREAKS = sorted(c for c in map(chr, range(0x110000)) if len(f"a{c}b".splitlines()) == 2)


def test_the_break_list_is_what_splitlines_splits_on():
    assert [f"U+{ord(c):04X}" for c in SPLITLINES_BREAKS] == [
        "U+000A", "U+000B", "U+000C", "U+000D", "U+001C", "U+001D", "U+001E", "U+0085", "U+2028", "U+2029"]


@pytest.mark.parametrize("char", [c for c in SPLITLINES_BREAKS if c != "\n"], ids=lambda c: f"U+{ord(c):04X}")
def test_every_splitlines_break_is_refused_naming_file_and_line(tmp_path, char):
    path = tmp_path / "x.txt"
    path.write_bytes(f"fine\nalso fine\nhalf{char}half\nmore\n".encode())
    with pytest.raises(DataError, match=rf"^{path}:3: .* at character 4 of the line; other tools split lines"):
        read_lines(path)
    with pytest.raises(DataError, match=r"^<stdin>:3: "):
        parse_lines(path.read_bytes(), name="<stdin>", allow_empty=True)
    with pytest.raises(DataError, match=rf"^{path}:3: "):
        read_text(path)  # language-model text goes through the same check


def test_over_long_line_names_file_and_line(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(b"short\n" + "é".encode() * (MAX_LINE_CHARS + 1) + b"\nshort\n")
    with pytest.raises(DataError, match=rf"^{path}:2: line has {MAX_LINE_CHARS + 1} characters, more than the limit"):
        read_lines(path)


def test_line_at_the_limit_is_read(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_bytes("水".encode() * MAX_LINE_CHARS + b"\r\nb\n")
    lines = read_lines(path)
    assert len(lines[0]) == MAX_LINE_CHARS and lines[1] == "b"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b""])
def test_max_chars_message_counts_the_whole_line_without_holding_it(tmp_path, newline):
    """A line far past the read window is counted in chunks: the message is exact (4-byte characters too)."""
    path = tmp_path / "x.txt"
    path.write_bytes(b"ok\n" + "a😀".encode() * 300_000 + newline + (b"next\n" if newline else b""))
    with pytest.raises(DataError, match=rf"^{path}:2: line has 600000 characters, more than max_chars=10$"):
        read_lines(path, max_chars=10)


def test_lines_are_unchanged_by_streaming(tmp_path):
    data = "\ufeffα\r\nβ γ\n\nlast".encode()
    path = tmp_path / "x.txt"
    path.write_bytes(data)
    expected = ["α", "β γ", "", "last"]
    assert read_lines(path, allow_empty=True) == parse_lines(data, name="x", allow_empty=True) == expected


def test_a_1_5gb_line_fails_fast_under_a_1gb_memory_limit(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:  # sparse: costs no disk
        f.truncate(3 * GB // 2)
    code = f"""
    from qkv.data.text import read_lines
    from qkv.errors import DataError
    try:
        read_lines({str(path)!r}, max_chars=4096)
    except DataError as err:
        print("DataError:", err)
    """
    one_line_error(run_under_memory_limit(code, limit=GB, timeout=120), f"{path}:1: line has {3 * GB // 2} characters")


# -- images: pixel limits -------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black greyscale PNG, compressed row by row (a 200-megapixel one is ~200 KB)."""
    deflate = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    idat = io.BytesIO()
    for _ in range(height // 100):
        idat.write(deflate.compress(row * 100))
    idat.write(deflate.compress(row * (height % 100)) + deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat.getvalue())
                     + png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    path = blank_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20_000, 10_000)
    assert path.stat().st_size < 400_000
    return path


def test_200_megapixel_png_is_one_data_error_under_a_memory_limit(bomb_png):
    code = f"""
    from qkv.data.images import read_image
    from qkv.errors import DataError
    try:
        read_image({str(bomb_png)!r}, size=8, channels=1, resize=True)
    except DataError as err:
        print("DataError:", err)
    """
    one_line_error(run_under_memory_limit(code, limit=GB), str(bomb_png), "200,000,000 pixels",
                   f"more than the limit of {MAX_IMAGE_PIXELS:,}")


@pytest.mark.parametrize("pil_limit", [None, 10**12, 1000])
def test_pixel_limit_holds_whatever_pillows_global_is(tmp_path, monkeypatch, pil_limit):
    """Between Pillow's limit and twice it Pillow only warns; with it set to None it checks nothing."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50_000)
    path = blank_png(tmp_path / "big.png", 300, 200)  # 60,000 pixels
    message = rf"^{path}: image has 60,000 pixels( \(300x200\))?, more than the limit of 50,000"
    with pytest.raises(DataError, match=message):
        read_image(path, size=8, channels=1, resize=True)


def test_image_under_the_limit_is_read(tmp_path):
    path = blank_png(tmp_path / "ok.png", 16, 16)
    assert read_image(path, size=8, channels=1, resize=True).shape == (8, 8, 1)
    assert 16 * 16 < MAX_IMAGE_PIXELS


def test_npz_that_unpacks_past_the_limit_is_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((50, 100, 100), dtype=np.uint8), y=np.zeros(50, dtype=np.int64))
    monkeypatch.setattr(images, "MAX_NPZ_BYTES", 100_000)
    with pytest.raises(DataError, match=rf"^{path}: its arrays unpack to [0-9,]+ bytes, more than the limit of 100,0"):
        read_npz(path)
    monkeypatch.setattr(images, "MAX_NPZ_BYTES", 10_000_000)
    assert read_npz(path)[0].shape == (50, 100, 100, 1)


# -- qkv data --url: download and gzip limits -----------------------------------------------------
def gzip_members(member: bytes, copies: int) -> bytes:
    return gzip.compress(member, compresslevel=9) * copies


def test_gzip_bomb_stops_at_the_limit_under_a_memory_limit(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train.en.gz").write_bytes(gzip_members(b"a" * (16 << 20), 80))  # 1.3 GB of text from ~1 MB
    assert (mirror / "train.en.gz").stat().st_size < 4_000_000
    code = f"""
    from qkv.data.fetch import fetch_multi30k
    from qkv.errors import DataError
    try:
        fetch_multi30k({str(tmp_path / "out")!r}, base_url={mirror.as_uri()!r}, splits=("train",), langs=("en",))
    except DataError as err:
        print("DataError:", err)
    """
    one_line_error(run_under_memory_limit(code, limit=GB), "train.en.gz", f"more than {MAX_TEXT_BYTES:,} bytes")
    assert not (tmp_path / "out" / "train.en").exists()


def test_gzip_limit_is_exact_and_multi_member_files_are_read(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train.en.gz").write_bytes(gzip_members(b"one line\n", 3))  # 27 bytes in three members
    monkeypatch.setattr(fetch, "MAX_TEXT_BYTES", 27)
    fetch_multi30k(tmp_path / "out", base_url=mirror.as_uri(), splits=("train",), langs=("en",))
    assert read_lines(tmp_path / "out" / "train.en") == ["one line"] * 3
    monkeypatch.setattr(fetch, "MAX_TEXT_BYTES", 26)
    (tmp_path / "out" / "train.en").unlink()
    with pytest.raises(DataError, match=r"train\.en\.gz: decompresses to more than 26 bytes"):
        fetch_multi30k(tmp_path / "out", base_url=mirror.as_uri(), splits=("train",), langs=("en",))


def test_truncated_gzip_is_a_data_error(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train.en.gz").write_bytes(gzip.compress(b"a line\n" * 1000)[:-12])
    with pytest.raises(DataError, match=r"train\.en\.gz: not a valid gzip file"):
        fetch_multi30k(tmp_path / "out", base_url=mirror.as_uri(), splits=("train",), langs=("en",))


def test_download_over_the_size_limit_names_the_url(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train.en.gz").write_bytes(gzip.compress(os.urandom(5000)))
    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(DataError, match=r"train\.en\.gz: .*more than (the limit of )?1,000"):
        fetch_multi30k(tmp_path / "out", base_url=mirror.as_uri(), splits=("train",), langs=("en",))


def test_download_limit_without_a_stated_length(monkeypatch):
    """A server that sends no Content-Length is read up to the limit and no further."""

    class Response(io.BytesIO):
        headers: dict = {}
        asked: list = []

        def read(self, size=-1):
            self.asked.append(size)
            return super().read(size)

    served = Response(b"x" * 5000)
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: served)
    with pytest.raises(DataError, match=r"^http://h/f\.gz: more than 1,000 bytes"):
        fetch._download("http://h/f.gz", 5, limit=1000)
    assert served.asked == [1001]
