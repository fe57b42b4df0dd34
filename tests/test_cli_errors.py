"""One top-level handler (issue 20 item 4) and streamed inputs (item 3): every failure is one line;
bugs say "internal error" (exit 1) and --debug / QKV_DEBUG=1 show the traceback; closed streams and
broken pipes end without one; `yes | qkv classify RUN` answers as it reads."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qkv import commands
from qkv.cli import main
from tests.bad_inputs.conftest import classification_config
from tests.helpers import write_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cls")
    config = write_config(tmp / "c.yaml", classification_config(tmp))
    assert main(["train", str(config), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def boom(args):
    raise RuntimeError("something broke\ninside")


def test_a_bug_is_one_line_internal_error_with_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_plot", boom)
    monkeypatch.delenv("QKV_DEBUG", raising=False)
    assert main(["plot", "x"]) == 1
    err = capsys.readouterr().err
    assert err == ("qkv: internal error: RuntimeError: something broke inside (rerun with --debug for the "
                   "traceback)\n")


@pytest.mark.parametrize("argv, env", [(["--debug", "plot", "x"], None), (["plot", "x", "--debug"], None),
                                       (["plot", "x"], "1"), (["plot", "-v", "x"], None)])
def test_debug_before_or_after_the_command_or_qkv_debug_shows_the_traceback(monkeypatch, capsys, argv, env):
    monkeypatch.setattr(commands, "cmd_plot", boom)
    if env:
        monkeypatch.setenv("QKV_DEBUG", env)
    else:
        monkeypatch.delenv("QKV_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something broke" in err
    assert err.splitlines()[-1].startswith("qkv: internal error: RuntimeError")


def test_user_errors_keep_exit_2_and_debug_adds_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QKV_DEBUG", raising=False)
    assert main(["generate", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["generate", str(tmp_path / "nowhere"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("qkv: error: ") and "nowhere" in err


@pytest.mark.parametrize("argv, piece", [(["translate"], "run_dir"), (["train", "c.yaml", "--out"], "--out"),
                                         (["generate", "r", "--top-k", "x"], "--top-k"), ([], "command")])
def test_argparse_errors_are_one_line_with_exit_2(capsys, argv, piece):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and piece in err and "usage" not in err


def test_help_still_exits_0(capsys):
    assert main(["translate", "--help"]) == 0
    assert "--input" in capsys.readouterr().out


def test_verbose_after_the_command_turns_on_debug_logging(classifier, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n", encoding="utf-8")
    assert main(["classify", str(classifier), "--input", str(texts), "-v"]) == 0


def qkv(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkv", *args], env=ENV, capture_output=True, timeout=300, **kwargs)


def test_closed_stdout_and_stdin_are_one_line_errors(classifier, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n", encoding="utf-8")
    run = str(classifier)
    done = subprocess.run(f"{sys.executable} -m qkv classify {run} --input {texts} >&-", shell=True, env=ENV,
                          capture_output=False, stderr=subprocess.PIPE, timeout=300)
    assert done.returncode == 2 and done.stderr.decode() == \
        "qkv: error: standard output is closed; give --output FILE\n"
    done = subprocess.run(f"{sys.executable} -m qkv classify {run} <&-", shell=True, env=ENV,
                          capture_output=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode() == "qkv: error: <stdin>: standard input is closed; give --input FILE\n"


def test_a_broken_pipe_ends_quietly(classifier, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n" * 5000, encoding="utf-8")
    done = subprocess.run(f"{sys.executable} -m qkv classify {classifier} --input {texts} | head -n 1", shell=True,
                          env=ENV, capture_output=True, timeout=300)
    assert done.stdout.decode().count("\n") == 1
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr


def test_stdin_is_streamed_yes_gets_answers_before_its_end(classifier):
    """An endless stdin (as `yes 'good film' | qkv classify RUN`): the first labels come back while the
    writer is still writing, and the child's memory stays bounded (RLIMIT_AS would stop a reader of all)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    child = subprocess.Popen([sys.executable, "-m", "qkv", "classify", str(classifier)], env=ENV,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    written, stop = [0], threading.Event()

    def feed():
        line = b"good film number 7\n" * 1000
        try:
            while not stop.is_set():
                child.stdin.write(line)
                written[0] += len(line)
        except (BrokenPipeError, ValueError, OSError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        start = time.monotonic()
        first = [child.stdout.readline() for _ in range(300)]  # more than one chunk
        seconds = time.monotonic() - start
        assert child.poll() is None, child.stderr.read().decode()
        assert all(line.split(b"\t")[0] in (b"pos", b"neg") for line in first), first[:3]
        assert seconds < 120 and written[0] > 0
    finally:
        stop.set()
        child.kill()
        child.wait()
        writer.join(timeout=10)


def test_input_lines_streams_and_names_lines():
    from qkv.errors import DataError
    from qkv.tasks.inference import chunked, input_lines

    stream = io.BufferedReader(io.BytesIO(b"a\n\nc\n" + b"y" * 11 + b"\n"))
    items = input_lines(stream, name="<stdin>", max_chars=10)
    assert [next(items), next(items), next(items)] == [("<stdin>:1", "a"), ("<stdin>:2", ""), ("<stdin>:3", "c")]
    with pytest.raises(DataError, match="<stdin>:4: line has 11 characters"):
        next(items)
    assert list(input_lines(io.BufferedReader(io.BytesIO(b"")), name="f")) == []
    assert [len(c) for c in chunked(range(7), 3)] == [3, 3, 1]


def test_over_long_stdin_line_is_named(classifier, monkeypatch, capsys):
    from qkv.tasks.inference import MAX_INPUT_CHARS

    data = b"good\n" + b"x" * (MAX_INPUT_CHARS + 5) + b"\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    assert main(["classify", str(classifier)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("qkv: error: <stdin>:2: line has 100005 characters"), captured.err
