"""Tasks: the glue between a model family, its data, its loss and its evaluation.

Each task module registers a :class:`TaskSpec`: how to train (``make_task``, ``build_model``) and
what a trained run does (``inference``: a :class:`qkv.tasks.inference.LoadedRun` class, what
``qkv.load`` returns). The engine (qkv.train), the CLI, ``qkv cv`` and the pictures use only this
interface, so a new family plugs in without touching them (tests/test_no_task_names.py keeps it so).
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
    #: (cfg, model, artifacts, run_dir, device) -> the run's family object (a LoadedRun subclass)
    inference: type


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def _register_builtin() -> None:
    from qkv.tasks import classification, lm, rnn_translation, translation, vision  # noqa: F401


_register_builtin()
