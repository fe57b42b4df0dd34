"""Tasks: the glue between a model family, its data, its loss and its evaluation.

Each task module registers a :class:`TaskSpec`; the engine (qkv.train) and the CLI use only this
interface, so a new family plugs in without touching them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data_config: type
    model_config: type
    decode_config: type
    #: (run_cfg, run_dir, *, resume) -> a qkv.train.Task (reads and validates data, builds tokenizers)
    make_task: Callable[..., Any]
    #: run_cfg -> nn.Module with the resolved config
    build_model: Callable[[Any], Any]
    #: (run_cfg, run_dir) -> artifacts (tokenizers, label names, ...) needed at inference
    load_artifacts: Callable[[Any, Any], Any]


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def _register_builtin() -> None:
    from qkv.tasks import classification, lm, rnn_translation, translation, vision  # noqa: F401


_register_builtin()
