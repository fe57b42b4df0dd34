"""``data.init_from: RUN_DIR``: a new lm or translation run that starts from another run's weights.

The source is any run directory of the same task: one ``qkv train`` wrote, or one
``qkv.convert.import_hf`` made from a GPT-2 or Marian folder. The new run takes the source's
tokenizers (saved into the new run, sidecar of special ids included) and its architecture: the
model section may leave every field out; a field it does set (not the default) must equal the
source's, except the ``TUNABLE`` ones (dropout). The data fields that shape the vocabulary follow
the same rule. Anything else is a ConfigError naming the fields, before the first byte is written.
The weights are loaded by the task's ``build_model`` on a fresh run only; ``--resume`` continues
from the run's own checkpoint as always.

It lives in the data section, as the classifier's ``data.pretrained`` does: what it brings first
is the vocabulary (data), and the model section stays the architecture alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qkv.errors import ConfigError

TUNABLE = ("dropout", "attn_dropout")


def read_source(init_from: str, task: str):
    """The source run's resolved RunConfig; ConfigError when it is no run of ``task``."""
    from qkv.errors import CheckpointError
    from qkv.run import read_run_config

    path = Path(init_from)
    if not path.is_dir():
        raise ConfigError(f"data.init_from={init_from}: no such run directory")
    try:
        source = read_run_config(path)
    except CheckpointError as err:
        raise ConfigError(f"data.init_from={init_from}: not a run directory ({err})") from None
    if source.task != task:
        raise ConfigError(f"data.init_from={init_from} is a {source.task!r} run; a {task!r} run can start only "
                          f"from a {task!r} run")
    return source


def differing(ours, theirs, *, section: str, skip: tuple[str, ...] = ()) -> list[str]:
    """``section.field=ours (source: theirs)`` for each field set in ``ours`` (not its class default)
    that differs from ``theirs``."""
    default = type(ours)()
    out = []
    for f in dataclasses.fields(ours):
        if f.name in skip or not hasattr(theirs, f.name):
            continue
        mine, source = getattr(ours, f.name), getattr(theirs, f.name)
        if mine != getattr(default, f.name) and mine != source:
            out.append(f"{section}.{f.name}={mine!r} (the source has {source!r})")
    return out


def model_from_source(cfg, source, *, init_from: str, vocab_fields: tuple[str, ...]):
    """The source's model config with this run's TUNABLE fields; ConfigError naming every field the
    config sets otherwise than the source (model section, and the data fields ``vocab_fields``)."""
    wrong = differing(cfg.model, source.model, section="model", skip=TUNABLE)
    data_default = type(cfg.data)()
    for name in vocab_fields:
        mine, theirs = getattr(cfg.data, name), getattr(source.data, name)
        if mine != getattr(data_default, name) and mine != theirs:
            wrong.append(f"data.{name}={mine!r} (the source has {theirs!r})")
    if wrong:
        raise ConfigError(f"data.init_from={init_from}: the architecture and vocabulary come from the source "
                          f"run, but the config sets {', '.join(wrong)}; leave them out (the model section may "
                          f"set {list(TUNABLE)})")
    default = type(cfg.model)()
    tuned = {name: getattr(cfg.model, name) for name in TUNABLE
             if hasattr(default, name) and getattr(cfg.model, name) != getattr(default, name)}
    return dataclasses.replace(source.model, **tuned)


def load_source_weights(model, init_from: str) -> None:
    """The source run's final weights (or newest checkpoint) into ``model``; a mismatch names the tensor."""
    from qkv import checkpoint as ckpt
    from qkv.run import weights_path

    ckpt.load_weights(model, weights_path(Path(init_from)))
