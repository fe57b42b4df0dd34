"""Translation end to end through the CLI: train, translate, evaluate, and errors without tracebacks."""

import gzip
import json
import shutil

import pytest

import qkv
from qkv.cli import main
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on a copy task until it has learned it."""
    tmp = tmp_path_factory.mktemp("copy")
    data = write_copy_corpus(tmp / "data", n_train=1000, n_valid=30)
    cfg = tiny_translation_config(data, max_steps=450, lr=2e-3, warmup_steps=50, schedule="cosine",
                                  eval_every=450, save_every=225, label_smoothing=0.0, average_last=2)
    cfg["model"].update(d_model=64, d_ff=128, dropout=0.0, n_encoder_layers=2, n_decoder_layers=2)
    path = write_config(tmp / "copy.yaml", cfg)
    assert main(["train", str(path), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp


def test_copy_task_is_learned(trained, capsys):
    run, data = trained / "run", trained / "data"
    code = main(["evaluate", str(run), "--src", str(data / "val.src"), "--ref", str(data / "val.tgt"),
                 "--beam", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bleu"]["score"] > 75, result  # held-out sentences: it learned to copy, not to memorise
    assert result["bleu"]["signature"].startswith("nrefs:1")
    assert {"chrf", "tokenized_bleu"} <= set(result)


def test_translate_file_and_stdin(trained, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("the red dog runs\n\nblue cat sits on the ball\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["translate", str(trained / "run"), "--input", str(src), "--output", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == 3 and lines[1] == ""  # empty input lines stay empty and aligned
    assert lines[0] == "the red dog runs"
    assert sorted(lines[2].split()) == sorted("blue cat sits on the ball".split())
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a big house\n")))
    assert main(["translate", str(trained / "run"), "--beam", "1"]) == 0
    assert capsys.readouterr().out == "a big house\n"


def test_a_source_far_longer_than_training_is_refused_naming_its_line(trained, tmp_path, capsys):
    """data.max_len is 32 here: a line of 4 x 32 tokens and more is refused, fast, before any output."""
    src = tmp_path / "long.txt"
    src.write_text("the red dog runs\n" + " ".join(["blue"] * 400) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["translate", str(trained / "run"), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qkv: error: {src}:2: ") and "data.max_len" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_run_directory_describes_itself(trained):
    run = trained / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "translation" and config["model"]["src_vocab_size"] > 4
    for name in ("model.safetensors", "src_tokenizer.json", "tgt_tokenizer.json", "metrics.jsonl"):
        assert (run / name).is_file(), name


@pytest.mark.parametrize("problem", ["misaligned", "empty_line", "bad_utf8", "unknown_key", "long_line"])
def test_bad_training_input_is_one_clear_line(tmp_path, capsys, problem):
    data = write_copy_corpus(tmp_path / "data", n_train=20, n_valid=5)
    cfg = tiny_translation_config(data)
    src = data / "train.src"
    lines = src.read_text().splitlines()
    expected = "train.src"
    if problem == "misaligned":
        src.write_text("\n".join(lines[:-1]) + "\n")
        expected = "misaligned"
    elif problem == "empty_line":
        lines[6] = "   "
        src.write_text("\n".join(lines) + "\n")
        expected = "train.src:7"
    elif problem == "bad_utf8":
        src.write_bytes(("\n".join(lines[:3]) + "\n").encode() + b"caf\xe9\n" + ("\n".join(lines[4:]) + "\n").encode())
        expected = "train.src:4"
    elif problem == "unknown_key":
        cfg["model"]["d_modle"] = 3
        expected = "'d_modle'"
    elif problem == "long_line":
        lines[2] = " ".join(["dog"] * 60)
        src.write_text("\n".join(lines) + "\n")
        expected = "train.src:3"
    path = write_config(tmp_path / "c.yaml", cfg)
    code = main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert err.startswith("qkv: error:") and err.count("\n") == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_skip_empty_drops_pairs(tmp_path):
    data = write_copy_corpus(tmp_path / "data", n_train=20, n_valid=5)
    lines = (data / "train.tgt").read_text().splitlines()
    lines[3] = ""
    (data / "train.tgt").write_text("\n".join(lines) + "\n")
    cfg = tiny_translation_config(data, max_steps=2, save_every=2)
    cfg["data"]["skip_empty"] = True
    path = write_config(tmp_path / "c.yaml", cfg)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0


def test_commands_on_wrong_directories(tmp_path, capsys):
    assert main(["translate", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["translate", str(tmp_path)]) == 2
    assert "not a qkv run directory" in capsys.readouterr().err
    assert main(["train", "configs/multi30k-en-de.yaml", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_cli_resume_continues(tmp_path, capsys):
    data = write_copy_corpus(tmp_path / "data", n_train=20, n_valid=5)
    path = write_config(tmp_path / "c.yaml", tiny_translation_config(data, max_steps=4))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2  # never overwrites
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--resume", "--quiet",
                 "--set", "train.max_steps=6"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir()


def test_data_command_fetches_from_a_mirror(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split, n in (("train", 4), ("val", 2)):
        for lang in ("en", "de", "fr"):
            with gzip.open(mirror / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(f"{lang} sentence {i}\n" for i in range(n)))
    out = tmp_path / "multi30k"
    assert main(["data", "multi30k", "--out", str(out), "--url", mirror.as_uri()]) == 0
    assert (out / "train.de").read_text(encoding="utf-8").count("\n") == 4
    shutil.rmtree(mirror)
    assert main(["data", "multi30k", "--out", str(tmp_path / "other"), "--url", mirror.as_uri()]) == 2
    assert "qkv: error:" in capsys.readouterr().err



def test_evaluate_ticks_the_active_progress_from_the_decoding_loop(trained, monkeypatch):
    """qkv evaluate's progress line is moved by the loop that does the work: every sentence is counted."""
    import io

    from qkv import progress

    seen = []
    run, data = trained / "run", trained / "data"
    n = len((data / "val.src").read_text(encoding="utf-8").splitlines())
    line = progress.Progress(desc="evaluate", unit="sentence", every_n=7, stream=io.StringIO(), bar=False)
    monkeypatch.setattr(line, "_emit", lambda now: seen.append((line.done, line.total)))
    with progress.active(line):
        qkv.load(run).evaluate(src=str(data / "val.src"), ref=str(data / "val.tgt"), beam=1)
    assert line.done == line.total == n and seen and seen[-1] == (n, n)
