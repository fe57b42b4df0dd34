"""Export a trained run to other runtimes: Hugging Face (``qkv.export.hf``), ONNX, CTranslate2.

An exporter is ``fn(run, out: Path) -> dict``: ``run`` is what ``qkv.load(run_dir)`` returns, ``out``
the folder to write; it returns a JSON-able summary ``{"format", "out", "files", ...}``. A run whose
architecture has no exact counterpart in the target is refused with a ConfigError naming the
config keys that do not map, before anything is written. The family objects name their exporters
(``LoadedRun.exporters``: format -> "module:function"), so this package imports no task.

The folder rule (STYLE.md rule 21): qkv writes only into a folder it created. ``prepare_out``
refuses an existing non-empty folder without qkv's marker, naming it; it creates the folder with
the marker (``.qkv-export``) first, so a later export may replace qkv's own files there.
"""

from __future__ import annotations

from pathlib import Path

from qkv.errors import ConfigError

MARKER = ".qkv-export"
MARKER_TEXT = b"a qkv export folder: qkv export writes here (see qkv/export/__init__.py)\n"


def check_out(out: str | Path) -> Path:
    """``out`` as a Path, refused (ConfigError naming it) when qkv may not write there; writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and not (out / MARKER).is_file():
        foreign = sorted(p.name for p in out.iterdir())
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(f"--out {out}: the folder is not empty and was not made by qkv export (it holds "
                              f"{shown}); qkv writes only into a new or empty folder: choose another --out")
    return out


def prepare_out(out: str | Path) -> Path:
    """``check_out``, then create the folder (parents too) with the marker written first."""
    from qkv.fileio import atomic_write_bytes, write_error

    out = check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(out, err) from None
    if not (out / MARKER).exists():
        atomic_write_bytes(out / MARKER, MARKER_TEXT)
    return out


def summary(fmt: str, out: Path, **extra) -> dict:
    """The exporter's JSON-able answer: format, folder, the files written (relative, sorted), extras."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    return {"format": fmt, "out": str(out), "files": files, **extra}
