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

    {"config", "overrides", "folds", "metric", "seeds", "tta", "recipe", "per_fold": [{"fold",
     "run_dir" (or "run_dirs"), "examples", "<metric>"}], "mean", "std", "pooled", "examples",
     "variants": {name: {"per_fold": [<metric>, ...], "mean", "std", "pooled", "examples"}}, "seconds"}

``pooled`` is the example-weighted mean over folds (for accuracy: correct / all held-out images).

Variance cures are compared on the same folds (qkv.tasks.image_inference): ``seeds=[1, 2, 3]``
trains every fold once per seed (OUT/seed_S/fold_k) and scores each seed's models alone
("seed_S") and together ("ensemble": the mean class probability); ``tta=True`` scores each of
these again with test-time augmentation ("...+tta"). A model is trained once and scored by every
variant it belongs to, so the differences between variants are paired, not noise between runs.

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

from qkv.config import write_json
from qkv.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

def fold_overrides(folds: int, fold: int) -> list[str]:
    """What makes run k a fold: fold k held out, and (whatever the preset's final fit says) the
    validation images not trained on, since the fold is scored on them."""
    return [f"data.cv_folds={folds}", f"data.cv_fold={fold}", "data.train_on_valid=false"]


def check_config(config: str | Path, overrides: list[str], folds: int):
    """The config with fold 0's overrides, checked before anything is trained; raises ConfigError."""
    from qkv.run import load_config

    if folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    if any(o.split("=", 1)[0].strip() in ("data.cv_folds", "data.cv_fold") for o in overrides):
        raise ConfigError("--set data.cv_folds / data.cv_fold: cross-validation sets these itself (use --folds)")
    task = load_config(config, overrides).task
    able = _tasks_taking("split")
    if task not in able:
        raise ConfigError(f"{config}: cross-validation needs an image task, one that records its split "
                          f"({' or '.join(able)}), got task {task!r}")
    if getattr(load_config(config, overrides).data, "train_on_valid", False) and any(
            o.split("=", 1)[0].strip() == "data.train_on_valid" for o in overrides):
        raise ConfigError("--set data.train_on_valid=true: data.cv_folds and data.train_on_valid exclude each other "
                          "(each fold is scored on the images it holds out; the preset's final fit is turned off "
                          "for the folds)")
    return load_config(config, [*overrides, *fold_overrides(folds, 0)])


def _tasks_taking(*options: str) -> list[str]:
    """The tasks whose trained runs' evaluate takes all of ``options``."""
    from qkv.tasks import TASKS

    return sorted(name for name, spec in TASKS.items() if set(options) <= set(spec.inference.evaluate_options))


def train_fold(config: str | Path, out: Path, folds: int, fold: int, overrides: list[str], *,
               threads: int | None, device: str | None) -> Path:
    """Train (or reuse, or resume) fold ``fold`` in a child process; returns its run directory."""
    from qkv.rundir import RunDir

    run_dir = out / f"fold_{fold}"
    if RunDir(run_dir).weights.exists():
        log.info("fold %d: reusing the finished run %s", fold, run_dir)
        return run_dir
    command = [sys.executable, "-m", "qkv", "train", str(config), "--out", str(run_dir), "--quiet"]
    for item in [*overrides, *fold_overrides(folds, fold)]:
        command += ["--set", item]
    if RunDir(run_dir).config.exists():
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


def score_fold(run_dirs: list[Path], metric: str, *, tta: bool = False) -> dict:
    """The finished runs' final models on their (shared) held-out fold; several runs vote as an ensemble."""
    from qkv.run import load

    run = load(run_dirs[0], device="cpu")
    options = {"split": "valid"}
    if "tta" in run.evaluate_options:  # off unless asked, whatever the run's decode.tta
        options["tta"] = tta
    if len(run_dirs) > 1:
        options["ensemble"] = run_dirs[1:]
    result = run.evaluate(**options)
    return {"examples": result["examples"], metric: result[metric]}


def summarize(per_fold: list[dict], metric: str) -> dict:
    """Mean and standard deviation over folds, and the pooled (example-weighted) value."""
    values = [f[metric] for f in per_fold]
    examples = sum(f["examples"] for f in per_fold)
    return {"per_fold": per_fold, "mean": statistics.fmean(values), "std": statistics.stdev(values),
            "pooled": sum(f[metric] * f["examples"] for f in per_fold) / examples, "examples": examples}


def check_variants(cfg, overrides: list[str], seeds: list[int] | None, tta: bool) -> None:
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds needs distinct seeds, got {seeds}")
        if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
            raise ConfigError("--set train.seed: --seeds sets it for each run")
    able = _tasks_taking("tta", "ensemble")
    if (tta or (seeds and len(seeds) > 1)) and cfg.task not in able:
        raise ConfigError(f"--tta and ensembles (--seeds with more than one seed) need class probabilities: a run "
                          f"of {' or '.join(able)}, got task {cfg.task!r}")


def cross_validate(config: str | Path, out: str | Path, *, folds: int, overrides: list[str] = (), jobs: int = 1,
                   threads: int | None = None, device: str | None = None, seeds: list[int] | None = None,
                   tta: bool = False) -> dict:
    """Train and score ``folds`` runs of ``config``; writes and returns OUT/cv.json's contents.

    ``seeds``: train every fold once per seed (train.seed), under OUT/seed_S/fold_k; each seed's
    models are scored alone and, with more than one seed, as an ensemble (mean class probability).
    ``tta``: score each of those again with test-time augmentation. The headline figures (``per_fold``,
    ``mean``, ``std``, ``pooled``) are the whole recipe asked for (ensemble, with TTA if asked);
    ``variants`` has every combination, all scored on the same held-out folds.
    """
    overrides = list(overrides)
    cfg = check_config(config, overrides, folds)
    check_variants(cfg, overrides, seeds, tta)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    metric, out, start = cfg.spec.inference.primary_metric[0], Path(out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan = [(None, out)] if seeds is None else [(s, out / f"seed_{s}") for s in seeds]
    work = [(seed, where, k) for seed, where in plan for k in range(folds)]

    def train(item):
        seed, where, k = item
        where.mkdir(parents=True, exist_ok=True)
        extra = [] if seed is None else [f"train.seed={seed}"]
        return train_fold(config, where, folds, k, [*overrides, *extra], threads=threads, device=device)

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # the work happens in child processes
        trained = list(pool.map(train, work))
    runs = [trained[i * folds:(i + 1) * folds] for i in range(len(plan))]  # runs[seed index][fold]
    variants: dict[str, dict] = {}
    for (seed, _), seed_runs in zip(plan, runs):
        name = "single" if seed is None else f"seed_{seed}"
        for suffix, with_tta in (("", False), ("+tta", True)) if tta else (("", False),):
            variants[name + suffix] = summarize([{"fold": k, "run_dir": str(run_dir),
                                                  **score_fold([run_dir], metric, tta=with_tta)}
                                                 for k, run_dir in enumerate(seed_runs)], metric)
    if len(plan) > 1:
        for suffix, with_tta in (("", False), ("+tta", True)) if tta else (("", False),):
            variants["ensemble" + suffix] = summarize(
                [{"fold": k, "run_dirs": [str(r[k]) for r in runs],
                  **score_fold([r[k] for r in runs], metric, tta=with_tta)} for k in range(folds)], metric)
    headline = list(variants)[-1]
    result = {
        "config": str(config), "overrides": overrides, "folds": folds, "metric": metric, "seeds": seeds, "tta": tta,
        "recipe": headline, **variants[headline],
        "variants": {name: {k: v for k, v in summary.items() if k != "per_fold"}
                     | {"per_fold": [f[metric] for f in summary["per_fold"]]} for name, summary in variants.items()},
        "selection_on_held_out_fold": cfg.train.patience > 0,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if cfg.train.patience > 0:
        log.warning("train.patience=%d picks each fold's final model on the fold it is scored on; the estimate "
                    "is optimistic (set train.patience=0)", cfg.train.patience)
    write_json(out / "cv.json", result)
    return result
