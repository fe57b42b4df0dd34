"""Export to ONNX (``torch.onnx.export``), checked in ONNX Runtime: text encoders, ViTs, language models.

Each exporter is ``fn(run, out) -> dict`` (the family objects name them in ``exporters``):

* ``text_encoder``: inputs ``input_ids``, ``attention_mask`` (1 = real token), ``token_type_ids``,
  each (batch, length) int64; output ``logits`` (batch, classes) for a classifier, ``embeddings``
  (batch, D), unit length, for a sentence embedder;
* ``image_encoder``: input ``pixel_values`` (batch, C, H, W) float32, normalised with the run's
  mean/std (``images.json``); output ``logits`` or ``embeddings``;
* ``language_model``: input ``input_ids`` (batch, length) int64; output ``logits`` (batch, length, V).

Batch and length are dynamic axes (an image's size is fixed: the position table is the
training grid's). The graph is exported with the dynamo exporter (``torch.export``), falling
back to the TorchScript exporter when it cannot; under ``torch.export`` the models' data-dependent
fast paths (EncoderOnly's unpadding, which reads how much of a batch is padding) are not taken,
so the graph is the dense path, which gives the same outputs at real tokens. Every export is
run in ONNX Runtime on two inputs of different batch sizes and lengths (with padding, for text)
and compared with the PyTorch model: the largest difference is in the summary, and an export
further than ``TOLERANCE`` from qkv is an error, not a file.

onnx, onnxruntime and onnxscript are the ``export`` extra: they are imported when an exporter runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qkv.errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOLERANCE = 1e-4
OPSET = 18


# -- files ------------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _requires(*modules: str) -> None:
    """ConfigError naming the extra when an optional package is missing."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"exporting needs {name}: pip install 'qkv[export]' "
                              "(onnx, onnxruntime, onnxscript, ctranslate2)") from None


# -- export-only wrappers: the ONNX names and dtypes around a model's own forward ------------------
class TextGraph(nn.Module):
    """(input_ids, attention_mask, token_type_ids) (B, T) int64 -> the model's output (its forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, segment_ids=token_type_ids, mask=attention_mask.bool())


class IdsGraph(nn.Module):
    """input_ids (B, T) int64 -> the model's output (a language model: logits (B, T, V))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


# -- example inputs: two shapes, so that a fixed axis would show ------------------------------------
def text_inputs(batch: int, length: int, *, vocab_size: int, pad_id: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids (B, T) with the last row padded after its first half (the mask says so)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(4, vocab_size - 1), vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, max(1, length // 2):] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def ids_inputs(batch: int, length: int, *, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab_size, (batch, length), generator=g)}


def image_inputs(batch: int, *, channels: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


# -- export and check ------------------------------------------------------------------------------
def export_graph(graph: nn.Module, example: dict[str, torch.Tensor], path: Path, *, output: str,
                 dynamic: dict[str, dict[int, str]], max_length: int | None = None) -> str:
    """Write ``graph`` as ONNX at ``path``; returns how it was traced.

    ``dynamic``: input name -> {axis: "batch" | "length"}; ``max_length`` bounds the length axis
    (a learned position table's size). ``torch.export`` traces first, non-strict, then strict
    (non-strict turns ``len(x)`` into a constant, which ViT's class token needs symbolic); the
    TorchScript exporter is the fallback.
    """
    names, args = list(example), tuple(example.values())
    shapes = _dynamic_shapes(dynamic, max_length)
    for strict in (False, True):
        try:
            program = torch.export.export(graph, args, dynamic_shapes={n: shapes[n] for n in names}, strict=strict)
        except Exception as err:  # torch.export raises many types; the next tracer is tried
            logger.info("torch.export(strict=%s) failed: %s", strict, str(err).splitlines()[0] if str(err) else err)
            continue
        onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=names, output_names=[output],
                                         opset_version=OPSET, verbose=False)
        onnx_program.save(str(path))
        return "torch.export (strict)" if strict else "torch.export"
    logger.warning("torch.export cannot trace %s; using the TorchScript ONNX exporter", type(graph).__name__)
    torch.onnx.export(graph, args, str(path), dynamo=False, input_names=names, output_names=[output],
                      dynamic_axes=dynamic, opset_version=OPSET)
    return "torchscript"


def _dynamic_shapes(dynamic: dict[str, dict[int, str]], max_length: int | None) -> dict[str, dict]:
    """The same torch.export.Dim object for each axis name, so that inputs share their batch and length."""
    dims = {"batch": torch.export.Dim("batch"),
            "length": torch.export.Dim("length", max=max_length) if max_length else torch.export.Dim("length")}
    return {name: {axis: dims[kind] for axis, kind in axes.items()} for name, axes in dynamic.items()}


def check_in_onnxruntime(path: Path, graph: nn.Module, examples: list[dict[str, torch.Tensor]]) -> float:
    """The largest |ONNX Runtime - PyTorch| over the outputs of ``examples`` (each a dict of inputs).

    ConfigError when it exceeds TOLERANCE (the export would not compute what qkv computes).
    """
    import numpy as np
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for example in examples:
        try:
            (ours,) = session.run(None, {k: v.numpy() for k, v in example.items()})
        except Exception as err:  # onnxruntime's own error types: a fixed axis shows here
            raise ConfigError(f"{path}: ONNX Runtime cannot run inputs of shape {_shape(example)}: "
                              f"{str(err).splitlines()[0]}") from None
        with torch.no_grad():
            reference = graph(*example.values()).float().numpy()
        if ours.shape != reference.shape:
            raise ConfigError(f"{path}: ONNX Runtime gives shape {ours.shape}, qkv {reference.shape}")
        worst = max(worst, float(np.abs(ours - reference).max()) if ours.size else 0.0)
    if worst > TOLERANCE:
        raise ConfigError(f"{path}: ONNX Runtime differs from qkv by {worst:.3g} (> {TOLERANCE})")
    return worst


def _export(run, out: Path, graph: nn.Module, examples: list[dict[str, torch.Tensor]], *, output: str,
            dynamic: dict[str, dict[int, str]], max_length: int | None,
            extra_files: Callable[[Path], None]) -> dict:
    """The steps every exporter shares: folder, graph, ONNX Runtime check, side files, summary."""
    from qkv.export import prepare_out, summary

    _requires("onnx", "onnxruntime", "onnxscript")
    out = prepare_out(out)
    graph = graph.eval()
    path = out / MODEL_FILE
    with torch.no_grad():
        exporter = export_graph(graph, examples[0], path, output=output, dynamic=dynamic, max_length=max_length)
    worst = check_in_onnxruntime(path, graph, examples)
    extra_files(out)
    io = {"inputs": {name: _axes(example_input, dynamic.get(name, {}))
                     for name, example_input in examples[0].items()}, "output": output}
    write_json(out / "onnx.json", {"run_dir": str(run.run_dir), "kind": run.kind, **io})
    return summary("onnx", out, kind=run.kind, exporter=exporter, opset=OPSET, **io,
                   checked={"runtime": "onnxruntime", "shapes": [_shape(e) for e in examples],
                            "max_abs_diff": worst, "tolerance": TOLERANCE})


def _axes(tensor: torch.Tensor, dynamic: dict[int, str]) -> list[str | int]:
    """An input's shape as ONNX names it: a dynamic axis by its name, a fixed one by its size."""
    return [dynamic.get(i, size) for i, size in enumerate(tensor.shape)]


def _shape(example: dict[str, torch.Tensor]) -> list[int]:
    return list(next(iter(example.values())).shape)


def _output_name(run) -> str:
    """``logits`` for a run that classifies, else ``embeddings`` (the family says what it predicts)."""
    return "logits" if "classify" in run.predicts else "embeddings"


# -- the exporters ---------------------------------------------------------------------------------
def text_encoder(run, out: Path) -> dict:
    """A text classifier (logits) or sentence embedder (unit embeddings) as ONNX, with its tokenizer
    (``tokenizer.json``, HF format) and, for a classifier, ``labels.json``."""
    cfg = run.cfg.model
    size = dict(vocab_size=cfg.vocab_size, pad_id=cfg.pad_id)
    examples = [text_inputs(2, min(7, cfg.max_len), seed=0, **size),
                text_inputs(3, min(12, cfg.max_len), seed=1, **size)]
    axes = {"batch": 0, "length": 1}
    dynamic = {name: {i: kind for kind, i in axes.items()} for name in examples[0]}

    def side_files(folder: Path) -> None:
        run.artifacts.tokenizer.save(folder / "tokenizer.json")
        if "classify" in run.predicts:
            write_json(folder / "labels.json", list(run.artifacts.label_names))

    return _export(run, out, TextGraph(run.model), examples, output=_output_name(run), dynamic=dynamic,
                   max_length=cfg.max_len, extra_files=side_files)


def image_encoder(run, out: Path) -> dict:
    """A ViT classifier (logits) or image embedder (unit embeddings) as ONNX, with ``images.json``
    (class names and the mean/std that normalise ``pixel_values``)."""
    cfg = run.cfg.model
    shape = dict(channels=cfg.channels, size=cfg.image_size)
    examples = [image_inputs(2, seed=0, **shape), image_inputs(5, seed=1, **shape)]

    def side_files(folder: Path) -> None:
        run.artifacts.save(folder / "images.json")

    return _export(run, out, ImageGraph(run.model), examples, output=_output_name(run),
                   dynamic={"pixel_values": {0: "batch"}}, max_length=None, extra_files=side_files)


class ImageGraph(nn.Module):
    """pixel_values (B, C, H, W) -> the model's output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def language_model(run, out: Path) -> dict:
    """A decoder-only language model's forward (logits for every position) as ONNX, with its tokenizer."""
    cfg = run.cfg.model
    examples = [ids_inputs(2, min(5, cfg.block_size), vocab_size=cfg.vocab_size, seed=0),
                ids_inputs(3, min(9, cfg.block_size), vocab_size=cfg.vocab_size, seed=1)]

    def side_files(folder: Path) -> None:
        run.artifacts.save(folder / "tokenizer.json")

    return _export(run, out, IdsGraph(run.model), examples, output="logits",
                   dynamic={"input_ids": {0: "batch", 1: "length"}}, max_length=cfg.block_size,
                   extra_files=side_files)
