"""The image tasks end to end through the CLI: train, evaluate (test split, confusion matrix),
classify --image, attention pictures, the recorded split, the SVM baseline, and image embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_config
from PIL import Image

from qkv.cli import main
from qkv.run import load_config, load_run

pytest.importorskip("sklearn")


def tiny_vision_config(task: str = "image_classification", **data) -> dict:
    return {
        "task": task,
        "data": {"source": "digits", "valid_fraction": 0.1, "test_fraction": 0.2, "batch_size": 64,
                 "shift": 0.0, "svm_baseline": task == "image_classification", **data},
        "model": {"image_size": 8, "channels": 1, "patch_size": 2, "d_model": 32, "n_heads": 4, "d_ff": 64,
                  "n_layers": 2, "dropout": 0.0, "pooling": "mean"},  # mean pooling learns fastest from scratch
        "train": {"optimizer": "adamw", "lr": 3e-3, "betas": [0.9, 0.999], "schedule": "cosine",
                  "warmup_steps": 10, "max_steps": 150, "eval_every": 75, "save_every": 75, "log_every": 25,
                  "label_smoothing": 0.0, "seed": 1},
        "decode": {"batch_size": 128},
    }


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    config = write_config(root / "digits.yaml", tiny_vision_config())
    out = root / "run"
    assert main(["train", str(config), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    return out


def digit_pngs(folder, count: int = 4):
    """The first ``count`` digits of each class 0 and 1 as 8x8 PNGs, the way a user would save them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for label in (0, 1):
        for i in np.flatnonzero(digits.target == label)[:count]:
            path = folder / str(label) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(digits.images[i] / 16 * 255).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def test_training_learns_digits_and_records_split_and_baseline(digits_run):
    split = json.loads((digits_run / "split.json").read_text())
    assert split["source"] == "digits" and split["seed"] == 0
    assert len(split["train"]) + len(split["valid"]) + len(split["test"]) == 1797
    assert not set(split["train"]) & set(split["test"])
    images = json.loads((digits_run / "images.json").read_text())
    assert images["label_names"] == list("0123456789") and len(images["mean"]) == 1
    baseline = json.loads((digits_run / "baseline.json").read_text())
    assert baseline["test_images"] == len(split["test"]) and baseline["test_accuracy"] > 0.95
    valid = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in valid if r["split"] == "valid"][-1]
    assert last["accuracy"] > 0.6  # 150 steps of a 2-layer model: far above chance (0.1)
    assert "attention.png" not in {p.name for p in digits_run.iterdir()}


def test_the_rebuilt_run_has_the_resolved_model(digits_run):
    cfg, model, artifacts = load_run(digits_run)
    assert cfg.model.n_classes == 10 and model.head.out_features == 10
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_evaluate_scores_the_recorded_test_split_with_a_confusion_matrix(digits_run, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in digits_run.iterdir() if p.is_file()}
    assert main(["evaluate", str(digits_run), "--confusion", str(tmp_path / "c.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    split = json.loads((digits_run / "split.json").read_text())
    assert result["task"] == "image_classification" and result["examples"] == len(split["test"])
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == len(split["test"])
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert json.loads((tmp_path / "c.json").read_text())["matrix"] == result["confusion"]
    after = {p.name: p.read_bytes() for p in digits_run.iterdir() if p.is_file()}
    assert after == before  # evaluate writes nothing into the run (the training-time confusion.json stays)


def test_evaluate_on_a_folder_of_class_subfolders(digits_run, tmp_path, capsys):
    digit_pngs(tmp_path / "set")
    assert main(["evaluate", str(digits_run), "--data", str(tmp_path / "set")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 8 and np.array(result["confusion"]).sum() == 8
    assert result["accuracy"] >= 0.75  # 0s and 1s are the easiest digits


def test_classify_images_prints_file_label_probability(digits_run, tmp_path, capsys):
    paths = digit_pngs(tmp_path)
    assert main(["classify", str(digits_run), "--image", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths)
    rows = [line.split("\t") for line in lines]
    assert [r[0] for r in rows] == list(map(str, paths))
    assert all(0.0 < float(r[2]) <= 1.0 for r in rows)
    correct = sum(r[1] == p.parent.name for r, p in zip(rows, paths))
    assert correct >= 6


def test_classify_resizes_a_larger_image_or_rejects_it_naming_the_file(digits_run, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(big)
    assert main(["classify", str(digits_run), "--image", str(big)]) == 0  # data.resize is true in the run
    assert len(capsys.readouterr().out.splitlines()) == 1
    missing = tmp_path / "missing.png"
    assert main(["classify", str(digits_run), "--image", str(missing)]) == 2
    assert f"{missing}: file not found" in capsys.readouterr().err


def test_attention_draws_layers_and_rollout(digits_run, tmp_path, capsys):
    image = digit_pngs(tmp_path, count=1)[0]
    out = tmp_path / "pictures" / "attention.png"
    assert main(["attention", str(digits_run), "--image", str(image), "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and result["label"] in list("0123456789")
    with Image.open(out) as picture:
        assert picture.size[0] > 3 * picture.size[1]  # one row: image, 2 layers, rollout
    assert main(["attention", str(digits_run), "--out", str(out)]) == 2
    assert "--image F" in capsys.readouterr().err


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    config = write_config(tmp_path / "digits.yaml", tiny_vision_config(svm_baseline=False))
    out = tmp_path / "run"
    args = ["train", str(config), "--out", str(out), "--quiet", "--threads", "1"]
    assert main([*args, "--set", "train.max_steps=75"]) == 0
    split = (out / "split.json").read_text()
    assert main(["train", str(config), "--out", str(out), "--quiet", "--resume", "--set", "train.max_steps=100"]) == 0
    assert (out / "split.json").read_text() == split
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 100


def test_config_errors_name_the_key(tmp_path, capsys):
    config = tiny_vision_config()
    config["data"]["shift"] = -1.0
    path = write_config(tmp_path / "bad.yaml", config)
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "data" in capsys.readouterr().err
    config = tiny_vision_config()
    config["model"]["patch_size"] = 3
    with pytest.raises(ValueError, match="image_size=8 is not divisible by patch_size=3"):
        load_config(write_config(tmp_path / "bad2.yaml", config))


def test_image_embedding_puts_same_digits_nearest(tmp_path, capsys):
    config = tiny_vision_config("image_embedding", samples_per_class=8, loss="batch_all", margin=0.2)
    path = write_config(tmp_path / "triplet.yaml", config)
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "image_embedding" and result["nn_accuracy"] > 0.6 and result["separation"] > 0.7
    picture = tmp_path / "embedding-attention.png"
    image = digit_pngs(tmp_path, count=1)[0]
    assert main(["attention", str(out), "--image", str(image), "--out", str(picture)]) == 0
    assert "label" not in json.loads(capsys.readouterr().out) and picture.is_file()
