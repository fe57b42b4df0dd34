"""Checkpoints that describe themselves and survive crashes.

A run directory's layout and file names belong to :class:`qkv.rundir.RunDir`; here they are
written: ``checkpoints/step_00001000/`` (model.safetensors, train_state.pt, meta.json) and
``checkpoints/latest``, the name of the newest complete checkpoint.

Every file is written to a temporary name, fsync'ed and renamed; a checkpoint folder is filled
under a temporary name and renamed whole, then ``latest`` is switched. A crash at any moment
leaves the previous checkpoint intact and ``latest`` pointing at a complete one.
Weights are safetensors; the training state (optimizer, RNG) is loaded with weights_only=True.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qkv.errors import CheckpointError
from qkv.fileio import (
    atomic_write_bytes,
    fsync_dir,
    fsync_file,
    replace_bytes,
    temp_beside,
    temp_dir_beside,
    write_error,
)
from qkv.rundir import CONFIG, META, STATE, WEIGHTS, RunDir, checkpoint_name  # noqa: F401 (CONFIG, ...: re-exported)

_STEP_NAME = re.compile(r"step_[0-9]+")


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied weights (safetensors refuses shared storage)."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path, *,
                 metadata: dict[str, str] | None = None) -> None:
    """Atomically write the model's weights (or a full state dict, e.g. gathered from FSDP) as safetensors.

    A failed write (a full disk, a read-only folder) is a WriteError naming ``path``, whatever
    safetensors raised; nothing is left under ``path`` or a temporary name.
    """
    path = Path(path)
    tmp = temp_beside(path)  # 0o666 & ~umask, as any new file
    try:
        tensors = model if isinstance(model, dict) else unique_state_dict(model)
        _save_file(tensors, tmp, metadata=metadata, shown=path)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, *, metadata: dict[str, str] | None, shown: Path) -> None:
    """safetensors' save_file, with its I/O errors (SafetensorError "... (os error 28)") as OSErrors.

    save_file replaces ``tmp`` with a private (0600) file of its own; the mode ``tmp`` was created
    with (the umask's) is put back.
    """
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
    except (SafetensorError, RuntimeError) as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from None


def _save_state(state: dict[str, Any], path: Path) -> None:
    """torch.save through ``_FullWrites``, so that a full disk is an OSError (ENOSPC), not torch's
    RuntimeError ("unexpected pos ...") raised while it closes the archive after a failed write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        writer = _FullWrites(fd)
        torch.save(state, writer)
        if writer.error is not None:
            raise writer.error
        os.fsync(fd)
    finally:
        os.close(fd)


class _FullWrites:
    """A write-only file object over ``fd``: ``write`` writes everything; the first OSError is kept
    in ``error`` and later writes are dropped, so that torch can finish (the file is then removed)."""

    def __init__(self, fd: int):
        self.fd, self.error = fd, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view and self.error is None:
            try:
                view = view[os.write(self.fd, view):]
            except OSError as err:
                self.error = err
        return size

    def flush(self) -> None:
        pass


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors weights; a missing, truncated or malformed file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights into ``model``; missing or unexpected tensors name the file."""
    tensors = read_weights(path)
    expected = unique_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "is it a checkpoint of another model family or size?"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy arrays are not allowed by weights_only loading; store the key as a tensor
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    train_state: dict[str, Any],
                    meta: dict[str, Any], *, keep: int, protect: set[str] = frozenset()) -> Path:
    """Write checkpoints/step_N whole, switch ``latest`` to it, and keep the newest ``keep``."""
    run = RunDir(run_dir)
    root, name = run.checkpoints, checkpoint_name(step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(root / name)
    except OSError as err:
        raise _not_saved(run_dir, root / name, err) from None
    try:
        save_weights(model, tmp / WEIGHTS)
        _save_state(train_state, tmp / STATE)
        atomic_write_bytes(tmp / META, json.dumps({"step": step, **meta}, indent=2).encode())
        final = root / name
        if final.exists():  # re-saving a step (after a resume): move the old one aside first
            _remove(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except OSError as err:  # a full disk, a folder turned read-only: say what is still safe
        shutil.rmtree(tmp, ignore_errors=True)
        raise _not_saved(run_dir, root / name, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replace_bytes(run.latest, name.encode())  # qkv's own file: a planted symlink is replaced, not followed
    except OSError as err:  # the checkpoint is complete; latest_checkpoint() finds it without the pointer
        raise CheckpointError(f"{final}: saved, but {run.latest} could not be updated ({err})") from None
    _rotate(root, keep=keep, protect=set(protect) | {name})
    return final


def _not_saved(run_dir: Path, target: Path, err: OSError) -> CheckpointError:
    previous = latest_checkpoint(run_dir)
    safe = f"the last complete checkpoint, {previous}, is intact" if previous else "there is no earlier checkpoint"
    reason = os.strerror(err.errno) if err.errno else (err.strerror or err)  # not the temporary file's name
    return CheckpointError(f"{target}: checkpoint not saved ({reason}); {safe}")


def _rotate(root: Path, *, keep: int, protect: set[str]) -> None:
    steps = list_checkpoints(root.parent)
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protect:
            _remove(old)


def _remove(checkpoint: Path) -> None:
    """Rename, then delete: a kill half-way through leaves a hidden folder (cleaned up on resume),
    never a step_N folder with some of its files gone."""
    trash = checkpoint.with_name(f".trash-{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by ``latest``, or the newest complete one if that file is missing.

    ``latest`` must hold a bare ``step_N`` name: anything else (a path, ``..``, a symlink to
    elsewhere) is ignored, so the pointer never leads outside ``checkpoints/``.
    """
    run = RunDir(run_dir)
    root, pointer = run.checkpoints, run.latest
    if pointer.is_file() and not pointer.is_symlink():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        candidate = root / name
        if _STEP_NAME.fullmatch(name) and not candidate.is_symlink() and (candidate / META).exists():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def cleanup_partial(run_dir: Path) -> None:
    """Remove temporary folders and files left by a save that was interrupted."""
    root = RunDir(run_dir).checkpoints
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def load_train_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/data position saved with a checkpoint (weights_only=True)."""
    path = Path(checkpoint) / STATE
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: training state not found") from None
    except pickle.UnpicklingError as err:  # weights_only refuses code and unknown classes: nothing ran
        found = re.search(r"Unsupported (?:global|operand)[^.\n]*", str(err))
        detail = f" ({found.group().strip()})" if found else ""
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain data; nothing in "
                              f"it was run{detail}") from None
    except Exception as err:  # a corrupt file must not crash
        raise CheckpointError(f"{path}: not a readable training state ({type(err).__name__}: {err})") from None
    return _checked_state(state, path)


STATE_KEYS = ("optimizer", "rng", "progress")


def _checked_state(state: Any, path: Path) -> dict[str, Any]:
    """The training state's shape: a dict with STATE_KEYS, the progress a dict with an int step."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (expected a dict, got {type(state).__name__})")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training state (no {missing[0]!r})")
    progress = state["progress"]
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int) or progress["step"] < 0:
        raise CheckpointError(f"{path}: not a training state ('progress' must be a dict with an int step >= 0)")
    if not isinstance(state["optimizer"], dict):
        raise CheckpointError(f"{path}: not a training state ('optimizer' must be a dict)")
    return state


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """No NaN or Inf in any floating-point tensor."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def is_good(checkpoint: Path) -> bool:
    """A checkpoint is good when it is complete and its weights read back finite."""
    try:
        return all_finite(read_weights(Path(checkpoint) / WEIGHTS))
    except CheckpointError:
        return False


def good_checkpoint(run_dir: Path) -> Path | None:
    """The newest good checkpoint: ``latest`` if it is good, else the newest complete one with finite weights."""
    latest = latest_checkpoint(run_dir)
    if latest is not None and is_good(latest):
        return latest
    return next((p for p in reversed(list_checkpoints(run_dir)) if p != latest and is_good(p)), None)


def average_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several checkpoints' weights (sec. 6.1: the last 5 or 20 averaged)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, tensor in read_weights(Path(path) / WEIGHTS).items():
            total[name] = total.get(name, 0) + tensor.double()
    return {name: (t / len(paths)).float() for name, t in total.items()}


def read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config of a run directory, with a clear error when it is not one."""
    path = RunDir(run_dir).config
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a qkv run directory ({CONFIG} is missing)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: malformed config ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: malformed config (expected a JSON object, got {_json_kind(data)})")
    return data


def _json_kind(value: Any) -> str:
    return {type(None): "null", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")
