"""A validation split carved from the training file, when the config names no validation file.

The held-out rows are a seeded shuffle of the training rows (``fraction`` of them, at least one,
never all), recorded in the run directory as ``valid_split.json``: a resumed run, the other
ranks of a distributed run and a later evaluation read the same rows from it, never a reshuffle.
The record names the file and its row count, so a training file changed since is an error, not a
different split.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qkv.errors import CheckpointError, DataError
from qkv.fileio import atomic_write_text

log = logging.getLogger(__name__)

VALID_SPLIT = "valid_split.json"


@dataclass(frozen=True)
class HeldOut:
    """Rows ``valid`` (0-based, ascending) of the ``rows`` read from ``source`` validate; the rest train."""

    source: str
    rows: int
    fraction: float
    seed: int
    valid: tuple[int, ...]

    def split(self, items: list) -> tuple[list, list]:
        """(training items, validation items), each in file order."""
        if len(items) != self.rows:
            raise DataError(f"{self.source}: {len(items)} rows, but the validation split was carved from "
                            f"{self.rows}; the training file changed since the run started")
        held = set(self.valid)
        return [x for i, x in enumerate(items) if i not in held], [items[i] for i in self.valid]


def carve(rows: int, *, fraction: float, seed: int, source: str) -> HeldOut:
    """Hold out round(fraction * rows) rows (at least 1, at most rows - 1), chosen by a seeded shuffle."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.valid_fraction must be in (0, 1), got {fraction}")
    if rows < 2:
        raise DataError(f"{source}: {rows} row(s); carving a validation split needs at least 2 "
                        "(or give a validation file)")
    n_valid = min(max(1, round(fraction * rows)), rows - 1)
    order = np.random.default_rng([seed, rows]).permutation(rows)
    return HeldOut(source=source, rows=rows, fraction=fraction, seed=seed,
                   valid=tuple(sorted(int(i) for i in order[:n_valid])))


def held_out(run_dir: str | os.PathLike, rows: int, *, fraction: float, seed: int, source: str,
             resume: bool) -> HeldOut:
    """The run's carved split: read from ``run_dir/valid_split.json`` on resume, else carved and saved there."""
    path = Path(run_dir) / VALID_SPLIT
    if resume:
        held = load_held_out(path)
        if held.source != source:
            raise DataError(f"{path}: the validation split was carved from {held.source}, but the config now "
                            f"reads {source}")
        return held
    held = carve(rows, fraction=fraction, seed=seed, source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**asdict(held), "valid": list(held.valid)}, indent=1) + "\n")
    log.info("validation split: %d of the %d rows of %s held out (data.valid_fraction=%g, seed %d, shuffled); "
             "recorded in %s", len(held.valid), rows, source, fraction, seed, path)
    return held


def load_held_out(path: str | os.PathLike) -> HeldOut:
    """A ``valid_split.json``; missing or malformed is a CheckpointError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        held = HeldOut(source=str(data["source"]), rows=int(data["rows"]), fraction=float(data["fraction"]),
                       seed=int(data["seed"]), valid=tuple(int(i) for i in data["valid"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the run's carved validation split cannot be rebuilt") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable validation split: {e}") from None
    if not held.valid or any(not 0 <= i < held.rows for i in held.valid) or len(set(held.valid)) != len(held.valid):
        raise CheckpointError(f"{path}: row indices must be distinct and in [0, {held.rows})")
    return held
