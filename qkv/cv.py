"""K-fold cross-validation of an image recipe: choose hyper-parameters without looking at the test set.

Small image sets leave a validation split too small to tell recipes apart (180 digits: one image
is 0.56 points, and a good model gets them all right). ``cross_validate`` trains the same config
K times; run k holds out fold k of the images that are not test (``data.cv_folds=K``,
``data.cv_fold=k``; qkv.data.images.split_indices) and is scored on it. Every non-test image is
held out exactly once, so the pooled accuracy rests on all of them (1,438 digits), and the test
set, fixed by the split seed and fractions alone, is never read.

Each fold is a full ``qkv train`` run in its own process (``jobs`` of them at once) under
OUT/fold_k, with its log in OUT/fold_k.log. A fold whose run already finished is reused and one
that stopped part-way is resumed, so an interrupted cross-validation continues where it stopped.
The result goes to OUT/cv.json:

    {"config", "overrides", "folds", "metric", "per_fold": [{"fold", "run_dir", "examples",
     "<metric>"}], "mean", "std", "pooled", "seconds"}

``pooled`` is the example-weighted mean over folds (for accuracy: correct / all held-out images).

Selecting the final model on the held-out fold (``train.patience`` > 0 picks the best
checkpoint by validation accuracy) scores the fold with a model chosen on it, which flatters the
estimate; the result says so (``"selection_on_held_out_fold": true``). Recipes compared this
way should end with the last checkpoint or ``train.average_last`` of them.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qkv.config import write_json
from qkv.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

METRIC = {"image_classification": "accuracy", "image_embedding": "nn_accuracy"}


def fold_overrides(folds: int, fold: int) -> list[str]:
    return [f"data.cv_folds={folds}", f"data.cv_fold={fold}"]


def check_config(config: str | Path, overrides: list[str], folds: int):
    """The config with fold 0's overrides, checked before anything is trained; raises ConfigError."""
    from qkv.run import load_config

    if folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    if any(o.split("=", 1)[0].strip() in ("data.cv_folds", "data.cv_fold") for o in overrides):
        raise ConfigError("--set data.cv_folds / data.cv_fold: cross-validation sets these itself (use --folds)")
    task = load_config(config, overrides).task
    if task not in METRIC:
        raise ConfigError(f"{config}: cross-validation needs an image task ({' or '.join(METRIC)}), "
                          f"got task {task!r}")
    return load_config(config, [*overrides, *fold_overrides(folds, 0)])


def train_fold(config: str | Path, out: Path, folds: int, fold: int, overrides: list[str], *,
               threads: int | None, device: str | None) -> Path:
    """Train (or reuse, or resume) fold ``fold`` in a child process; returns its run directory."""
    from qkv.checkpoint import WEIGHTS

    run_dir = out / f"fold_{fold}"
    if (run_dir / WEIGHTS).exists():
        log.info("fold %d: reusing the finished run %s", fold, run_dir)
        return run_dir
    command = [sys.executable, "-m", "qkv", "train", str(config), "--out", str(run_dir), "--quiet"]
    for item in [*overrides, *fold_overrides(folds, fold)]:
        command += ["--set", item]
    if (run_dir / "config.json").exists():
        command.append("--resume")
    if threads is not None:
        command += ["--threads", str(threads)]
    if device is not None:
        command += ["--device", device]
    log_path = out / f"fold_{fold}.log"
    log.info("fold %d/%d: training in %s (log: %s)", fold + 1, folds, run_dir, log_path)
    with open(log_path, "a", encoding="utf-8") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise TrainingError(f"fold {fold}: training failed (exit {done.returncode}); see {log_path}: {tail[0]}")
    return run_dir


def score_fold(run_dir: Path, metric: str) -> dict:
    """The finished run's final model on its held-out fold."""
    from qkv.run import load_run
    from qkv.tasks.vision import evaluate_run

    cfg, model, artifacts = load_run(run_dir, device="cpu")
    with torch.no_grad():
        result = evaluate_run(cfg, model, artifacts, run_dir, split="valid")
    return {"examples": result["examples"], metric: result[metric]}


def cross_validate(config: str | Path, out: str | Path, *, folds: int, overrides: list[str] = (), jobs: int = 1,
                   threads: int | None = None, device: str | None = None) -> dict:
    """Train and score ``folds`` runs of ``config``; writes and returns OUT/cv.json's contents."""
    overrides = list(overrides)
    cfg = check_config(config, overrides, folds)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    metric, out, start = METRIC[cfg.task], Path(out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # the work happens in child processes
        runs = list(pool.map(lambda k: train_fold(config, out, folds, k, overrides, threads=threads,
                                                  device=device), range(folds)))
    per_fold = [{"fold": k, "run_dir": str(run_dir), **score_fold(run_dir, metric)} for k, run_dir in enumerate(runs)]
    values = [f[metric] for f in per_fold]
    examples = sum(f["examples"] for f in per_fold)
    result = {
        "config": str(config), "overrides": overrides, "folds": folds, "metric": metric, "per_fold": per_fold,
        "mean": statistics.fmean(values), "std": statistics.stdev(values),
        "pooled": sum(f[metric] * f["examples"] for f in per_fold) / examples, "examples": examples,
        "selection_on_held_out_fold": cfg.train.patience > 0,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if cfg.train.patience > 0:
        log.warning("train.patience=%d picks each fold's final model on the fold it is scored on; the estimate "
                    "is optimistic (set train.patience=0)", cfg.train.patience)
    write_json(out / "cv.json", result)
    return result
