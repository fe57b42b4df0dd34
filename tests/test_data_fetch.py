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


# -- fetch(name): Tiny Shakespeare and SST-2, from file:// and a local HTTP server ---------------------
SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
SST2 = {"train": "sentence\tlabel\nhide new secretions \t0\na gripping film \t1\n",
        "dev": "sentence\tlabel\nit 's a charming journey . \t1\n"}


def sst2_zip(path: Path, files: dict[str, str | bytes]) -> str:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("SST-2/original/README.txt", "the original release")
        archive.writestr("SST-2/original/train.tsv", "not the GLUE file")  # deeper: never chosen
        for name, content in files.items():
            archive.writestr(f"SST-2/{name}", content)
    return path.as_uri()


@pytest.fixture
def http_root(tmp_path):
    """A folder served by http.server on 127.0.0.1 (a thread); yields (folder, base URL)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_knows_three_data_sets_and_their_commands():
    assert fetch.DATASETS == ("multi30k", "tinyshakespeare", "sst2")
    assert fetch.how_to_fetch("tinyshakespeare") == "qkv data tinyshakespeare --out data/tinyshakespeare"
    assert fetch.how_to_fetch("sst2", out="d/x") == "qkv data sst2 --out d/x"
    with pytest.raises(DataError, match=r"name='imdb': no such data set; qkv fetches multi30k, tinyshakespeare"):
        fetch.fetch("imdb", "out")


def test_tinyshakespeare_over_http_keeps_empty_lines(tmp_path, http_root):
    root, base = http_root
    (root / "input.txt").write_text(SHAKESPEARE, encoding="utf-8")
    paths = fetch.fetch("tinyshakespeare", tmp_path / "out", url=f"{base}/input.txt")
    assert paths == [tmp_path / "out" / "input.txt"]
    assert paths[0].read_text(encoding="utf-8") == SHAKESPEARE


def test_tinyshakespeare_gzip_and_the_upstream_size_check(tmp_path, monkeypatch):
    mirror = tmp_path / "input.txt.gz"
    mirror.write_bytes(gzip.compress(SHAKESPEARE.encode()))
    out = tmp_path / "out"
    assert fetch.fetch("tinyshakespeare", out, url=mirror.as_uri())[0].read_text() == SHAKESPEARE
    (out / "input.txt").unlink()
    monkeypatch.setattr(fetch, "_download", lambda url, timeout: SHAKESPEARE.encode())
    with pytest.raises(DataError, match=r"input\.txt: 81 bytes, but the upstream file has 1,115,394"):
        fetch.fetch("tinyshakespeare", out)
    assert not (out / "input.txt").exists()


def test_tinyshakespeare_bad_bytes_name_the_url_and_line(tmp_path):
    mirror = tmp_path / "input.txt"
    mirror.write_bytes(b"ROMEO:\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"input\.txt:2: invalid UTF-8"):
        fetch.fetch("tinyshakespeare", tmp_path / "out", url=mirror.as_uri())


def test_sst2_from_the_glue_zip(tmp_path):
    url = sst2_zip(tmp_path / "SST-2.zip", {"train.tsv": SST2["train"], "dev.tsv": SST2["dev"],
                                             "test.tsv": "index\tsentence\n0\tx\n"})
    out = tmp_path / "out"
    assert fetch.fetch("sst2", out, url=url) == [out / "train.tsv", out / "dev.tsv"]
    assert (out / "train.tsv").read_text() == SST2["train"] and (out / "dev.tsv").read_text() == SST2["dev"]
    assert sorted(p.name for p in out.iterdir()) == ["dev.tsv", "train.tsv"]


def test_sst2_from_a_served_folder_and_present_files_kept(tmp_path, http_root, monkeypatch):
    root, base = http_root
    for split, text in SST2.items():
        (root / f"{split}.tsv").write_text(text)
    out = tmp_path / "out"
    fetch.fetch("sst2", out, url=base)
    assert (out / "dev.tsv").read_text() == SST2["dev"]

    def no_network(url, timeout):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(fetch, "_download", no_network)
    fetch.fetch("sst2", out, url=base)


@pytest.mark.parametrize(("train", "message"), [
    ("sentence\tlabel\na film\t2\n", r"train\.tsv:2: label '2', expected 0 or 1"),
    ("text\tlabel\na film\t1\n", r"train\.tsv:1: expected a header with 'sentence' and 'label'"),
    ("sentence\tlabel\na film\t1\textra\n", r"train\.tsv:2: 3 fields, expected 2"),
])
def test_sst2_checks_name_the_member_and_line(tmp_path, train, message):
    url = sst2_zip(tmp_path / "SST-2.zip", {"train.tsv": train, "dev.tsv": SST2["dev"]})
    with pytest.raises(DataError, match=message):
        fetch.fetch("sst2", tmp_path / "out", url=url)
    assert not (tmp_path / "out" / "train.tsv").exists()


def test_sst2_upstream_row_counts_and_bad_zip(tmp_path, monkeypatch):
    url = sst2_zip(tmp_path / "SST-2.zip", {"train.tsv": SST2["train"], "dev.tsv": SST2["dev"]})
    data = Path(url[len("file://"):]).read_bytes()
    monkeypatch.setattr(fetch, "_download", lambda url, timeout: data)
    with pytest.raises(DataError, match=r"SST-2/train\.tsv: 2 rows, but the upstream file has 67349"):
        fetch.fetch("sst2", tmp_path / "out")
    monkeypatch.setattr(fetch, "_download", lambda url, timeout: b"PK not a zip")
    with pytest.raises(DataError, match=r"SST-2\.zip: not a valid zip file"):
        fetch.fetch("sst2", tmp_path / "out")


def test_sst2_zip_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    url = sst2_zip(tmp_path / "SST-2.zip", {"train.tsv": "sentence\tlabel\n" + "a\t1\n" * 5000,
                                             "dev.tsv": SST2["dev"]})
    monkeypatch.setattr(fetch, "MAX_TEXT_BYTES", 1000)
    with pytest.raises(DataError, match=r"train\.tsv: 20,015 bytes uncompressed, more than the limit of 1,000"):
        fetch.fetch("sst2", tmp_path / "out", url=url)


def test_missing_default_data_names_the_fetch_command(tmp_path):
    for path, command in ((tmp_path / "data" / "input.txt", f"qkv data tinyshakespeare --out {tmp_path / 'data'}"),
                          (tmp_path / "sst2" / "dev.tsv", f"qkv data sst2 --out {tmp_path / 'sst2'}"),
                          (tmp_path / "m" / "val.de", f"qkv data multi30k --out {tmp_path / 'm'}")):
        with pytest.raises(DataError, match="no such file; if it is .*, download it with: ") as info:
            read_lines(path)
        assert str(info.value).endswith(command)
    with pytest.raises(DataError, match=r"notes\.txt: no such file$"):
        read_lines(tmp_path / "notes.txt")


def test_multi30k_through_fetch(tmp_path):
    url = make_mirror(tmp_path / "mirror", {**SMALL, "train.fr": "a\nb\nc\n", "val.fr": "d\n"})
    paths = fetch.fetch("multi30k", tmp_path / "out", url=url)
    assert [p.name for p in paths] == ["train.en", "train.de", "train.fr", "val.en", "val.de", "val.fr"]
