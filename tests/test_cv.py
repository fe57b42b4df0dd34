"""Choosing an image recipe without the test set: `qkv cv` (K-fold cross-validation of the
non-test images), `qkv evaluate --split valid`, and the final fit on train + valid
(`data.train_on_valid`)."""

from __future__ import annotations

import json

import pytest
from helpers import write_config
from test_vision_task import tiny_vision_config

from qkv.cli import main

pytest.importorskip("sklearn")

FAST = {"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 20}


def fast_config(tmp_path, name="digits.yaml", *, train=None, **data):
    config = tiny_vision_config(**{"svm_baseline": False, **data})
    config["train"].update(FAST, **(train or {}))
    return write_config(tmp_path / name, config)


@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    out = root / "cv"
    assert main(["cv", str(fast_config(root)), "--folds", "3", "--jobs", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    return out


def test_cv_holds_out_every_non_test_image_once_and_pools_the_folds(cv_dir, capsys):
    result = json.loads((cv_dir / "cv.json").read_text())
    assert result["folds"] == 3 and result["metric"] == "accuracy" and len(result["per_fold"]) == 3
    splits = [json.loads((cv_dir / f"fold_{k}" / "split.json").read_text()) for k in range(3)]
    held_out = sorted(i for s in splits for i in s["valid"])
    assert held_out == sorted(splits[0]["train"] + splits[0]["valid"])  # each non-test image exactly once
    assert all(s["test"] == splits[0]["test"] for s in splits) and len(held_out) + len(splits[0]["test"]) == 1797
    examples = [f["examples"] for f in result["per_fold"]]
    assert examples == [len(s["valid"]) for s in splits] and result["examples"] == len(held_out)
    accuracies = [f["accuracy"] for f in result["per_fold"]]
    assert result["pooled"] == pytest.approx(sum(a * n for a, n in zip(accuracies, examples)) / sum(examples))
    assert min(accuracies) <= result["mean"] <= max(accuracies) and result["std"] >= 0
    assert result["pooled"] > 0.2 and result["selection_on_held_out_fold"] is False  # 40 steps: above chance
    # the figure of a fold is its final model on its held-out fold, as `qkv evaluate --split valid` says
    assert main(["evaluate", str(cv_dir / "fold_1"), "--split", "valid"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["examples"] == examples[1] and scored["accuracy"] == pytest.approx(accuracies[1])


def test_cv_reuses_finished_folds_and_resumes_an_unfinished_one(cv_dir, capsys):
    before = json.loads((cv_dir / "cv.json").read_text())
    logs = {k: (cv_dir / f"fold_{k}.log").read_text() for k in range(3)}
    (cv_dir / "fold_2" / "model.safetensors").unlink()  # fold 2 stopped after its last checkpoint
    config = json.loads((cv_dir / "fold_0" / "config.json").read_text())
    assert main(["cv", str(fast_config(cv_dir.parent, "again.yaml")), "--folds", "3", "--out", str(cv_dir),
                 "--threads", "1"]) == 0
    assert (cv_dir / "fold_0.log").read_text() == logs[0]  # not trained again
    assert (cv_dir / "fold_2.log").read_text() != logs[2] and (cv_dir / "fold_2" / "model.safetensors").exists()
    after = json.loads((cv_dir / "cv.json").read_text())
    assert after["pooled"] == pytest.approx(before["pooled"])  # the resumed fold exports the same model
    assert json.loads((cv_dir / "fold_0" / "config.json").read_text()) == config


@pytest.mark.parametrize("args, match", [
    (["--folds", "1"], "--folds must be >= 2"),
    (["--set", "data.cv_fold=1"], "cross-validation sets these itself"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--set", "data.train_on_valid=true"], "exclude each other"),
])
def test_cv_rejects_bad_arguments_before_training(tmp_path, capsys, args, match):
    out = tmp_path / "cv"
    assert main(["cv", str(fast_config(tmp_path)), "--out", str(out), *args]) == 2
    assert match in capsys.readouterr().err
    assert not (out / "fold_0").exists()


def test_cv_needs_an_image_task(tmp_path, capsys):
    config = write_config(tmp_path / "lm.yaml", {"task": "lm", "data": {"train": ["x.txt"]}})
    assert main(["cv", str(config), "--out", str(tmp_path / "cv")]) == 2
    assert "needs an image task" in capsys.readouterr().err


def test_a_failed_fold_is_reported_with_its_log(tmp_path, capsys):
    out = tmp_path / "cv"
    (out / "fold_0").mkdir(parents=True)
    (out / "fold_0" / "config.json").write_text("{not json")  # a broken run in the way: resuming it fails
    assert main(["cv", str(fast_config(tmp_path)), "--folds", "2", "--out", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "fold 0: training failed" in err and "fold_0.log" in err


def test_train_on_valid_trains_on_both_evaluates_nothing_and_keeps_the_test_set(tmp_path, capsys):
    config = fast_config(tmp_path, train_on_valid=True, svm_baseline=True)
    out = tmp_path / "final"
    assert main(["train", str(config), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["train_on_valid"] is True and split["valid"] == [] and len(split["train"]) == 1438
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["split"] == "train" for r in records)
    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["C_chosen_by"].startswith("5-fold cross-validation") and baseline["train_images"] == 1438
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == len(split["test"]) == 359
    assert main(["evaluate", str(out), "--split", "valid"]) == 2
    assert "the valid split is empty" in capsys.readouterr().err


def test_train_on_valid_refuses_early_stopping(tmp_path, capsys):
    config = fast_config(tmp_path, train={"patience": 3}, train_on_valid=True)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "train.patience=3 cannot stop early" in capsys.readouterr().err


def test_evaluate_split_and_data_exclude_each_other(cv_dir, capsys):
    assert main(["evaluate", str(cv_dir / "fold_0"), "--split", "valid", "--data", "x.npz"]) == 2
    assert "--split and --data exclude each other" in capsys.readouterr().err


def test_train_names_a_bad_fold_setting(tmp_path, capsys):
    config = fast_config(tmp_path, cv_folds=3, cv_fold=3)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "data.cv_folds=3 and data.cv_fold=3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
