"""Tiny trained runs of each family, shared by the bad-input catalogue (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkv.cli import main
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus

TEXT = "".join(f"{name}:\nTo be, or not to be, that is the question {i}.\n\n"
               for i, name in enumerate(["HAMLET", "OPHELIA", "KING", "QUEEN"] * 10))


def lm_config(text: Path) -> dict:
    return {
        "task": "lm",
        "data": {"train": [str(text)], "tokenizer": "char", "batch_size": 4, "eval_batches": 2},
        "model": {"block_size": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "constant", "warmup_steps": 1, "max_steps": 2,
                  "label_smoothing": 0.0, "eval_every": 2, "save_every": 2, "log_every": 1},
        "decode": {"max_new_tokens": 4},
    }


def classification_config(folder: Path) -> dict:
    rows = [("pos" if i % 2 else "neg", f"{'good' if i % 2 else 'bad'} film number {i}") for i in range(24)]
    for name in ("train.tsv", "valid.tsv"):
        (folder / name).write_text("label\ttext\n" + "".join(f"{a}\t{b}\n" for a, b in rows), encoding="utf-8")
    return {
        "task": "classification",
        "data": {"train": str(folder / "train.tsv"), "valid": str(folder / "valid.tsv"), "vocab_size": 60,
                 "min_frequency": 1, "max_len": 16, "batch_size": 8},
        "model": {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1, "max_len": 16, "dropout": 0.0,
                  "attn_dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant", "warmup_steps": 1, "max_steps": 2,
                  "eval_every": 2, "save_every": 2, "log_every": 1, "label_smoothing": 0.0},
    }


def image_config(npz: Path) -> dict:
    """A tiny ViT on 40 random 8x8 grey images of 2 classes stored as an .npz."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y=np.array(["a", "b"] * 20))
    return {
        "task": "image_classification",
        "data": {"source": str(npz), "batch_size": 8, "valid_fraction": 0.2, "test_fraction": 0.2},
        "model": {"image_size": 8, "channels": 1, "patch_size": 4, "d_model": 16, "n_heads": 2, "d_ff": 32,
                  "n_layers": 1},
        "train": {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant", "warmup_steps": 1, "max_steps": 2,
                  "eval_every": 2, "save_every": 2, "log_every": 1, "label_smoothing": 0.0},
    }


def _train(config: dict, folder: Path) -> Path:
    path = write_config(folder / "config.yaml", config)
    assert main(["train", str(path), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """{"translation", "lm", "classification", "image"}: trained run directories (2 steps each)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "tr").mkdir()
    data = write_copy_corpus(root / "tr" / "data", n_train=40, n_valid=4)
    out = {"translation": _train(tiny_translation_config(data, max_steps=2, save_every=2), root / "tr")}
    (root / "lm").mkdir()
    (root / "lm" / "text.txt").write_text(TEXT, encoding="utf-8")
    out["lm"] = _train(lm_config(root / "lm" / "text.txt"), root / "lm")
    (root / "cls").mkdir()
    out["classification"] = _train(classification_config(root / "cls"), root / "cls")
    (root / "img").mkdir()
    out["image"] = _train(image_config(root / "img" / "images.npz"), root / "img")
    return out
