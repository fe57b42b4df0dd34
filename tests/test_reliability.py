"""Faults (issue 11): SIGKILL at random moments during training, a full disk and a read-only folder
during a save. Every time the last complete checkpoint must stay intact and ``--resume`` must go on
from it. docs/reliability.md describes the cases.

The kill trials fork the test process (torch and qkv already imported), so a trial costs the
training it runs, not an interpreter start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from qkv import checkpoint as ckpt
from qkv.cli import main
from tests.bad_inputs.conftest import TEXT, lm_config
from tests.helpers import write_config

KILL_TRIALS = 50


def kill_config(tmp: Path, **train) -> Path:
    (tmp / "text.txt").write_text(TEXT, encoding="utf-8")
    cfg = lm_config(tmp / "text.txt")
    cfg["train"].update({"max_steps": 100_000, "save_every": 1, "eval_every": 100_000, "log_every": 1,
                         "keep_checkpoints": 3, **train})
    return write_config(tmp / "lm.yaml", cfg)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def check_complete(checkpoint: Path) -> int:
    """A checkpoint is complete when its weights, training state and meta all read back."""
    meta = json.loads((checkpoint / ckpt.META).read_text())
    weights = ckpt.read_weights(checkpoint / ckpt.WEIGHTS)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    state = ckpt.load_train_state(checkpoint)
    assert isinstance(state, dict)
    assert checkpoint.name == f"step_{meta['step']:08d}"
    return meta["step"]


def run_and_kill(argv: list[str], delay: float) -> int:
    """Fork, run ``qkv`` in the child, SIGKILL it after ``delay`` seconds; the child's exit status."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            code = main(argv)
        finally:
            os._exit(code)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_random_moments_never_loses_the_last_checkpoint(tmp_path):
    # torch's optimizers import torch._dynamo on first use (seconds): do it once here, before forking
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    config = kill_config(tmp_path)
    run = tmp_path / "run"
    rng = random.Random(11)
    killed_after_save, last_step = 0, 0
    for _ in range(KILL_TRIALS):
        resume = (run / ckpt.CONFIG).exists()
        before = ckpt.latest_checkpoint(run) if resume else None
        intact = digest(before) if before is not None else None
        # --restart: a trial killed before the first save has no checkpoint, and trains again from step 0
        again = ["--resume", "--restart"] if resume else []
        run_and_kill(["train", str(config), "--out", str(run), "--quiet", *again],
                     rng.uniform(0.05, 1.2))
        latest = ckpt.latest_checkpoint(run)
        if latest is None:
            assert before is None
            continue
        step = check_complete(latest)
        assert step >= last_step, "the latest checkpoint went backwards"
        killed_after_save += step > last_step
        last_step = step
        # the checkpoint we resumed from is untouched, or rotated away only in favour of newer ones
        if before is not None and before.exists():
            assert digest(before) == intact
        assert len(ckpt.list_checkpoints(run)) <= 3 + 1  # rotation keeps 3 (+ the one being protected)
    assert killed_after_save >= KILL_TRIALS // 10, "too few trials got as far as a save to test anything"
    # and the run finishes from where it stands
    final = last_step + 3
    assert main(["train", str(config), "--out", str(run), "--quiet", "--resume",
                 "--set", f"train.max_steps={final}"]) == 0
    assert check_complete(ckpt.latest_checkpoint(run)) == final
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def fail_on_save(monkeypatch, error: int, *, after: int = 1) -> None:
    """Make the ``after``-th weights save (and later ones) fail half-way with OSError(error)."""
    real = ckpt.save_file
    calls = {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] < after:
            return real(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(ckpt, "save_file", save_file)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, error):
    """A full disk (ENOSPC) or a folder turned read-only (EACCES, EROFS) during a save."""
    config = kill_config(tmp_path, max_steps=4, save_every=2)
    run = tmp_path / "run"
    fail_on_save(monkeypatch, error, after=2)  # step 2 saves, step 4 fails
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "step_00000004" in err and os.strerror(error) in err, err
    assert "step_00000002" in err  # the message says which checkpoint is intact
    latest = ckpt.latest_checkpoint(run)
    assert check_complete(latest) == 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written files
    monkeypatch.undo()
    assert main(["train", str(config), "--out", str(run), "--quiet", "--resume"]) == 0
    assert check_complete(ckpt.latest_checkpoint(run)) == 4


def test_read_only_output_folder_is_reported(tmp_path, capsys):
    """A real read-only folder (skipped as root, for whom permission bits do not apply)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: a read-only folder is still writable (the simulated test above covers it)")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        config = kill_config(tmp_path, max_steps=2, save_every=2)
        assert main(["train", str(config), "--out", str(folder / "run"), "--quiet"]) == 2
        assert "ro" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)
