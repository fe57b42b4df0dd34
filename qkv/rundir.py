"""One object owns a run directory's file names (STYLE.md rule 20), and the folder's rules (rule 21).

A run directory holds::

    .qkv-run                    the marker: written first, when qkv creates the folder
    .qkv-lock                   held (fcntl, exclusive) by the one training that writes the run
    config.json                 the resolved config (task, data, model, train, decode)
    <task files>                written by the task (tokenizers, labels.json, split.json, ...)
    metrics.jsonl               one JSON object per logged step / evaluation
    model.safetensors           the final (optionally averaged) weights
    checkpoints/step_00001000/  model.safetensors, train_state.pt, meta.json
    checkpoints/latest          the name of the newest complete checkpoint

``RunDir(path)`` names them (``run.config``, ``run.checkpoint(1000)``, ``run.file(LABELS)``); a
task keeps its own file names as constants and joins them through ``run.file``.

qkv writes only into a folder it created: ``prepare_new`` refuses a non-empty folder that is not
a qkv run (no marker, no config.json), naming it. ``lock()`` is held for the life of a training, so
a second trainer on the same run is refused with the pid of the first.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qkv.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MARKER, LOCK = ".qkv-run", ".qkv-lock"
CONFIG, WEIGHTS, METRICS = "config.json", "model.safetensors", "metrics.jsonl"
CHECKPOINTS, LATEST = "checkpoints", "latest"
STATE, META = "train_state.pt", "meta.json"   # inside each checkpoint folder
TENSORBOARD, CURVES = "tensorboard", "curves.png"
MARKER_TEXT = b"a qkv run directory: qkv train writes here (see qkv/rundir.py)\n"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; ``RunDir("runs/a").weights`` is ``runs/a/model.safetensors``."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        """A task's own file in the run (``run.file(LABELS)``); a bare name, never a path."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"name must be a bare file name, got {name!r}")
        return self.path / name

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    # -- the folder's rules ---------------------------------------------------------------------
    def is_run(self) -> bool:
        """qkv created this folder: it has the marker, or (runs from before the marker) a config.json."""
        return self.marker.is_file() or self.config.is_file()

    def prepare_new(self) -> bool:
        """Check that a new training may write here, before any byte is written; True if the folder is new.

        Refused: a path that is not a folder, a folder holding a finished or started run (its
        config.json), and a non-empty folder qkv did not create. A folder with only the marker (a
        training that failed before its config was written) is qkv's own, and reused.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path}: exists and is not a folder")
        if self.config.exists():
            raise ConfigError(f"{self.path} already holds a run: pass --resume to continue it, or choose another --out")
        if not self.path.exists():
            return True
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in (MARKER, LOCK))
        if foreign and not self.marker.is_file():
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(f"--out {self.path}: the folder is not empty and is not a qkv run (it holds {shown}); "
                              "qkv writes only into a new or empty folder: choose another --out")
        return False

    def create(self) -> None:
        """Make the folder and write the marker first, so that the folder is known to be qkv's."""
        from qkv.fileio import atomic_write_bytes, write_error

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path, err) from None
        if not self.marker.exists():
            atomic_write_bytes(self.marker, MARKER_TEXT)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's exclusive lock (fcntl) for the block; another holder is a CheckpointError.

        The kernel drops the lock when its process ends, however it ends (a kill, a crash), so a
        stale lock file never blocks a resume. The file holds the holder's pid, for the message.
        """
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            from qkv.fileio import write_error

            raise write_error(self.lock_file, err) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise CheckpointError(f"{self.path}: another qkv train is writing this run{_holder(fd)}; wait for "
                                      "it to finish (or stop it), or choose another --out") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # closing the file releases the lock


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """The records of a metrics.jsonl, and whether its last line was dropped.

    A kill while a line was being appended leaves the last line unfinished: it is dropped with a
    warning. Any other line that is not a JSON object is a CheckpointError naming ``path:line``.
    """
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    records, dropped = [], False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif n == len(lines):
            log.warning("%s:%d: an unfinished last line (a training was stopped while writing it); dropped", path, n)
            dropped = True
        else:
            raise CheckpointError(f"{path}:{n}: not a JSON object (metrics.jsonl holds one per line)")
    return records, dropped


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _holder(fd: int) -> str:
    """ " (pid N)" from the lock file, or "" when it holds none."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""
