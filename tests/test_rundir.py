"""Run directories (issue 20): one object for the file names, the marker, the lock, resume checks,
good (finite) checkpoints, a half-written metrics line, evaluate writing into no run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qkv import checkpoint as ckpt
from qkv.cli import main
from qkv.errors import CheckpointError, ConfigError
from qkv.rundir import MARKER, RunDir, read_metrics
from tests.bad_inputs.conftest import TEXT, classification_config, lm_config
from tests.helpers import write_config

ROOT = Path(__file__).resolve().parents[1]


def lm_yaml(tmp: Path, **train) -> Path:
    (tmp / "text.txt").write_text(TEXT, encoding="utf-8")
    cfg = lm_config(tmp / "text.txt")
    cfg["train"].update(train)
    return write_config(tmp / "lm.yaml", cfg)


def test_names_come_from_one_object(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config == tmp_path / "r" / "config.json" and run.weights.name == "model.safetensors"
    assert run.checkpoint(12) == tmp_path / "r" / "checkpoints" / "step_00000012"
    assert run.latest == run.checkpoints / "latest" and run.metrics.name == "metrics.jsonl"
    assert run.file("labels.json") == tmp_path / "r" / "labels.json" and os.fspath(run) == str(tmp_path / "r")
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError, match="bare file name"):
            run.file(bad)


def test_new_run_writes_the_marker_first_and_a_failed_start_leaves_no_folder(tmp_path, capsys):
    config = lm_yaml(tmp_path, max_steps=1)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / MARKER).is_file() and RunDir(tmp_path / "run").is_run()
    # data that fails after the folder was made: the folder qkv created is removed again
    (tmp_path / "x").mkdir()
    bad = lm_yaml(tmp_path / "x", max_steps=1)
    (tmp_path / "x" / "text.txt").write_bytes(b"")
    assert main(["train", str(bad), "--out", str(tmp_path / "failed"), "--quiet"]) == 2
    assert not (tmp_path / "failed").exists()


def test_an_empty_folder_and_a_marker_only_folder_are_accepted(tmp_path):
    config = lm_yaml(tmp_path, max_steps=1)
    (tmp_path / "empty").mkdir()
    assert main(["train", str(config), "--out", str(tmp_path / "empty"), "--quiet"]) == 0
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / MARKER).write_bytes(b"")
    (tmp_path / "started" / "tokenizer.json").write_text("{}")  # a start that died before its config
    assert main(["train", str(config), "--out", str(tmp_path / "started"), "--quiet"]) == 0


def test_lock_refuses_a_second_holder_with_the_pid(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        assert run.lock_file.read_text().strip() == str(os.getpid())
        with pytest.raises(CheckpointError, match=rf"another qkv train is writing this run \(pid {os.getpid()}\)"):
            with run.lock():
                pass
    with run.lock():  # released when the block ends
        pass


def test_two_concurrent_trainers_the_second_is_refused(tmp_path):
    """A training subprocess holds the lock; a second trainer on the same run is refused, naming the run and pid."""
    config = lm_yaml(tmp_path, max_steps=100_000, save_every=1, eval_every=100_000)
    run = RunDir(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "qkv", "train", str(config), "--out", str(run), "--quiet"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt.latest_checkpoint(run.path) and run.lock_file.is_file()):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first trainer never saved a checkpoint"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "qkv", "train", str(config), "--out", str(run), "--resume",
                                 "--quiet"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert str(run) in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the lock with the process: the run resumes
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet", "--set",
                 f"train.max_steps={_step(ckpt.latest_checkpoint(run.path)) + 1}"]) == 0


def _step(checkpoint: Path) -> int:
    return json.loads((checkpoint / ckpt.META).read_text())["step"]


def test_resume_refused_without_checkpoint_and_restart_trains_again(tmp_path, capsys):
    config = lm_yaml(tmp_path, max_steps=2)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    shutil.rmtree(run / "checkpoints")
    final = (run / "model.safetensors").read_bytes()
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet"]) == 2
    assert "--restart" in capsys.readouterr().err and (run / "model.safetensors").read_bytes() == final
    assert main(["train", str(config), "--out", str(run), "--restart", "--quiet"]) == 0
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")[0] if r["split"] == "train"]
    assert steps == [1, 2]  # the first training's lines were dropped, not duplicated


def test_a_half_written_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    config = lm_yaml(tmp_path, max_steps=2)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')
    records, dropped = read_metrics(run / "metrics.jsonl")
    assert dropped and [r["step"] for r in records][-1] == 2
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet", "--set", "train.max_steps=3"]) == 0
    assert "unfinished last line" in caplog.text
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and json.loads(lines[-1])["step"] == 3


def test_rejected_resume_leaves_config_json_as_it_was(tmp_path, capsys):
    config = lm_yaml(tmp_path, max_steps=2)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    before = (run / "config.json").read_bytes()
    assert main(["train", str(config), "--out", str(run), "--resume", "--set", "model.n_layers=2"]) == 2
    assert (run / "config.json").read_bytes() == before
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 0  # still usable
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet", "--set", "train.max_steps=3"]) == 0


def test_good_checkpoint_skips_non_finite_weights(tmp_path):
    config = lm_yaml(tmp_path, max_steps=4, save_every=1, keep_checkpoints=4)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    saved = ckpt.list_checkpoints(run)
    weights = ckpt.read_weights(saved[-1] / ckpt.WEIGHTS)
    name = next(iter(weights))
    weights[name] = weights[name] * float("nan")
    ckpt.save_weights(weights, saved[-1] / ckpt.WEIGHTS)
    assert ckpt.latest_checkpoint(run) == saved[-1] and not ckpt.is_good(saved[-1])
    assert ckpt.good_checkpoint(run) == saved[-2]
    # resume goes on from the newest finite one
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet", "--set", "train.max_steps=5"]) == 0
    assert ckpt.is_good(ckpt.latest_checkpoint(run))


def test_an_infinite_learning_rate_stops_naming_the_newest_finite_checkpoint(tmp_path, capsys):
    """lr 1e30: the loss may stay finite for a step while the weights overflow; no such checkpoint is saved."""
    config = lm_yaml(tmp_path, max_steps=6, save_every=1, keep_checkpoints=6, lr=1e30, clip_grad_norm=0.0)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet", "--set", "train.warmup_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("not finite" in err or "the loss is" in err), err
    assert all(ckpt.is_good(p) for p in ckpt.list_checkpoints(run))
    good = ckpt.good_checkpoint(run)
    assert (str(good) in err) if good else "no good checkpoint" in err


def test_evaluate_writes_nothing_into_the_run(tmp_path, capsys):
    """confusion.json goes where --confusion says; the run (read-only here) is not touched."""
    config = write_config(tmp_path / "c.yaml", classification_config(tmp_path))
    run, data = tmp_path / "run", tmp_path / "valid.tsv"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    (run / "confusion.json").unlink(missing_ok=True)
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        capsys.readouterr()
        assert main(["evaluate", str(run), "--data", str(data), "--confusion", str(tmp_path / "c.json")]) == 0
        result = json.loads(capsys.readouterr().out)
        assert not (run / "confusion.json").exists()
        written = json.loads((tmp_path / "c.json").read_text())
        assert written["matrix"] == result["confusion"] and result["labels"] == written["labels"] == ["neg", "pos"]
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_config_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("null")
    with pytest.raises(CheckpointError, match="expected a JSON object, got null"):
        ckpt.read_config(tmp_path)


def test_prepare_new_refuses_a_foreign_folder_and_a_run(tmp_path):
    (tmp_path / "theirs.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a qkv run"):
        RunDir(tmp_path).prepare_new()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.txt"]
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir(tmp_path).prepare_new()


def test_train_state_shape_is_checked(tmp_path):
    (tmp_path / ckpt.STATE).write_bytes(b"")
    torch.save([1, 2], tmp_path / ckpt.STATE)
    with pytest.raises(CheckpointError, match="expected a dict, got list"):
        ckpt.load_train_state(tmp_path)
