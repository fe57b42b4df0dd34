"""Shared builders for the tests: tiny corpora and configs written to a temp folder."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

WORDS = "the a red blue dog cat runs sits on under big small man woman child ball green house".split()
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_copy_corpus(folder: Path, *, n_train: int = 200, n_valid: int = 20, reverse: bool = False,
                      seed: int = 0) -> Path:
    """Aligned files {folder}/train.src|tgt and val.src|tgt of a copy (or reverse) task."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_valid)):
        src, tgt = [], []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
            src.append(" ".join(words))
            tgt.append(" ".join(reversed(words) if reverse else words))
        (folder / f"{split}.src").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{split}.tgt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return folder


def tiny_translation_config(data_dir: Path, **train) -> dict:
    return {
        "task": "translation",
        "data": {"dir": str(data_dir), "src_lang": "src", "tgt_lang": "tgt", "vocab_size": 60,
                 "max_tokens": 256, "max_len": 32},
        "model": {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_encoder_layers": 1, "n_decoder_layers": 1,
                  "dropout": 0.1, "norm_first": True, "share_embeddings": True},
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "noam", "warmup_steps": 10, "max_steps": 8,
                  "eval_every": 1000, "save_every": 4, "log_every": 2, "label_smoothing": 0.1, **train},
        "decode": {"beam_size": 2, "batch_size": 16},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
