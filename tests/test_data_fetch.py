"""Fetching Multi30k from a local mirror through file:// URLs (qkv.data.fetch)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from qkv.data import fetch
from qkv.data.fetch import MULTI30K_URL, fetch_multi30k
from qkv.data.text import read_lines
from qkv.errors import DataError

MULTI30K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "multi30k"

SMALL = {
    "train.en": "A dog runs.\nTwo men talk.\nA girl sings.\n",
    "train.de": "Ein Hund rennt.\nZwei Männer reden.\nEin Mädchen singt.\n",
    "val.en": "A cat sleeps.\n",
    "val.de": "Eine Katze schläft.\n",
}


def make_mirror(root: Path, files: dict[str, str | bytes]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (root / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
    return root.as_uri()


def test_fetch_from_mirror_writes_checked_files(tmp_path):
    url = make_mirror(tmp_path / "mirror", SMALL)
    paths = fetch_multi30k(tmp_path / "out", base_url=url, langs=("en", "de"))
    assert paths == [tmp_path / "out" / name for name in ("train.en", "train.de", "val.en", "val.de")]
    for name, content in SMALL.items():
        assert (tmp_path / "out" / name).read_text(encoding="utf-8") == content
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SMALL)  # no temp files left


def test_present_valid_files_are_not_downloaded_again(tmp_path, monkeypatch):
    url = make_mirror(tmp_path / "mirror", SMALL)
    fetch_multi30k(tmp_path / "out", base_url=url, langs=("en", "de"))

    def no_network(url, timeout):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(fetch, "_download", no_network)
    fetch_multi30k(tmp_path / "out", base_url=url, langs=("en", "de"))


def test_present_invalid_file_is_downloaded_again(tmp_path):
    url = make_mirror(tmp_path / "mirror", SMALL)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.de").write_bytes(b"Ein Hund\n\n")  # damaged: an empty line
    fetch_multi30k(out, base_url=url, splits=("train",), langs=("en", "de"))
    assert (out / "train.de").read_text(encoding="utf-8") == SMALL["train.de"]


def test_missing_remote_file_names_the_url(tmp_path):
    url = make_mirror(tmp_path / "mirror", SMALL)
    with pytest.raises(DataError, match=r"train\.fr\.gz: download failed"):
        fetch_multi30k(tmp_path / "out", base_url=url, langs=("en", "fr"))


def test_unreachable_host_names_the_url(tmp_path):
    with pytest.raises(DataError, match=r"http://127\.0\.0\.1:9/x/train\.en\.gz: download failed"):
        fetch_multi30k(tmp_path / "out", base_url="http://127.0.0.1:9/x", langs=("en",), timeout=5)


def test_bad_gzip_names_the_url(tmp_path):
    mirror = tmp_path / "mirror"
    url = make_mirror(mirror, SMALL)
    (mirror / "val.en.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"val\.en\.gz: not a valid gzip file"):
        fetch_multi30k(tmp_path / "out", base_url=url, splits=("val",), langs=("en",))


def test_bad_utf8_names_url_and_line(tmp_path):
    url = make_mirror(tmp_path / "mirror", {**SMALL, "val.de": b"ok\nkaputt \xff\n"})
    with pytest.raises(DataError, match=r"val\.de\.gz:2: invalid UTF-8"):
        fetch_multi30k(tmp_path / "out", base_url=url, splits=("val",), langs=("en", "de"))
    assert not (tmp_path / "out" / "val.de").exists()


def test_misaligned_split_names_both_files_and_counts(tmp_path):
    url = make_mirror(tmp_path / "mirror", {**SMALL, "train.de": "Ein Hund rennt.\nZwei Männer reden.\n"})
    with pytest.raises(DataError) as info:
        fetch_multi30k(tmp_path / "out", base_url=url, splits=("train",), langs=("en", "de"))
    message = str(info.value)
    assert "'train' is misaligned" in message
    assert "train.en: 3" in message and "train.de: 2" in message


def serve_from(mirror: Path, monkeypatch) -> None:
    """Answer upstream URLs from a local mirror, so the upstream-only checks run offline."""

    def download(url, timeout):
        assert url.startswith(MULTI30K_URL)
        return (mirror / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(fetch, "_download", download)


def test_upstream_line_counts_are_checked(tmp_path, monkeypatch):
    make_mirror(tmp_path / "mirror", SMALL)
    serve_from(tmp_path / "mirror", monkeypatch)
    with pytest.raises(DataError, match=r"train\.en\.gz: 3 lines, but the upstream file has 29000"):
        fetch_multi30k(tmp_path / "out", langs=("en", "de"))


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k is absent")
def test_real_multi30k_through_the_upstream_checks(tmp_path, monkeypatch):
    names = [f"{split}.{lang}" for split in ("train", "val") for lang in ("en", "de")]
    make_mirror(tmp_path / "mirror", {name: (MULTI30K / name).read_bytes() for name in names})
    serve_from(tmp_path / "mirror", monkeypatch)
    out = tmp_path / "out"
    assert fetch_multi30k(out, langs=("en", "de")) == [out / name for name in names]
    assert len(read_lines(out / "train.de")) == 29000 and len(read_lines(out / "val.en")) == 1014
    assert (out / "val.de").read_bytes() == (MULTI30K / "val.de").read_bytes()
