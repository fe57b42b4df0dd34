"""Seed ensembles and test-time augmentation for image classifiers (qkv.tasks.image_inference):
the views, the averaged probabilities against a hand computation, the CLI flags, the checks that keep
an ensemble honest, and `qkv cv --seeds ... --tta` scoring every variant on the same folds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import write_config
from test_cv import fast_config
from test_vision_task import digit_pngs, tiny_vision_config

from qkv.cli import main
from qkv.data.images import normalize, shift_views
from qkv.run import load_run
from qkv.tasks.image_inference import Member, class_log_probs, load_members

pytest.importorskip("sklearn")


def test_shift_views_move_the_content_one_pixel_and_fill_zeros():
    image = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    same, left, right, up, down = shift_views(image)
    assert torch.equal(same, image)
    assert torch.equal(left[0, 0, :, :3], image[0, 0, :, 1:]) and not left[0, 0, :, 3].any()
    assert torch.equal(right[0, 0, :, 1:], image[0, 0, :, :3]) and not right[0, 0, :, 0].any()
    assert torch.equal(up[0, 0, :3], image[0, 0, 1:]) and not up[0, 0, 3].any()
    assert torch.equal(down[0, 0, 1:], image[0, 0, :3]) and not down[0, 0, 0].any()
    with pytest.raises(ValueError, match="pixels must be >= 1"):
        shift_views(image, 0)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two tiny digit classifiers, the same recipe and split, seeds 1 and 2."""
    root = tmp_path_factory.mktemp("ensemble")
    config = fast_config(root)
    runs = []
    for seed in (1, 2):
        out = root / f"seed_{seed}"
        assert main(["train", str(config), "--out", str(out), "--quiet", "--threads", "1",
                     "--set", f"train.seed={seed}"]) == 0
        runs.append(out)
    return runs


def by_hand(members: list[Member], images: torch.Tensor, views) -> torch.Tensor:
    """mean over members and views of softmax(model(normalise(view))): (N, classes)."""
    probs = []
    with torch.no_grad():
        for m in members:
            for view in views(images):
                probs.append(m.model(normalize(view, m.artifacts.mean, m.artifacts.std)).softmax(-1))
    return torch.stack(probs).mean(0)


def test_averaged_probabilities_equal_a_hand_computation(two_seeds):
    members = load_members(two_seeds, device="cpu")
    images = torch.rand(7, 1, 8, 8)
    one = class_log_probs(members[:1], images, batch_size=7, tta=False)  # one batch, as below
    with torch.no_grad():
        plain = members[0].model(normalize(images, members[0].artifacts.mean, members[0].artifacts.std))
    assert torch.equal(one, plain.log_softmax(-1))  # one model, no TTA: the model's own log-softmax
    for chosen, tta in ((members, False), (members[:1], True), (members, True)):
        expected = by_hand(chosen, images, shift_views if tta else (lambda x: [x]))
        got = class_log_probs(chosen, images, batch_size=3, tta=tta).exp()
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.allclose(got.sum(-1), torch.ones(7), atol=1e-6)
    assert not torch.allclose(class_log_probs(members, images, batch_size=8, tta=False), one, atol=1e-3)


def test_evaluate_with_an_ensemble_and_tta(two_seeds, capsys):
    first, second = two_seeds
    scores = {}
    for flags in ([], ["--tta"], ["--ensemble", str(second)], ["--ensemble", str(second), "--tta"]):
        assert main(["evaluate", str(first), *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["examples"] == 359 and result["tta"] == ("--tta" in flags)
        assert ("members" in result) == ("--ensemble" in flags)
        assert sum(map(sum, result["confusion"])) == 359
        scores[tuple(flags)] = result
    assert scores[()]["accuracy"] > 0.2  # 40 steps: above chance
    members = load_members(two_seeds, device="cpu")
    cfg, *_ = load_run(first)
    from qkv.tasks.vision import load_split_images, read_split

    test = load_split_images(cfg, read_split(first))["test"]
    expected = by_hand(members, test.images, shift_views)
    accuracy = float((expected.argmax(-1) == test.labels).float().mean())
    loss = float(-expected[torch.arange(359), test.labels].log().mean())
    result = scores[("--ensemble", str(second), "--tta")]
    assert result["accuracy"] == pytest.approx(accuracy) and result["loss"] == pytest.approx(loss, rel=1e-5)


def test_classify_images_with_an_ensemble(two_seeds, tmp_path, capsys):
    paths = [str(p) for p in digit_pngs(tmp_path, count=2)]
    assert main(["classify", str(two_seeds[0]), "--image", *paths, "--ensemble", str(two_seeds[1]), "--tta"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    assert all(0.0 < float(line.split("\t")[2]) <= 1.0 for line in lines)


def test_an_ensemble_must_share_the_split_and_the_task(two_seeds, tmp_path, capsys):
    config = fast_config(tmp_path, split_seed=5)
    other = tmp_path / "other_split"
    assert main(["train", str(config), "--out", str(other), "--quiet", "--threads", "1",
                 "--set", "train.max_steps=1"]) == 0
    assert main(["evaluate", str(two_seeds[0]), "--ensemble", str(other)]) == 2
    err = capsys.readouterr().err
    assert "recorded test split differs" in err and str(other) in err and "Traceback" not in err
    bigger = tmp_path / "bigger"  # the same digits resized to 16 x 16: another model input
    assert main(["train", str(config), "--out", str(bigger), "--quiet", "--threads", "1", "--set", "train.max_steps=1",
                 "--set", "model.image_size=16", "--set", "data.split_seed=0"]) == 0
    assert main(["classify", str(two_seeds[0]), "--ensemble", str(bigger), "--image",
                 str(digit_pngs(tmp_path, count=1)[0])]) == 2
    assert "images of (16, 1) (size, channels)" in capsys.readouterr().err
    embedding = tmp_path / "embedding"
    config = write_config(tmp_path / "embed.yaml", {**tiny_vision_config("image_embedding"),
                                                    "train": {**tiny_vision_config()["train"], "max_steps": 1}})
    assert main(["train", str(config), "--out", str(embedding), "--quiet", "--threads", "1"]) == 0
    assert main(["evaluate", str(two_seeds[0]), "--ensemble", str(embedding)]) == 2
    assert "'image_embedding' run" in capsys.readouterr().err
    assert main(["evaluate", str(embedding), "--tta"]) == 2
    assert "image-embedding run: evaluate takes no --tta (it takes: --data, --split)" in capsys.readouterr().err


def test_cv_scores_each_seed_the_ensemble_and_tta_on_the_same_folds(tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["cv", str(fast_config(tmp_path)), "--folds", "2", "--jobs", "2", "--threads", "1",
                 "--out", str(out), "--seeds", "1", "2", "--tta"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "cv.json").read_text())
    names = ["seed_1", "seed_1+tta", "seed_2", "seed_2+tta", "ensemble", "ensemble+tta"]
    assert list(result["variants"]) == names and result["recipe"] == printed["recipe"] == "ensemble+tta"
    assert result["pooled"] == result["variants"]["ensemble+tta"]["pooled"] == printed["pooled"]
    assert set(printed["pooled_by_variant"]) == set(names)
    for seed in (1, 2):  # each seed's folds are its own runs, trained with that seed
        for k in range(2):
            assert json.loads((out / f"seed_{seed}" / f"fold_{k}" / "config.json").read_text())["train"]["seed"] == seed
    # the ensemble's figure on fold 1 is what `qkv evaluate --split valid --ensemble --tta` says
    assert main(["evaluate", str(out / "seed_1" / "fold_1"), "--split", "valid", "--tta",
                 "--ensemble", str(out / "seed_2" / "fold_1")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert result["per_fold"][1]["accuracy"] == pytest.approx(scored["accuracy"])
    assert result["per_fold"][1]["run_dirs"] == [str(out / "seed_1" / "fold_1"), str(out / "seed_2" / "fold_1")]
    examples = result["examples"]
    for summary in result["variants"].values():
        assert summary["examples"] == examples == 1438
        assert math.isclose(summary["pooled"] * examples, round(summary["pooled"] * examples), abs_tol=1e-6)


@pytest.mark.parametrize("args, match", [
    (["--seeds", "1", "1"], "--seeds needs distinct seeds"),
    (["--seeds", "1", "2", "--set", "train.seed=3"], "--seeds sets it for each run"),
])
def test_cv_rejects_bad_seed_arguments(tmp_path, capsys, args, match):
    assert main(["cv", str(fast_config(tmp_path)), "--out", str(tmp_path / "cv"), *args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "cv" / "seed_1").exists()


def test_cv_ensembles_need_a_classifier(tmp_path, capsys):
    config = write_config(tmp_path / "embed.yaml", tiny_vision_config("image_embedding"))
    assert main(["cv", str(config), "--out", str(tmp_path / "cv"), "--tta"]) == 2
    assert "need class probabilities" in capsys.readouterr().err


def test_decode_tta_in_the_run_config_is_the_default(two_seeds, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_seeds[0], run)
    config = json.loads((run / "config.json").read_text())
    assert config["decode"]["tta"] is False  # recorded in every image run
    config["decode"]["tta"] = True
    (run / "config.json").write_text(json.dumps(config))
    results = []
    for flags in ([], ["--tta"], ["--no-tta"]):
        assert main(["evaluate", str(run), *flags]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["tta"] is True and results[0]["loss"] == results[1]["loss"]
    assert results[2]["tta"] is False and results[2]["loss"] != results[0]["loss"]
