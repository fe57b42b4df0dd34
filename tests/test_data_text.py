"""Strict readers: lines, TSV tables and parallel corpora (qkv.data.text, qkv.data.parallel)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qkv.data.parallel import ParallelCorpus, read_parallel, read_parallel_tsv
from qkv.data.text import atomic_write_text, read_lines, read_tsv
from qkv.errors import DataError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MULTI30K = DATA / "multi30k"
SST2 = DATA / "sst2"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_reads_lines_with_and_without_final_newline(tmp_path):
    assert read_lines(write(tmp_path, "a.txt", b"one\ntwo\n")) == ["one", "two"]
    assert read_lines(write(tmp_path, "b.txt", b"one\ntwo")) == ["one", "two"]


def test_bom_is_stripped_and_crlf_endings_dropped(tmp_path):
    path = write(tmp_path, "bom.txt", "\ufeffÄpfel\r\nBirnen\r\n".encode())
    assert read_lines(path) == ["Äpfel", "Birnen"]


@pytest.mark.parametrize("sep", ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\u2028", "\u2029", "\u0085"])
def test_characters_other_tools_split_on_are_errors(tmp_path, sep):
    """Python's splitlines() and many tools end a line there: parallel files would fall out of step."""
    path = write(tmp_path, "x.txt", f"c\na{sep}b\n".encode())
    with pytest.raises(DataError, match=r"x.txt:2: .* at character 1 of the line"):
        read_lines(path)


def test_lone_cr_inside_crlf_line_is_an_error(tmp_path):
    with pytest.raises(DataError, match="x.txt:1: a lone carriage return"):
        read_lines(write(tmp_path, "x.txt", b"a\rb\r\nc\r\n"))


def test_allow_empty_keeps_empty_lines(tmp_path):
    assert read_lines(write(tmp_path, "x.txt", b"a\n\n \nb\n"), allow_empty=True) == ["a", "", " ", "b"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"ok\nalso ok\nbad \xff byte\n", ["x.txt:3:", "invalid UTF-8", "byte 4 of the line", "file offset 15"]),
        (b"ok\n\xc3\n", ["x.txt:2:", "invalid UTF-8", "byte 0 of the line", "file offset 3"]),
        (b"ok\nnul\x00here\n", ["x.txt:2:", "NUL byte", "byte 3 of the line"]),
        (b"ok\n\nmore\n", ["x.txt:2:", "empty line"]),
        (b"ok\r\n\r\nmore\r\n", ["x.txt:2:", "empty line"]),
        ("ok\nfine\n \t\u3000\n".encode(), ["x.txt:3:", "whitespace-only"]),
        (b"", ["x.txt", "empty"]),
        (b"\xef\xbb\xbf", ["x.txt", "empty"]),
        (b"\n", ["x.txt:1:", "empty line"]),
        ("\ufeffa\n".encode("utf-16"), ["x.txt:1:", "UTF-16"]),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, data, expected):
    path = write(tmp_path, "x.txt", data)
    with pytest.raises(DataError) as info:
        read_lines(path)
    for part in expected:
        assert part in str(info.value)


def test_bad_byte_line_number_is_exact_after_bom_and_crlf(tmp_path):
    path = write(tmp_path, "x.txt", b"\xef\xbb\xbfa\r\nb c\r\nd\xe2\x80\r\n")
    with pytest.raises(DataError, match=r"x\.txt:3: invalid UTF-8 at byte 1 of the line \(file offset 12"):
        read_lines(path)


def test_overlong_line(tmp_path):
    path = write(tmp_path, "x.txt", "short\nüberlang\n".encode())
    assert read_lines(path, max_chars=8) == ["short", "überlang"]  # characters, not bytes
    with pytest.raises(DataError, match=r"x\.txt:2: line has 8 characters, more than max_chars=7"):
        read_lines(path, max_chars=7)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        read_lines(tmp_path / "nope.txt")


def test_atomic_write_leaves_only_the_file(tmp_path):
    atomic_write_text(tmp_path / "out.txt", "a\n")
    atomic_write_text(tmp_path / "out.txt", "b\n")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert read_lines(tmp_path / "out.txt") == ["b"]


# --- TSV ---------------------------------------------------------------------------------


def test_read_tsv_with_header(tmp_path):
    table = read_tsv(write(tmp_path, "t.tsv", b"label\tsentence\n0\tbad film\n1\tgood film\n"))
    assert table.columns == ("label", "sentence")
    assert table.rows == [("0", "bad film"), ("1", "good film")]
    assert table.line_of(1) == 3
    assert table.column_index("sentence") == 1 and table.column_index(0) == 0


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"a\tb\n1\t2\n3\n", r"t\.tsv:3: 1 fields, expected 2"),
        (b"a\tb\n1\t2\n3\t4\t5\n", r"t\.tsv:3: 3 fields, expected 2"),
        (b"a\ta\n1\t2\n", r"t\.tsv:1: header has duplicate"),
        (b"a\t\n1\t2\n", r"t\.tsv:1: header has an empty column"),
        (b"a\tb\n", r"t\.tsv: has a header but no rows"),
    ],
)
def test_read_tsv_errors(tmp_path, data, expected):
    with pytest.raises(DataError, match=expected):
        read_tsv(write(tmp_path, "t.tsv", data))


def test_read_tsv_without_header_counts_from_line_one(tmp_path):
    path = write(tmp_path, "t.tsv", b"1\t2\n3\t4\n5\n")
    with pytest.raises(DataError, match=r"t\.tsv:3: 1 fields, expected 2 as in line 1"):
        read_tsv(path, header=False)


@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/sst2 is absent")
def test_sst2_reads_strictly():
    # The header's text column is "sentence" in train.tsv but "content" in dev.tsv.
    for name, rows, text_col in (("train.tsv", 67349, "sentence"), ("dev.tsv", 872, "content")):
        table = read_tsv(SST2 / name)
        assert table.columns == ("label", text_col)
        assert len(table.rows) == rows
        assert {row[0] for row in table.rows} == {"0", "1"}


# --- parallel corpora --------------------------------------------------------------------


def test_read_parallel_pairs_lines(tmp_path):
    src = write(tmp_path, "c.en", b"A dog runs.\nTwo men talk.\n")
    tgt = write(tmp_path, "c.de", "Ein Hund rennt.\nZwei Männer reden.\n".encode())
    corpus = read_parallel(src, tgt)
    assert isinstance(corpus, ParallelCorpus)
    assert list(corpus) == [("A dog runs.", "Ein Hund rennt."), ("Two men talk.", "Zwei Männer reden.")]
    assert len(corpus) == 2 and corpus[1][1] == "Zwei Männer reden." and corpus.skipped == ()
    assert corpus.lines == (1, 2)
    assert corpus.src == ["A dog runs.", "Two men talk."]


def test_read_parallel_misaligned_names_both_files_and_counts(tmp_path):
    src = write(tmp_path, "c.en", b"a\nb\nc\n")
    tgt = write(tmp_path, "c.de", b"x\ny\n")
    with pytest.raises(DataError) as info:
        read_parallel(src, tgt)
    message = str(info.value)
    assert "c.en has 3 lines" in message and "c.de has 2" in message and "c.en:3" in message
    with pytest.raises(DataError, match=r"c\.en:3 is the first line without a partner"):
        read_parallel(tgt, src)


def test_read_parallel_unicode_separator_is_an_error_not_a_misalignment(tmp_path):
    src = write(tmp_path, "c.en", "a\u2028b\nc\n".encode())
    tgt = write(tmp_path, "c.de", b"x\ny\n")
    with pytest.raises(DataError, match=r"c\.en:1: LINE SEPARATOR \(U\+2028\)"):
        read_parallel(src, tgt)


def test_read_parallel_empty_line_is_an_error_naming_file_line(tmp_path):
    src = write(tmp_path, "c.en", b"a\nb\nc\n")
    tgt = write(tmp_path, "c.de", b"x\n\nz\n")
    with pytest.raises(DataError, match=r"c\.de:2: empty line"):
        read_parallel(src, tgt)


def test_read_parallel_skip_empty_drops_logs_and_records(tmp_path, caplog):
    src = write(tmp_path, "c.en", b"a\n  \nc\nd\n")
    tgt = write(tmp_path, "c.de", b"w\nx\ny\n\n")
    with caplog.at_level(logging.WARNING, logger="qkv.data.parallel"):
        corpus = read_parallel(src, tgt, skip_empty=True)
    assert corpus.pairs == [("a", "w"), ("c", "y")]
    assert corpus.skipped == (2, 4) and corpus.lines == (1, 3)
    assert "skipped 2 of 4 pairs" in caplog.text


def test_read_parallel_checks_max_chars(tmp_path):
    src = write(tmp_path, "c.en", b"a\n" + b"b" * 50 + b"\n")
    tgt = write(tmp_path, "c.de", b"x\ny\n")
    with pytest.raises(DataError, match=r"c\.en:2: line has 50 characters"):
        read_parallel(src, tgt, max_chars=40)


def test_read_parallel_tsv_by_name_and_index(tmp_path):
    path = write(tmp_path, "p.tsv", b"id\ten\tde\n1\tA dog.\tEin Hund.\n2\tA cat.\tEine Katze.\n")
    by_name = read_parallel_tsv(path, src_col="en", tgt_col="de")
    by_index = read_parallel_tsv(path, src_col=1, tgt_col=2)
    assert by_name.pairs == by_index.pairs == [("A dog.", "Ein Hund."), ("A cat.", "Eine Katze.")]
    no_header = write(tmp_path, "n.tsv", b"A dog.\tEin Hund.\n")
    assert read_parallel_tsv(no_header, src_col=0, tgt_col=1, header=False).pairs == [("A dog.", "Ein Hund.")]


@pytest.mark.parametrize(
    "data, kwargs, expected",
    [
        (b"en\tde\na\tx\nb\n", {}, r"p\.tsv:3: 1 fields, expected 2"),
        (b"en\tde\na\tx\nb\t \n", {}, r"p\.tsv:3: empty cell in column 'de'"),
        (b"en\tde\na\tx\n", {"src_col": "fr"}, r"src_col='fr'.*p\.tsv:1: header has no such column"),
        (b"en\tde\na\tx\n", {"tgt_col": 5}, r"tgt_col=5: .*p\.tsv has 2 columns"),
        (b"a\tx\n", {"header": False}, r"src_col='en': .*without a header"),
        (b"en\tde\na\tx\n", {"tgt_col": "en"}, r"same column"),
    ],
)
def test_read_parallel_tsv_errors(tmp_path, data, kwargs, expected):
    path = write(tmp_path, "p.tsv", data)
    with pytest.raises(DataError, match=expected):
        read_parallel_tsv(path, **{"src_col": "en", "tgt_col": "de", **kwargs})


def test_read_parallel_tsv_skip_empty_records_file_lines(tmp_path):
    path = write(tmp_path, "p.tsv", b"en\tde\na\tx\n\ty\nc\tz\n")
    corpus = read_parallel_tsv(path, src_col="en", tgt_col="de", skip_empty=True)
    assert corpus.pairs == [("a", "x"), ("c", "z")]
    assert corpus.skipped == (3,) and corpus.lines == (2, 4)


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k is absent")
def test_multi30k_reads_strictly_and_aligned():
    train = read_parallel(MULTI30K / "train.en", MULTI30K / "train.de")
    val = read_parallel(MULTI30K / "val.en", MULTI30K / "val.de")
    assert len(train) == 29000 and len(val) == 1014
    assert train[0] == (
        "Two young, White males are outside near many bushes.",
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    )
