"""The catalogue, round two (issue 20): run directories, tampered run files, resume, command-line
values. Each case goes through the CLI in-process and must end with exit status 2, one line
``qkv: error: ...`` naming the file, key or flag at fault, no traceback, and nothing written: every
file under the case's folder has the same bytes afterwards and no file appeared or went away.

A case is ``build(tmp, runs) -> (argv, expected)`` as in test_catalogue.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from qkv.cli import main
from tests.bad_inputs.conftest import lm_config
from tests.bad_inputs.test_catalogue import copy_run, lines_file
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and symlink target) under ``folder``."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            key = str(path.relative_to(folder))
            out[key] = os.readlink(path) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def edit_json(path: Path, change) -> Path:
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(change(data)), encoding="utf-8")
    return path


def run_config(run: Path) -> Path:
    return run / "config.json"


def resume(run: Path, *extra: str) -> list[str]:
    return ["train", str(run_config(run)), "--out", str(run), "--resume", "--quiet", *extra]


# -- builders: run directories ---------------------------------------------------------------------
def foreign_folder(tmp: Path, runs):
    """--out names a folder of the user's (their own model.safetensors and notes)."""
    out = tmp / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"my own weights")
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    data = write_copy_corpus(tmp / "data", n_train=20, n_valid=4)
    config = write_config(tmp / "c.yaml", tiny_translation_config(data, max_steps=1))
    return ["train", str(config), "--out", str(out), "--quiet"], [str(out), "not a qkv run", "not empty"]


def out_is_a_file(tmp: Path, runs):
    (tmp / "afile").write_text("x", encoding="utf-8")
    data = write_copy_corpus(tmp / "data", n_train=20, n_valid=4)
    config = write_config(tmp / "c.yaml", tiny_translation_config(data, max_steps=1))
    return ["train", str(config), "--out", str(tmp / "afile"), "--quiet"], ["--out", "afile", "not a folder"]


def resume_bad_override(tmp: Path, runs):
    """--set model.d_model=32 passes the config's checks, but the weights do not fit: refused before
    config.json is rewritten (it used to be, leaving the run unusable)."""
    run = copy_run(runs, "lm", tmp)
    return resume(run, "--set", "model.d_model=32"), ["model.safetensors", "shape"]


def resume_without_checkpoint(tmp: Path, runs):
    """A finished run whose checkpoints/ was deleted: not retrained over its final model."""
    run = copy_run(runs, "lm", tmp)
    shutil.rmtree(run / "checkpoints")
    return resume(run), [str(run), "nothing to resume", "--restart", "model.safetensors"]


def resume_only_nonfinite_checkpoint(tmp: Path, runs):
    run = copy_run(runs, "lm", tmp)
    _poison(next(run.glob("checkpoints/step_*/model.safetensors")))
    return resume(run), [str(run), "no finite weights", "--restart"]


def resume_missing_config_path(tmp: Path, runs):
    run = copy_run(runs, "lm", tmp)
    return ["train", str(tmp / "gone.yaml"), "--out", str(run), "--resume"], ["gone.yaml", "stored config"]


def resume_config_of_another_task(tmp: Path, runs):
    run = copy_run(runs, "lm", tmp)
    data = write_copy_corpus(tmp / "data", n_train=20, n_valid=4)
    config = write_config(tmp / "c.yaml", tiny_translation_config(data))
    return ["train", str(config), "--out", str(run), "--resume"], ["c.yaml", "'translation'", "'lm'"]


def resume_nothing(tmp: Path, runs):
    (tmp / "empty").mkdir()
    text = tmp / "t.txt"
    text.write_text("hello there\n" * 20, encoding="utf-8")
    config = write_config(tmp / "lm.yaml", lm_config(text))
    return ["train", str(config), "--out", str(tmp / "empty"), "--resume"], ["empty", "not a qkv run directory"]


# -- builders: tampered run files ------------------------------------------------------------------
def config_json(value: str, family: str = "lm", command: str = "generate"):
    def build(tmp: Path, runs):
        run = copy_run(runs, family, tmp)
        run_config(run).write_text(value, encoding="utf-8")
        argv = [command, str(run)] + (["--input", lines_file(tmp, b"good\n")] if command == "classify" else [])
        return argv, ["config.json", "malformed config"]
    return build


def short_labels(tmp: Path, runs):
    run = copy_run(runs, "classification", tmp)
    (run / "labels.json").write_text('["neg"]', encoding="utf-8")
    return ["classify", str(run), "--input", lines_file(tmp, b"good film\n")], ["labels.json", "n_classes=2"]


def short_image_classes(tmp: Path, runs):
    run = copy_run(runs, "image", tmp)
    edit_json(run / "images.json", lambda d: {**d, "label_names": d["label_names"][:1]})
    return ["evaluate", str(run)], ["images.json", "n_classes=2"]


def train_state(value, expected: str):
    def build(tmp: Path, runs):
        run = copy_run(runs, "lm", tmp)
        for state in run.glob("checkpoints/*/train_state.pt"):
            torch.save(value, state)
        return resume(run, "--set", "train.max_steps=4"), ["train_state.pt", expected]
    return build


def metrics_bad_middle_line(tmp: Path, runs):
    run = copy_run(runs, "lm", tmp)
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    lines.insert(1, '{"step": 1, "spl')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return resume(run, "--set", "train.max_steps=4"), ["metrics.jsonl:2"]


def vocabulary_mismatch(family: str, keys: tuple[str, ...], command: list[str]):
    """config.json's vocabulary size no longer fits the tokenizer file: found at load, before output."""
    key = keys[0]

    def build(tmp: Path, runs):
        run = copy_run(runs, family, tmp)
        edit_json(run_config(run), lambda d: {**d, "model": {**d["model"], **{k: d["model"][k] + 1 for k in keys}}})
        extra = ["--input", lines_file(tmp, b"good\n")] if command[0] in ("translate", "classify") else []
        return [command[0], str(run), *command[1:], *extra], ["tokenizer", f"model.{key}"]
    return build


# -- builders: command-line values and inputs ------------------------------------------------------
def flag(command: str, family: str, *extra: str, expected: list[str]):
    def build(tmp: Path, runs):
        argv = [command, str(runs[family]), *extra]
        if command in ("translate", "classify", "embed") and "--input" not in extra:
            argv += ["--input", lines_file(tmp, b"good\n")]
        return argv, expected
    return build


def over_long_input(tmp: Path, runs):
    from qkv.tasks.inference import MAX_INPUT_CHARS

    long = b"dog " * (MAX_INPUT_CHARS // 4 + 1)
    return ["translate", str(runs["translation"]), "--input", lines_file(tmp, b"the dog\n" + long + b"\n")], \
        ["input.txt:2", "characters"]


def _poison(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(path))


CASES = {
    # run directories: --out and --resume
    "out_is_a_foreign_folder": foreign_folder,
    "out_is_a_file": out_is_a_file,
    "resume_override_that_does_not_fit": resume_bad_override,
    "resume_without_checkpoint": resume_without_checkpoint,
    "resume_only_nonfinite_checkpoint": resume_only_nonfinite_checkpoint,
    "resume_config_path_missing": resume_missing_config_path,
    "resume_config_of_another_task": resume_config_of_another_task,
    "resume_folder_without_run": resume_nothing,
    # tampered run files
    "run_config_null": config_json("null"),
    "run_config_list": config_json("[1, 2]"),
    "run_config_string": config_json('"lm"', "classification", "classify"),
    "run_config_number": config_json("3", "translation", "evaluate"),
    "labels_json_short": short_labels,
    "images_json_short": short_image_classes,
    "train_state_list": train_state([1, 2, 3], "expected a dict, got list"),
    "train_state_without_progress": train_state({"optimizer": {}, "rng": {}}, "'progress'"),
    "train_state_bad_step": train_state({"optimizer": {}, "rng": {}, "progress": {"step": "x"}}, "step"),
    "metrics_bad_middle_line": metrics_bad_middle_line,
    "vocab_mismatch_lm": vocabulary_mismatch("lm", ("vocab_size",), ["generate", "--prompt", "HA"]),
    "vocab_mismatch_translation": vocabulary_mismatch("translation", ("src_vocab_size", "tgt_vocab_size"),
                                                      ["translate"]),
    "vocab_mismatch_classifier": vocabulary_mismatch("classification", ("vocab_size",), ["classify"]),
    # command-line values
    "batch_size_zero": flag("classify", "classification", "--batch-size", "0", expected=["--batch-size", "0"]),
    "batch_size_negative": flag("embed", "classification", "--batch-size", "-3", "--output", "e.npy",
                                expected=["--batch-size", "-3"]),
    "batch_size_not_a_number": flag("classify", "classification", "--batch-size", "many",
                                    expected=["--batch-size", "'many'"]),
    "max_tokens_zero": flag("attention", "translation", "--text", "the dog", "--out", "a.png", "--max-tokens", "0",
                            expected=["--max-tokens"]),
    "beam_negative": flag("translate", "translation", "--beam", "-2", expected=["--beam", "-2"]),
    "evaluate_beam_zero": flag("evaluate", "translation", "--beam", "0", expected=["--beam"]),
    "unknown_flag": flag("translate", "translation", "--bogus", expected=["--bogus", "unrecognized"]),
    "unknown_command": lambda t, r: (["transalte", "x"], ["transalte", "invalid choice"]),
    "missing_argument": lambda t, r: (["train"], ["config", "qkv train"]),
    "bad_choice": flag("evaluate", "image", "--split", "train", expected=["--split", "'train'"]),
    "over_long_input_line": over_long_input,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_run_file_or_argument(name, runs, tmp_path, capsys, monkeypatch):
    argv, expected = CASES[name](tmp_path, runs)
    monkeypatch.chdir(tmp_path)  # a relative --output (e.npy, a.png) would land here
    before = tree(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr: {err}"
    assert err.startswith("qkv: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, f"{piece!r} not in {err!r}"
    assert tree(tmp_path) == before, "something was written"


def test_second_catalogue_is_large_enough():
    assert len(CASES) >= 30
