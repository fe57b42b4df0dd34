"""The preset configs that ship inside the package, and what every config key means.

The presets are the YAML files of ``qkv/configs`` (the repository's ``configs/`` is a symlink to
that folder, so ``configs/NAME.yaml`` and ``NAME`` are the same file from a clone, and a wheel
carries them as package data). A preset's description is the first line of its header comment.

``config_keys(task)`` lists every key of a task's four sections with its default and its
meaning, read from the dataclass source: the field's trailing ``# comment``, else a string
right under the field; a declared range (``qkv.config.ranged``) is appended.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from pathlib import Path

from qkv.errors import ConfigError

PRESETS = Path(__file__).resolve().parent / "configs"
SUFFIX = ".yaml"


def _preset_paths() -> dict[str, Path]:
    return {p.name[: -len(SUFFIX)]: p for p in sorted(PRESETS.glob(f"*{SUFFIX}")) if p.is_file()}


def _description(text: str) -> str:
    """The first line of the header comment, without '#' and a trailing ':'."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            return ""
        return stripped.lstrip("#").strip().rstrip(":")
    return ""


def list_presets() -> list[tuple[str, str]]:
    """(name, one-line description) of every preset, sorted by name."""
    return [(name, _description(path.read_text(encoding="utf-8"))) for name, path in _preset_paths().items()]


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"{name!r} is neither a config file nor a preset; presets: {', '.join(_preset_paths())} "
                       "(qkv config list)")


def preset_path(name: str) -> Path:
    """The file of preset ``name`` (``"shakespeare-char"``; ``"shakespeare-char.yaml"`` also works)."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    path = _preset_paths().get(stem)
    if path is None or "/" in name or "\\" in name:
        raise _unknown(name)
    return path


def preset_text(name: str) -> str:
    """The YAML of preset ``name``, comments included."""
    return preset_path(name).read_text(encoding="utf-8")


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when that path exists, else the preset of that name.

    Neither is a ConfigError that lists the presets. A path wins over a preset of the same name,
    so a user's ``sst2-scratch.yaml`` in the working folder is the one read.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    try:
        return preset_path(str(name_or_path))
    except ConfigError:
        if path.parent != Path("."):
            raise ConfigError(f"{path}: config file not found (and not a preset; presets: "
                              f"{', '.join(_preset_paths())})") from None
        raise


# -- every key, its default and its meaning ---------------------------------------------------------
def config_keys(task: str) -> list[tuple[str, str, str]]:
    """(key, default repr, meaning) of every key a config of ``task`` may set, section by section:
    ``data.*``, ``model.*``, ``train.*``, ``decode.*``. ``task`` is a task name, or a preset or
    config file, whose ``task:`` is used."""
    from qkv.config import TrainConfig
    from qkv.tasks import TASKS

    if task not in TASKS:
        task = _task_of(task, sorted(TASKS))
    spec = TASKS[task]
    sections = (("data", spec.data_config), ("model", spec.model_config), ("train", TrainConfig),
                ("decode", spec.decode_config))
    return [(f"{section}.{name}", default, meaning) for section, cls in sections
            for name, default, meaning in _fields(cls)]


def _task_of(name: str, tasks: list[str]) -> str:
    from qkv.config import read_yaml

    try:
        path = resolve_config(name)
    except ConfigError:
        raise ConfigError(f"{name!r} is not a task ({', '.join(tasks)}), a preset or a config file") from None
    task = read_yaml(path).get("task")
    if task not in tasks:
        raise ConfigError(f"{path}: task must be one of {tasks}, got {task!r}")
    return task


def _fields(cls: type) -> list[tuple[str, str, str]]:
    notes = _field_notes(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        meaning = notes.get(f.name, "")
        for extra in f.metadata.values():  # a declared range (qkv.config.ranged)
            if hasattr(extra, "describe"):
                note = getattr(extra, "note", "")
                bound = f"{extra.describe()}{f'; {note}' if note else ''}"
                meaning = f"{meaning} [{bound}]" if meaning else f"[{bound}]"
        out.append((f.name, default, meaning))
    return out


def _field_notes(cls: type) -> dict[str, str]:
    """field -> its comment, from the class and its bases (a subclass's note wins)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            notes.update(_class_notes(klass))
    return notes


def _class_notes(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments = {}  # line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    notes = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.end_lineno) or comments.get(node.lineno)
        after = body[i + 1] if i + 1 < len(body) else None
        if not text and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                and isinstance(after.value.value, str):
            text = " ".join(after.value.value.split())
        if text:
            notes[node.target.id] = text
    return notes
