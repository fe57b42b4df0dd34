"""ONNX export (qkv.export.onnx): ONNX Runtime computes what qkv computes, at two batch sizes and lengths.

One tiny run per family (2 training steps: equality is the point). Text inputs come from the run's
own tokenizer with padding, so the graph's dense path is compared with qkv's (which unpads such
batches); each family's output is compared with the public API's (``run.embed``) or the model's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import qkv  # noqa: E402
from qkv.errors import ConfigError  # noqa: E402
from qkv.export import onnx as qkv_onnx  # noqa: E402
from tests.test_api import _configs, _train  # noqa: E402

FAMILIES = ("classification", "embedding", "image_classification", "image_embedding", "lm")
TEXTS = [["good film number 3", "bad"], ["a bad film", "good good film number 12 and more words", "film", "x", ""]]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    configs = _configs(root)
    out = {}
    for task in FAMILIES:
        (root / task).mkdir()
        out[task] = _train(configs[task], root / task)
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Each family exported once through the family object: (summary, folder)."""
    root = tmp_path_factory.mktemp("exported")
    return {task: (qkv.load(runs[task]).export("onnx", root / task), root / task) for task in FAMILIES}


def _session(folder: Path):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _text_batch(run, texts: list[str]) -> dict[str, np.ndarray]:
    ids, segments, mask = run.artifacts.tokenizer.collate(texts)
    return {"input_ids": ids.numpy(), "attention_mask": mask.long().numpy(), "token_type_ids": segments.numpy()}


@pytest.mark.parametrize("task", FAMILIES)
def test_the_summary_names_the_files_axes_and_the_check(exported, task):
    summary, folder = exported[task]
    assert summary["format"] == "onnx" and summary["out"] == str(folder)
    assert "model.onnx" in summary["files"] and all((folder / f).is_file() for f in summary["files"])
    assert summary["exporter"].startswith("torch.export")
    assert summary["checked"]["max_abs_diff"] <= TOLERANCE
    first, second = summary["checked"]["shapes"]
    assert first[0] != second[0], "two batch sizes"
    names = {name: shape for name, shape in summary["inputs"].items()}
    assert all(shape[0] == "batch" for shape in names.values())
    side = json.loads((folder / "onnx.json").read_text(encoding="utf-8"))
    assert side["inputs"] == summary["inputs"] and side["output"] == summary["output"]


@pytest.mark.parametrize("task", ["classification", "embedding"])
def test_text_encoders_equal_qkv_with_padding_at_two_shapes(runs, exported, task):
    run = qkv.load(runs[task])
    _, folder = exported[task]
    session = _session(folder)
    (output,) = [o.name for o in session.get_outputs()]
    assert output == ("logits" if task == "classification" else "embeddings")
    shapes = set()
    for texts in TEXTS:
        inputs = _text_batch(run, texts)
        shapes.add(inputs["input_ids"].shape)
        (ours,) = session.run(None, inputs)
        with torch.no_grad():
            reference = run.model(torch.from_numpy(inputs["input_ids"]),
                                  segment_ids=torch.from_numpy(inputs["token_type_ids"]),
                                  mask=torch.from_numpy(inputs["attention_mask"]).bool())
        np.testing.assert_allclose(ours, reference.numpy(), atol=TOLERANCE)
        if task == "embedding":
            np.testing.assert_allclose(ours, run.embed(texts), atol=TOLERANCE)
    assert len({s[0] for s in shapes}) == 2 and len({s[1] for s in shapes}) == 2
    assert (folder / "tokenizer.json").is_file()
    if task == "classification":
        assert json.loads((folder / "labels.json").read_text(encoding="utf-8")) == run.artifacts.label_names


@pytest.mark.parametrize("task", ["image_classification", "image_embedding"])
def test_image_encoders_equal_qkv_at_two_batch_sizes(runs, exported, task):
    run = qkv.load(runs[task])
    _, folder = exported[task]
    session = _session(folder)
    size, channels = run.cfg.model.image_size, run.cfg.model.channels
    for batch in (1, 6):
        pixels = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))
        (ours,) = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            reference = run.model(pixels)
        np.testing.assert_allclose(ours, reference.numpy(), atol=TOLERANCE)
    saved = json.loads((folder / "images.json").read_text(encoding="utf-8"))
    assert saved["mean"] == run.artifacts.mean and saved["std"] == run.artifacts.std


def test_the_language_model_equals_qkv_at_two_shapes(runs, exported):
    run = qkv.load(runs["lm"])
    _, folder = exported["lm"]
    session = _session(folder)
    for prompts in (["HAMLET:\n"], ["To be, or", "KING:", "QUEEN: To be"]):
        ids = [run.artifacts.encode(p) for p in prompts]
        width = min(map(len, ids))
        batch = torch.tensor([x[:width] for x in ids])  # (B, T) without padding
        (ours,) = session.run(None, {"input_ids": batch.numpy()})
        with torch.no_grad():
            reference = run.model(batch)
        np.testing.assert_allclose(ours, reference.numpy(), atol=TOLERANCE)


def test_a_foreign_folder_is_refused_and_nothing_written(runs, tmp_path):
    run = qkv.load(runs["lm"])
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match=r"photos: the folder is not empty .*cat\.jpg"):
        run.export("onnx", tmp_path / "photos")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_an_export_further_than_the_tolerance_is_an_error(runs, tmp_path, monkeypatch):
    """The check can fail: a graph that computes something else (logits + 1) is refused."""
    run = qkv.load(runs["lm"])
    monkeypatch.setattr(qkv_onnx, "IdsGraph", _OffByOne)
    with pytest.raises(ConfigError, match="ONNX Runtime differs from qkv by 1"):
        qkv_onnx.language_model(run, tmp_path / "out")


class _OffByOne(qkv_onnx.IdsGraph):
    """Exports logits + 1, while its forward in PyTorch (the reference) stays the model's."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids)
        return logits + 1 if torch.compiler.is_compiling() else logits


def test_importing_the_exporter_imports_no_onnx_package():
    code = ("import sys, qkv.export.onnx, qkv.export.ct2; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'ctranslate2') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
