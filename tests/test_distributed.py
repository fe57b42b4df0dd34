"""Training under torchrun: 2 CPU processes (gloo) against one process with the same global batch.

N ranks with ``accumulate`` 1 see, step for step, the batches one process sees with
``accumulate`` N (qkv.train's docstring), so with dropout off the losses and the weights must
agree up to the order of float additions. Runs go through the real launcher and the real CLI
(``torchrun -m qkv train``). Those are marked ``distributed`` (about 3 minutes on 2 cores):
``make test-distributed`` runs them, ``make test`` only the sharding checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qkv import checkpoint as ckpt
from qkv import rundir
from qkv.cli import main
from qkv.data.classification import class_balanced_batches, sentence_batches
from qkv.data.lm import RandomBlocks
from tests.helpers import WORDS, tiny_translation_config, write_config, write_copy_corpus

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
RTOL, ATOL = 1e-4, 1e-6  # fp32: two processes add the same numbers in another order


def torchrun(*args: str, restarts: int = 0, env: dict | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               f"--max-restarts={restarts}", "--monitor-interval", "0.2", *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # its own process group, so that a timeout takes the workers down too (no orphans blocked in gloo)
    proc = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def train_ddp(config: Path, out: Path, *extra: str) -> None:
    done = torchrun("-m", "qkv", "train", str(config), "--out", str(out), "--quiet", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["run_dir"] == str(out)  # printed once, by rank 0
    assert len(done.stdout.strip().splitlines()) == 1


def train_single(config: Path, out: Path, *extra: str) -> None:
    assert main(["train", str(config), "--out", str(out), "--quiet", "--device", "cpu", *extra]) == 0


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def key_bias_rows(name: str, t: torch.Tensor) -> slice | None:
    """The key-bias entries of an attention projection's bias (qkv_proj: q | k | v; kv_proj: k | v), or None.

    softmax(q . (k + b_k)) ignores b_k (the shift q . b_k is the same for every key), so its gradient
    is zero in exact arithmetic and only rounding noise is left, which Adam's first steps
    (lr * g / (|g| + eps)) turn into full-size updates. One process (the fused loss of a bare model)
    and DDP (the loss through forward) round differently, so these entries drift apart by noise
    without changing what the model computes; they are compared loosely.
    """
    if name.endswith("qkv_proj.bias"):
        third = t.shape[0] // 3
        return slice(third, 2 * third)
    if name.endswith("kv_proj.bias"):
        return slice(0, t.shape[0] // 2)
    return None


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        x, y = a[name].clone(), b[name].clone()
        rows = key_bias_rows(name, x)
        if rows is not None:  # no-op parameters: equal to a loose tolerance, then left out of the exact check
            assert torch.allclose(x[rows], y[rows], atol=1e-2), (name, (x[rows] - y[rows]).abs().max())
            x[rows] = y[rows] = 0
        assert torch.allclose(x, y, rtol=RTOL, atol=ATOL), (name, (x - y).abs().max())
        worst = max(worst, float((x - y).abs().max()))
    return worst


def assert_same_training(single: Path, ddp: Path, *, single_weights: Path | None = None) -> float:
    """Losses step by step and the final weights agree; returns the largest weight difference."""
    ls, ld = train_losses(single), train_losses(ddp)
    common = sorted(set(ls) & set(ld))
    assert common == sorted(ld), (sorted(ls), sorted(ld))
    assert [ld[s] for s in common] == pytest.approx([ls[s] for s in common], rel=RTOL, abs=1e-5)
    weights = ckpt.read_weights(single_weights or single / ckpt.WEIGHTS)
    diff = max_difference(weights, ckpt.read_weights(ddp / ckpt.WEIGHTS))
    print(f"\n{ddp.name}: max |weight difference| after {max(common)} steps = {diff:.2e}")
    return diff


# -- sharding: every example once per epoch, the same global order as one process --------------------
def test_sharded_batches_cover_the_epoch_once():
    for n in (7, 10, 33):
        shards = [sentence_batches(n, 3, seed=0, epoch=1, rank=r, world_size=2) for r in range(2)]
        assert len(shards[0]) == len(shards[1])
        assert sorted(i for shard in shards for b in shard for i in b) == list(range(n))  # no repeats
    labels = [0] * 20 + [1] * 13
    shards = [class_balanced_batches(labels, 6, 3, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # ceil(33 / 6) = 6 batches, dealt out
    ids = torch.arange(500)
    one = RandomBlocks(ids, block_size=8, batch_size=2, n_batches=6, seed=3, epoch=1)
    two = [RandomBlocks(ids, block_size=8, batch_size=2, n_batches=3, seed=3, epoch=1, rank=r, world_size=2)
           for r in range(2)]
    for i in range(6):  # rank r's batch j is batch 2j + r of the single process
        assert torch.equal(one[i]["x"], two[i % 2][i // 2]["x"])


# -- translation: DDP, FSDP2, checkpoints across world sizes, a lost worker ----------------------------
@pytest.fixture(scope="module")
def translation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("translation")
    data = write_copy_corpus(tmp / "data", n_train=600)  # 16 batches of one epoch, an even count
    config = tiny_translation_config(data, max_steps=8, save_every=4, log_every=1)
    config["model"]["dropout"] = 0.0
    path = write_config(tmp / "translation.yaml", config)
    train_single(path, tmp / "single", "--set", "train.accumulate=2", "--set", "train.max_steps=12")
    train_ddp(path, tmp / "ddp")
    return tmp, path


@pytest.mark.distributed
def test_ddp_translation_equals_one_process(translation):
    tmp, _ = translation
    # the single run went on to step 12; its step-8 checkpoint is the comparison
    assert_same_training(tmp / "single", tmp / "ddp", single_weights=tmp / "single/checkpoints/step_00000008"
                         / ckpt.WEIGHTS)
    assert [p.name for p in ckpt.list_checkpoints(tmp / "ddp")] == ["step_00000004", "step_00000008"]
    # no debris from a second writer: the only dot files are the run's marker and its training lock
    assert sorted(p.name for p in (tmp / "ddp").glob("**/.*")) == sorted([rundir.MARKER, rundir.LOCK])


@pytest.mark.distributed
def test_fsdp_translation_equals_one_process_and_resumes(translation):
    tmp, path = translation
    train_ddp(path, tmp / "fsdp", "--set", "train.parallel=fsdp")
    assert_same_training(tmp / "single", tmp / "fsdp", single_weights=tmp / "single/checkpoints/step_00000008"
                         / ckpt.WEIGHTS)
    # its step-4 checkpoint (gathered from the shards) resumed sharded, and by one process
    for name in ("fsdp_resumed", "fsdp_then_one"):
        shutil.copytree(tmp / "fsdp", tmp / name)
        shutil.rmtree(tmp / name / "checkpoints" / "step_00000008")
        (tmp / name / "checkpoints" / "latest").unlink()
        (tmp / name / ckpt.WEIGHTS).unlink()
    train_ddp(path, tmp / "fsdp_resumed", "--resume")
    train_single(path, tmp / "fsdp_then_one", "--resume", "--set", "train.accumulate=2")
    for name in ("fsdp_resumed", "fsdp_then_one"):
        diff = max_difference(ckpt.read_weights(tmp / "fsdp" / ckpt.WEIGHTS),
                              ckpt.read_weights(tmp / name / ckpt.WEIGHTS))
        print(f"FSDP step-4 checkpoint -> {name}, step 8: max |weight difference| = {diff:.2e}")


@pytest.mark.distributed
def test_checkpoints_cross_world_sizes(translation):
    tmp, path = translation
    # a DDP checkpoint resumed by one process (accumulate 2 keeps the global batch)
    shutil.copytree(tmp / "ddp", tmp / "ddp_then_one")
    train_single(path, tmp / "ddp_then_one", "--resume", "--set", "train.accumulate=2", "--set", "train.max_steps=12")
    diff = max_difference(ckpt.read_weights(tmp / "single" / ckpt.WEIGHTS),
                          ckpt.read_weights(tmp / "ddp_then_one" / ckpt.WEIGHTS))
    print(f"\nDDP checkpoint -> one process, step 12: max |weight difference| = {diff:.2e}")
    # a one-process checkpoint resumed by two processes
    train_single(path, tmp / "one_then_ddp", "--set", "train.accumulate=2", "--set", "train.max_steps=4")
    train_ddp(path, tmp / "one_then_ddp", "--resume", "--set", "train.accumulate=1", "--set", "train.max_steps=8")
    diff = max_difference(ckpt.read_weights(tmp / "ddp" / ckpt.WEIGHTS),
                          ckpt.read_weights(tmp / "one_then_ddp" / ckpt.WEIGHTS))
    print(f"one-process checkpoint -> DDP, step 8: max |weight difference| = {diff:.2e}")
    assert sorted(train_losses(tmp / "one_then_ddp")) == list(range(1, 9))  # no gap, no duplicate


@pytest.mark.distributed
def test_lost_worker_restarts_and_resumes(translation, tmp_path):
    tmp, path = translation
    out = tmp_path / "killed"
    done = torchrun(str(WORKER), "train", str(path), "--out", str(out), "--quiet", restarts=1,
                    env={"QKV_TEST_KILL": "1:6", "QKV_TEST_PIDS": str(tmp_path)})
    (tmp_path / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank_1_attempt_1.pid").exists()  # the job did restart
    assert "resumed from" in done.stderr and "step 4" in done.stderr
    straight, resumed = ckpt.read_weights(tmp / "ddp" / ckpt.WEIGHTS), ckpt.read_weights(out / ckpt.WEIGHTS)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # exact resume: bit-identical
    assert sorted(train_losses(out)) == list(range(1, 9))


@pytest.mark.distributed
def test_lost_worker_without_restarts_ends_the_job(translation, tmp_path):
    _, path = translation
    start = time.monotonic()
    done = torchrun(str(WORKER), "train", str(path), "--out", str(tmp_path / "run"), "--quiet", restarts=0,
                    env={"QKV_TEST_KILL": "1:3", "QKV_TEST_PIDS": str(tmp_path)}, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode != 0 and elapsed < 60, (done.returncode, elapsed)
    pids = [int(p.read_text()) for p in tmp_path.glob("rank_*.pid")]
    assert len(pids) == 2
    for pid in pids:  # no worker left behind, blocked in a collective
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    print(f"\n--max-restarts=0: torchrun exited {done.returncode} after {elapsed:.1f} s")


# -- the other families ------------------------------------------------------------------------------
def lm_config(tmp: Path) -> Path:
    text = "".join(f"{w} {i} and {WORDS[i % len(WORDS)]}\n" for i, w in enumerate(WORDS * 30))
    (tmp / "text.txt").write_text(text, encoding="utf-8")
    return write_config(tmp / "lm.yaml", {
        "task": "lm",
        "data": {"train": [str(tmp / "text.txt")], "tokenizer": "char", "batch_size": 4, "eval_batches": 2,
                 "batches_per_epoch": 6},  # even: the epoch ends at the same place for 1 and 2 processes
        "model": {"block_size": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine", "warmup_steps": 2, "max_steps": 6,
                  "label_smoothing": 0.0, "eval_every": 6, "save_every": 6, "log_every": 1},
    })


def labelled_config(tmp: Path, task: str) -> Path:
    rows = [(("neg", "pos")[i % 2], " ".join([WORDS[(i * 7) % len(WORDS)], ("bad", "good")[i % 2],
                                              WORDS[(i * 3) % len(WORDS)]])) for i in range(128)]
    for split, part in (("train", rows), ("valid", rows[:20])):
        (tmp / f"{split}.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in part), encoding="utf-8")
    return write_config(tmp / f"{task}.yaml", {
        "task": task,
        "data": {"train": str(tmp / "train.tsv"), "valid": str(tmp / "valid.tsv"), "vocab_size": 60,
                 "min_frequency": 1, "max_len": 8, "batch_size": 16},  # 8 batches an epoch: even
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "max_len": 8, "dropout": 0.0,
                  "attn_dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "constant", "warmup_steps": 1, "max_steps": 6,
                  "eval_every": 6, "save_every": 6, "log_every": 1, "label_smoothing": 0.0},
    })


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["lm", "classification", "embedding"])
def test_ddp_equals_one_process(family, tmp_path):
    config = lm_config(tmp_path) if family == "lm" else labelled_config(tmp_path, family)
    train_single(config, tmp_path / "single", "--set", "train.accumulate=2")
    train_ddp(config, tmp_path / "ddp")
    assert_same_training(tmp_path / "single", tmp_path / "ddp")
