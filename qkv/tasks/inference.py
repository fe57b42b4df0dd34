"""What a trained run can do: the family object that ``qkv.load(run_dir)`` returns (rule 16).

Each task names its family class in its :class:`~qkv.tasks.TaskSpec` (``inference``); the class is
built from ``(cfg, model, artifacts, run_dir, device)`` and says what it is and what it does:

* ``kind``: "translation", "language-model", "text-classification", "text-embedding",
  "image-classification" or "image-embedding"; ``inputs``: "text" or "image";
* ``primary_metric``: (name, "max" | "min"), the figure that ranks runs (training, ``qkv cv``);
* ``evaluate(**options) -> dict``: the task's metrics (JSON-able) on the data the options name;
* ``attention(*, text=None, image=None, layers=True) -> qkv.attention_maps.AttentionSet``;
* the predict methods of the family, among ``translate``, ``generate`` (and ``stream``),
  ``classify``, ``embed``. A method the family lacks raises a ConfigError that says what the run
  can do; an option a method does not take raises an :class:`OptionError` that names it.

The CLI, ``qkv cv`` and the attention pictures use only this interface, so they name no task.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

from qkv.errors import ConfigError, DataError

PREDICTS = ("translate", "generate", "classify", "embed")
#: The longest input line (characters) that predict reads from a file or stdin; a longer one is
#: refused naming FILE:LINE before it is tokenized (a 100k-character line to translate would
#: otherwise run for minutes). Training data has its own limit, ``data.max_chars``.
MAX_INPUT_CHARS = 100_000
#: Input lines read, predicted and written at a time: memory stays bounded whatever the input's size.
CHUNK_LINES = 256


class OptionError(ConfigError):
    """An option that a run's method does not take. ``cli_message`` names it as the command's flag."""

    def __init__(self, run: LoadedRun, method: str, option: str, allowed: tuple[str, ...]):
        def say(flag: str) -> str:
            takes = ", ".join(flag + a.replace("_", "-") for a in allowed) or "no options"
            return (f"{run.run_dir} is {run.a_kind} run: {method} takes no {flag}{option.replace('_', '-')} "
                    f"(it takes: {takes})")

        super().__init__(say(""))
        self.option = option
        self.cli_message = say("--")


class LoadedRun:
    """A trained run ready to use: ``cfg``, ``model`` (eval mode, on ``device``), ``artifacts``, ``run_dir``.

    Subclasses set the class attributes and implement ``_evaluate`` and ``_attention``, and the
    predict methods their family has (listed in ``predicts``).
    """

    kind: ClassVar[str]
    inputs: ClassVar[str] = "text"                  # what predict and attention read: "text" or "image"
    primary_metric: ClassVar[tuple[str, str]]
    predicts: ClassVar[tuple[str, ...]] = ()        # which of PREDICTS the family implements
    evaluate_options: ClassVar[tuple[str, ...]] = ()
    #: export format ("hf" | "onnx" | "ctranslate2") -> "module:function", imported only when asked (qkv.export)
    exporters: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg, model: torch.nn.Module, artifacts: Any, run_dir: str | Path,
                 device: torch.device | str = "cpu"):
        self.cfg, self.model, self.artifacts = cfg, model, artifacts
        self.run_dir, self.device = Path(run_dir), torch.device(device)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.run_dir} ({self.kind}, task {self.cfg.task!r})>"

    @property
    def a_kind(self) -> str:
        return ("an " if self.kind[0] in "aeiou" else "a ") + self.kind

    @property
    def unit(self) -> str:
        """What predict and evaluate count in their progress: "image" or "sentence"."""
        return "image" if self.inputs == "image" else "sentence"

    @property
    def abilities(self) -> tuple[str, ...]:
        return (*self.predicts, "evaluate", "attention")

    # -- the interface ----------------------------------------------------------------------------
    def evaluate(self, **options) -> dict:
        """The task's metrics on the data the options name (each family documents its options)."""
        self.check_options("evaluate", options, self.evaluate_options)
        return self._evaluate(**{k: v for k, v in options.items() if v is not None})

    def attention(self, *, text: str | None = None, image: str | Path | None = None, layers=True):
        """The attention weights of one input (``text`` for text runs, ``image`` a file for image runs)."""
        if (text is None) == (image is None):
            raise ConfigError("attention needs one input: text= (text runs) or image= (image runs)")
        if image is not None and self.inputs != "image":
            raise ConfigError(f"{self.run_dir} is {self.a_kind} run: attention over an image needs an image run "
                              "(this one reads text)")
        if text is not None and self.inputs != "text":
            raise ConfigError(f"{self.run_dir} is {self.a_kind} run: it reads images, not text")
        if text is not None and not text.strip():
            raise ConfigError("text is empty: give the text whose attention to draw")
        with torch.no_grad():
            return self._attention(text if text is not None else image, layers)

    def translate(self, texts, **options) -> list[str]:
        raise self.cannot("translate")

    def generate(self, prompts, **options) -> list[str]:
        raise self.cannot("generate")

    def stream(self, prompt: str, **options):
        raise self.cannot("generate")

    def classify(self, inputs, **options) -> list[tuple[str, float]]:
        raise self.cannot("classify")

    def embed(self, inputs, **options):
        raise self.cannot("embed")

    def export(self, format: str, out: str | Path) -> dict:
        """Write the run to ``out`` in ``format`` (one of ``exporters``); the exporter's JSON-able summary.

        The exporter's module is imported here, so ``import qkv`` and ``qkv.load`` never import onnx
        or ctranslate2. A run whose architecture the target cannot hold is a ConfigError naming the keys.
        """
        if format not in self.exporters:
            formats = ", ".join(sorted(self.exporters)) or "none"
            raise ConfigError(f"{self.run_dir} is {self.a_kind} run: it cannot export to {format!r} "
                              f"(it can: {formats})")
        import importlib

        module, _, function = self.exporters[format].partition(":")
        return getattr(importlib.import_module(module), function)(self, Path(out))

    # -- helpers for the families -----------------------------------------------------------------
    def require(self, method: str) -> None:
        """The "cannot" error unless the family has ``method`` (a caller checks before reading its input)."""
        if method not in self.abilities:
            raise self.cannot(method)

    def cannot(self, method: str) -> ConfigError:
        return ConfigError(f"{self.run_dir} is {self.a_kind} run (task {self.cfg.task!r}): it cannot {method} "
                           f"(it can: {', '.join(self.abilities)})")

    def check_options(self, method: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        """OptionError for the first option given (not None) that ``method`` does not take."""
        for name, value in options.items():
            if name not in allowed and value is not None:
                raise OptionError(self, method, name, allowed)

    def _evaluate(self, **options) -> dict:
        raise NotImplementedError

    def _attention(self, item, layers):
        raise NotImplementedError


def flagged(error: Exception, flag_message: str) -> Exception:
    """``error`` with the message the CLI prints instead (the option as its ``--flag``)."""
    error.cli_message = flag_message
    return error


def as_list(items, *, name: str) -> list:
    """One string (or path) or a sequence of them -> a list; anything else is a ValueError naming ``name``."""
    if isinstance(items, (str, Path)):
        return [items]
    try:
        return list(items)
    except TypeError:
        raise ValueError(f"{name} must be a string or a list of them, got {type(items).__name__}") from None


def input_lines(stream: IO[bytes], *, name: str, max_chars: int = MAX_INPUT_CHARS) -> Iterator[tuple[str, str]]:
    """(``name:LINE``, text) for each line of a binary stream, read one line at a time.

    The checks of ``qkv.data.text.read_lines`` (UTF-8, NUL bytes, characters other tools end lines
    at) with ``max_chars`` as the line limit; empty lines are kept (they predict as empty). An empty
    stream gives no lines. Only one line (at most ~4 x ``max_chars`` bytes) is held at a time.
    """
    from qkv.data.text import iter_lines

    peek = getattr(stream, "peek", None)
    if peek is not None and not peek(1):
        return
    try:
        for lineno, text in enumerate(iter_lines(stream, name=name, max_chars=max_chars, allow_empty=True), start=1):
            yield f"{name}:{lineno}", text
    except DataError as err:
        if peek is None and str(err) == f"{name}: file is empty":
            return
        raise


def check_vocabulary(path: str | Path, tokenizer_size: int, model_size: int, *, key: str) -> None:
    """A tokenizer file must fit the model it was saved with: found at load, before any output."""
    if tokenizer_size != model_size:
        raise DataError(f"{path}: the tokenizer has {tokenizer_size} tokens, but the model's {key} is {model_size}; "
                        "the run's tokenizer file was replaced or belongs to another run")


def chunked(items: Iterable, size: int = CHUNK_LINES) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter), pulled lazily from ``items``."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
