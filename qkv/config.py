"""Strict configuration: YAML files -> frozen dataclasses, with ``--set key=value`` overrides.

A run config has a ``task`` (which picks the model family's dataclasses) and sections
``data``, ``model``, ``train`` and ``decode``. Unknown keys and values of the wrong type are
errors that name the key and the file. The resolved config is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from qkv.errors import ConfigError
from qkv.fileio import atomic_write_bytes

RANGE = "qkv.range"
"""The ``dataclasses.field`` metadata key under which :func:`ranged` stores a field's :class:`Range`."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number field may take: a lower bound (``ge`` or ``gt``) and/or an upper one
    (``le`` or ``lt``); floats must also be finite. ``note`` says what an end value means ("0 = off").
    A field whose value may be None (``int | None``) is checked only when it holds a number."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """">= 1", "> 0", "in [0, 1)", "in (0, 1]": as the messages say it."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            return (f"in {'[' if self.ge is not None else '('}{_number(low)}, "
                    f"{_number(high)}{']' if self.le is not None else ')'}")
        if low is not None:
            return f"{'>=' if self.ge is not None else '>'} {_number(low)}"
        if high is not None:
            return f"{'<=' if self.le is not None else '<'} {_number(high)}"
        return "a finite number"

    def error(self, key: str, value: Any) -> str | None:
        """The message for ``value`` at ``key`` ("model.n_heads must be >= 1, got 0"), or None if it fits."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # None is the field's "not set"; the type is from_dict's to check
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} must be a finite number, got {value}"
        if value in self:
            return None
        return f"{key} must be {self.describe()}{f' ({self.note})' if self.note else ''}, got {value}"


def _number(bound: float) -> str:
    if isinstance(bound, int) and bound >= 2**16 and bound & (bound - 1) == 0:
        return f"2**{bound.bit_length() - 1}"  # 2**32, not 4294967296
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def ranged(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, note: str = "") -> Any:
    """A dataclass field with a declared range, checked by ``from_dict`` (naming the file and key)
    and by :func:`check_ranges` in the config's ``__post_init__``::

        n_heads: int = ranged(8, ge=1)
        dropout: float = ranged(0.1, ge=0.0, lt=1.0)        # a probability: [0, 1)
        d_ff: int = ranged(0, ge=0, note="0 = 4 * d_model")  # 0 means "derive it"
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give one lower bound (ge or gt) and one upper bound (le or lt)")
    return dataclasses.field(default=default, metadata={RANGE: Range(ge=ge, gt=gt, le=le, lt=lt, note=note)})


def ranges(cls: type) -> dict[str, Range]:
    """The declared range of each field of dataclass ``cls`` that has one."""
    return {f.name: f.metadata[RANGE] for f in dataclasses.fields(cls) if RANGE in f.metadata}


def range_errors(cls: type, values: dict[str, Any], *, prefix: str = "") -> list[str]:
    """The messages for the values outside their field's range; each names ``prefix + field``.
    A tuple or list of numbers is checked element by element (``prefix + field[i]``)."""
    declared, errors = ranges(cls), []
    for name, value in values.items():
        if name not in declared:
            continue
        items = enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, item in items:
            message = declared[name].error(f"{prefix}{name}" + ("" if i is None else f"[{i}]"), item)
            if message is not None:
                errors.append(message)
    return errors


def check_ranges(config: Any, *, prefix: str = "", error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first field of ``config`` outside its declared range (see ranged).

    Called first in each config's ``__post_init__``, so that a config built in Python is checked
    as a loaded one is, and the cross-field checks after it never see a zero or negative size.
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    errors = range_errors(type(config), values, prefix=prefix)
    if errors:
        raise error(errors[0])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. Defaults are the paper's (sec. 5.3, 5.4) where it gives one."""

    optimizer: str = "adam"          # "adam" (paper) or "adamw"
    lr: float = ranged(7e-4, gt=0.0)  # peak learning rate; the paper's d_model^-0.5 * warmup^-0.5 for base
    betas: tuple[float, float] = ranged((0.9, 0.98), ge=0.0, lt=1.0)
    eps: float = ranged(1e-9, gt=0.0)
    weight_decay: float = ranged(0.0, ge=0.0)
    layer_lr_decay: float = ranged(1.0, gt=0.0, le=1.0)  # layer i of n gets lr * decay^(n - i); 1.0 = off
    schedule: str = "noam"           # "noam" (= inverse square root), "cosine", "linear", "constant"
    warmup_steps: int = ranged(4000, ge=0)
    min_lr_ratio: float = ranged(0.0, ge=0.0, le=1.0, note="a fraction of train.lr")  # cosine/linear decay floor
    max_steps: int = ranged(100_000, gt=0)
    label_smoothing: float = ranged(0.1, ge=0.0, lt=1.0)
    clip_grad_norm: float = ranged(0.0, ge=0.0, note="0 = no clipping")  # 0 = no clipping
    accumulate: int = ranged(1, gt=0)  # micro-batches per optimizer step
    precision: str = "auto"          # "auto" (bf16 autocast on CUDA with bf16, else fp32), "fp32", "bf16"
    compile: bool = False            # torch.compile the model for training
    log_every: int = ranged(50, gt=0)
    eval_every: int = ranged(1000, gt=0)
    save_every: int = ranged(1000, gt=0)
    keep_checkpoints: int = ranged(5, gt=0)
    average_last: int = ranged(0, ge=0, note="0 = off")  # average the last k checkpoints into the final model (6.1)
    patience: int = ranged(0, ge=0, note="0 = no early stopping")  # evaluations without improvement before stopping
    on_nan: str = "stop"             # "stop" or "skip" the step when the loss is NaN/Inf
    max_skipped: int = ranged(10, gt=0)  # with on_nan="skip": stop after this many consecutive bad steps
    seed: int = ranged(1, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    device: str = "auto"             # "auto", "cpu", "cuda", "cuda:1", ...
    parallel: str = "ddp"            # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 fully_shard)
    peak_tflops: float = ranged(0.0, ge=0.0, note="0 = measure")  # per-device peak for MFU: 0 = $QKV_PEAK_TFLOPS,
    #                                                              else measured on CUDA

    def __post_init__(self):
        check_ranges(self, prefix="train.", error=ConfigError)
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("noam", "cosine", "linear", "constant"),
                   "precision": ("auto", "fp32", "bf16"), "on_nan": ("stop", "skip"),
                   "parallel": ("ddp", "fsdp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.average_last > self.keep_checkpoints:
            raise ConfigError(f"train.average_last={self.average_last} needs train.keep_checkpoints >= it, "
                              f"got {self.keep_checkpoints}")


class _OutOfRange(ConfigError):
    """A value of the right type outside its range: in a union, this error is the one to report."""


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` (ints for floats, lists for tuples) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise next((e for e in errors if isinstance(e, _OutOfRange)), errors[-1])  # "finite", not "expected null"
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(_check_type(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, kinds)))
    if origin is list:
        (kind,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, kind, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and not isinstance(value, bool):
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):  # .nan, .inf, "1e999": no float setting means anything there
                raise _OutOfRange(f"{where}: must be a finite number, got {value!r}")
            return number
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    if annotation is Any:
        return value
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _as_float(value: Any) -> float | None:
    """ints and floats, and strings such as "1e-4" (YAML 1.1 reads an exponent without a dot as a string)."""
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            return math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def from_dict(cls: type, data: dict | None, *, where: str) -> Any:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    errors = range_errors(cls, values, prefix=f"{where}.")  # "c.yaml: model.n_heads must be >= 1, got 0"
    if errors:  # before the dataclass is built, so no cross-field check ever sees n_heads=0
        raise _OutOfRange(errors[0])
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(config: Any) -> Any:
    """Dataclasses -> plain dicts/lists (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict, in order."""
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
        try:
            value = load_yaml_text(raw, name=f"--set {item!r}")
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = value
    return data


MAX_CONFIG_BYTES = 10_000_000
"""A config file larger than this is refused before it is parsed."""
MAX_YAML_NODES = 100_000
"""A YAML document may hold at most this many values once its aliases are expanded (a billion-laughs
file of 429 bytes expands to 10^9); a real config holds a few hundred."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth (PyYAML keeps the last)."""

    name = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicates(self, node)
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    first: dict[Any, int] = {}  # key -> the line it was first given on
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden by design
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # an unhashable key: SafeLoader's own error follows
            continue
        line = key_node.start_mark.line + 1
        if key in first:
            raise ConfigError(f"{loader.name}:{line}: duplicate key {key!r} (first given on line {first[key]}); "
                              "YAML would silently keep the last one")
        first[key] = line


def _expanded_size(node: yaml.Node, *, limit: int, name: str) -> int:
    """The number of values in ``node`` with every alias expanded; ConfigError past ``limit``."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in active:
            raise ConfigError(f"{name}:{n.start_mark.line + 1}: a recursive YAML alias (a value that contains itself)")
        active.add(id(n))
        children = n.value if isinstance(n, yaml.SequenceNode) else (
            [part for pair in n.value for part in pair] if isinstance(n, yaml.MappingNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise ConfigError(f"{name}: YAML aliases expand to more than {limit:,} values (an alias bomb?); "
                                  "write the values out instead of repeating anchors")
        active.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def load_yaml_text(text: str, *, name: str) -> Any:
    """Parse one YAML document strictly: duplicate keys, alias bombs and recursive aliases are
    ConfigErrors naming ``name`` (and the line); syntax errors are ``yaml.YAMLError``."""
    loader = _StrictLoader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, limit=MAX_YAML_NODES, name=name)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{name}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file (and line, for syntax errors and duplicate keys)."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        data = load_yaml_text(text, name=str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _read_config_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a YAML config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
