"""Run configs and run directories: which task, its sections, and rebuilding a trained model.

``load_config(path, overrides)`` turns a YAML file into a :class:`RunConfig`;
``load_run(run_dir)`` rebuilds a trained model and its tokenizers with no hyperparameter restated;
``load(run_dir)`` (also ``qkv.load``) wraps them in the run's family object, ready to use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from qkv import checkpoint as ckpt
from qkv.config import TrainConfig, apply_overrides, from_dict, read_yaml, to_dict, write_json
from qkv.errors import CheckpointError, ConfigError
from qkv.rundir import RunDir
from qkv.tasks import TASKS, TaskSpec

SECTIONS = ("task", "data", "model", "train", "decode")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str
    data: Any
    model: Any
    train: TrainConfig
    decode: Any

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]


def from_mapping(data: dict, *, source: str) -> RunConfig:
    """Strictly build a RunConfig from plain data; ``source`` names the file in errors."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    task = data.get("task")
    if task not in TASKS:
        raise ConfigError(f"{source}: task must be one of {sorted(TASKS)}, got {task!r}")
    spec = TASKS[task]
    return RunConfig(
        task=task,
        data=from_dict(spec.data_config, data.get("data"), where=f"{source}: data"),
        model=from_dict(spec.model_config, data.get("model"), where=f"{source}: model"),
        train=from_dict(TrainConfig, data.get("train"), where=f"{source}: train"),
        decode=from_dict(spec.decode_config, data.get("decode"), where=f"{source}: decode"),
    )


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """YAML file + ``--set`` overrides -> RunConfig."""
    return from_mapping(apply_overrides(read_yaml(path), list(overrides)), source=str(path))


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    write_json(RunDir(run_dir).config, to_dict(cfg))


def read_run_config(run_dir: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The resolved config saved in a run directory (with optional overrides)."""
    data = ckpt.read_config(Path(run_dir))
    return from_mapping(apply_overrides(data, list(overrides)), source=str(RunDir(run_dir).config))


def weights_path(run_dir: Path) -> Path:
    """The final weights, or the newest checkpoint's while training is still going."""
    final = RunDir(run_dir).weights
    if final.is_file():
        return final
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        raise CheckpointError(f"{run_dir}: no model weights ({ckpt.WEIGHTS}) and no checkpoint")
    return last / ckpt.WEIGHTS


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu", task: str | None = None):
    """Rebuild (cfg, model in eval mode, task-specific artifacts such as tokenizers) from a run dir.

    ``task`` checks the run's family (e.g. 'translate' needs a 'translation' run).
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if task is not None and cfg.task != task:
        raise CheckpointError(f"{run_dir}: this is a {cfg.task!r} run, but the command needs a {task!r} run")
    artifacts = cfg.spec.load_artifacts(cfg, run_dir)
    model = cfg.spec.build_model(cfg)
    ckpt.load_weights(model, weights_path(run_dir))
    return cfg, model.to(device).eval(), artifacts


def load(run_dir: str | Path, *, device: torch.device | str = "cpu"):
    """A trained run, ready to use: the family object of its task (a qkv.tasks.inference.LoadedRun).

    It holds ``.cfg``, ``.model`` (eval mode, on ``device``), ``.artifacts`` and ``.run_dir``, and
    has ``.kind``, ``.primary_metric``, ``.evaluate(**options)``, ``.attention(text=|image=)`` and
    the predict methods of its family (``.translate``, ``.generate``/``.stream``, ``.classify``,
    ``.embed``); each takes a list (or one input), batches internally and returns plain values.

        run = qkv.load("runs/en-de")
        run.translate(["A man rides a bike."], beam=4)   # -> ["Ein Mann fährt Rad."]
    """
    cfg, model, artifacts = load_run(run_dir, device=device)
    return cfg.spec.inference(cfg, model, artifacts, Path(run_dir), device)


def train_run(cfg: RunConfig, run_dir: str | Path, *, device: torch.device, resume: bool = False,
              restart: bool = False, progress: bool = False, world=None) -> dict:
    """Read the data, build the model, train, and leave a complete run directory behind.

    A new run needs a new or empty folder (or one qkv created: see qkv.rundir); the folder is
    created with its marker, and its lock is held until training ends. If a new run fails before
    training starts (bad data, a config that makes no model), what qkv created is removed again:
    the folder if it was new, else only the files it added, so the corrected rerun is accepted.
    ``resume`` continues the
    run from its newest good checkpoint; the stored config, the overrides in ``cfg``, the
    tokenizers and the checkpoint (weight shapes, training state, metrics.jsonl) are all checked
    before anything is written. With no checkpoint to resume from, ``resume`` refuses unless
    ``restart`` (train the run again from step 0).

    ``world`` (a qkv.distributed.World, under torchrun): rank 0 builds the tokenizers and writes
    the run directory; the other ranks then load them from it, as a resumed run would.
    """
    from qkv import distributed

    world = world or distributed.World()
    run = RunDir(run_dir)
    if resume and not run.config.exists():
        raise CheckpointError(f"{run.path}: nothing to resume (no {ckpt.CONFIG})")
    kept = None if resume else _existing_entries(run)  # a new run: what was there before is never removed
    distributed.barrier()  # every rank has checked run_dir before rank 0 writes into it
    trainer = None
    try:
        if world.is_main and not resume:
            run.create()  # the marker first: from now on the folder is qkv's
        with run.lock() if world.is_main else contextlib.nullcontext():
            trainer = _set_up(cfg, run, device=device, resume=resume, restart=restart, progress=progress, world=world)
            return trainer.fit(resume=resume, restart=restart)
    except BaseException:
        if not resume and trainer is None and world.is_main:  # a new run that never started training
            _remove_new_entries(run, kept)
        raise


def _existing_entries(run: RunDir) -> set[str] | None:
    """For a new run: check the folder (RunDir.prepare_new); the names already in it (an empty or
    marker-only folder), or None when there is no folder yet (qkv will create it)."""
    if run.prepare_new():
        return None
    return {p.name for p in run.path.iterdir()}


def _remove_new_entries(run: RunDir, kept: set[str] | None) -> None:
    """Undo a new run's failed set-up: the folder if qkv created it, else only the entries it added."""
    if kept is None:
        shutil.rmtree(run.path, ignore_errors=True)
        return
    for entry in run.path.iterdir() if run.path.is_dir() else ():
        if entry.name not in kept:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _set_up(cfg: RunConfig, run: RunDir, *, device, resume: bool, restart: bool, progress: bool, world):
    """Read the data, build the tokenizers and the model, check a resume, write config.json: the Trainer.

    The model is built before config.json is written, so a config that cannot make a model leaves
    no run behind (a new run's failed set-up is removed by train_run)."""
    from qkv import distributed
    from qkv.train import Trainer, check_resume

    model = None
    if world.is_main:
        task = cfg.spec.make_task(cfg, run.path, resume=resume)
        model = task.build_model()  # everything is read and checked before config.json is written
        if resume:
            check_resume(run, model, restart=restart)
        save_config(run.path, task.cfg)
    distributed.barrier()
    if not world.is_main:
        resolved = read_run_config(run.path)
        task = resolved.spec.make_task(resolved, run.path, resume=True)
    return Trainer(task, task.cfg.train, run.path, device=device, model=model, progress=progress,
                   rank=world.rank, world_size=world.world_size)
