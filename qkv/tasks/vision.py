"""Image classification and image embeddings on the Vision Transformer (qkv.models.vit).

Two tasks read the same labelled images (qkv.data.images):

* ``image_classification``: ``ViT`` with a linear head on the class token (or the patch mean),
  cross-entropy with label smoothing; evaluation: loss, accuracy, macro-F1, and the confusion
  matrix written to ``confusion.json``.
* ``image_embedding``: ``ImageEmbedder`` (the ViT's pooled output, unit length) trained with a
  loss of qkv.losses (batch-hard / batch-all triplets or supervised contrastive), as the text
  ``embedding`` task does; evaluation: leave-one-out nearest-neighbour accuracy and separation.

The run directory records everything inference needs (no hyperparameter restated):
``split.json`` (the source, the seed, the fractions and the train/valid/test indices),
``images.json`` (class names, the per-channel mean/std of the training images, image size and
channels) and, with ``data.svm_baseline``, ``baseline.json``: an RBF-kernel SVM (scikit-learn)
fitted on the same training images, C chosen on the validation images, scored on the same test
images, so the two are compared on one split in one run.

Training evaluates on the validation split; the test split is only read by ``qkv evaluate``.
Augmentation (a random affine shift/rotation/zoom, qkv.data.images.augment) is drawn afresh each
epoch from a generator seeded by (train.seed, epoch), so a resumed run sees the same images.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qkv import progress
from qkv.config import check_ranges, ranged, write_json
from qkv.data.classification import class_balanced_batches, sentence_batches
from qkv.data.images import (
    ImageSet,
    augment,
    channel_stats,
    check_folds,
    fit_images,
    load_images,
    normalize,
    read_image,
    split_indices,
)
from qkv.errors import CheckpointError, ConfigError, DataError
from qkv.metrics import confusion_matrix, confusion_scores, nn_accuracy, separation
from qkv.models.vit import ImageEmbedder, ViT, ViTConfig
from qkv.rundir import RunDir
from qkv.tasks import TaskSpec, register
from qkv.tasks.classification import check_objective, embedding_loss, write_confusion

log = logging.getLogger(__name__)

SPLIT, IMAGES, CONFUSION, BASELINE = "split.json", "images.json", "confusion.json", "baseline.json"


@dataclass(frozen=True)
class ImageData:
    """Where the images come from, how they are split, batched and augmented."""

    source: str = "digits"           # "digits", "mnist5k", an .npz (x, y) or a folder of class subfolders
    resize: bool = True              # resize / convert images of another size or channel count (else an error)
    valid_fraction: float = ranged(0.1, ge=0.0, lt=1.0)  # per class, stratified
    test_fraction: float = ranged(0.2, ge=0.0, lt=1.0)
    split_seed: int = ranged(0, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    cv_folds: int = ranged(0, ge=0, note="0 = off, else >= 2")  # K >= 2: K-fold CV of the non-test images (qkv cv) ...
    cv_fold: int = ranged(0, ge=0)   # ... holding out this fold as the validation set
    train_on_valid: bool = False     # the validation images join training (a final fit; nothing to evaluate)
    batch_size: int = ranged(64, ge=1)
    eval_batch_size: int = ranged(500, ge=1)
    shift: float = ranged(0.0, ge=0.0)  # augmentation: random shift of up to this many pixels
    rotate: float = ranged(0.0, ge=0.0, le=180.0)  # ... rotation of up to this many degrees
    scale: float = ranged(0.0, ge=0.0, lt=1.0)  # ... zoom by a factor in [1 - scale, 1 + scale]
    svm_baseline: bool = False       # fit an RBF SVM on the same split and write baseline.json

    def __post_init__(self):
        check_ranges(self)
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"valid_fraction={self.valid_fraction} and test_fraction={self.test_fraction} must be "
                             "in [0, 1) and leave images for training")
        check_folds(self.cv_folds, self.cv_fold, self.train_on_valid)


@dataclass(frozen=True)
class ImageEmbeddingData(ImageData):
    """The images, plus the metric-learning objective (as the text ``embedding`` task's)."""

    loss: str = "batch_hard"
    margin: float = ranged(0.3, ge=0.0)
    distance: str = "cosine"
    temperature: float = ranged(0.1, gt=0.0)
    samples_per_class: int = ranged(8, ge=0, note="0 = shuffled, else >= 2")  # K >= 2: "PK" batches (Hermans et al.)

    def __post_init__(self):
        super().__post_init__()
        check_objective(self)


@dataclass(frozen=True)
class ImageDecode:
    """Defaults for ``qkv classify --image`` / ``qkv evaluate`` / ``qkv attention``."""

    batch_size: int = ranged(256, ge=1)
    tta: bool = False                # classify/evaluate: average over the image and its 4 one-pixel shifts

    def __post_init__(self):
        check_ranges(self)


@dataclass(frozen=True)
class ImageArtifacts:
    """What inference needs besides the model: class names and the training images' mean/std."""

    label_names: list[str]
    mean: list[float]
    std: list[float]

    def save(self, path: Path) -> None:
        write_json(path, {"label_names": self.label_names, "mean": self.mean, "std": self.std})

    @classmethod
    def load(cls, path: Path) -> ImageArtifacts:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(list(data["label_names"]), list(data["mean"]), list(data["std"]))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (an image run keeps its class names and mean/std here)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a valid images.json ({err})") from None


def load_artifacts(cfg, run_dir: str | Path) -> ImageArtifacts:
    """images.json: the class names (as many as a classifier's outputs) and the normalisation."""
    path = RunDir(run_dir).file(IMAGES)
    artifacts = ImageArtifacts.load(path)
    if cfg.task == "image_classification" and len(artifacts.label_names) != cfg.model.n_classes:
        raise CheckpointError(f"{path}: {len(artifacts.label_names)} classes, but the model has model.n_classes="
                              f"{cfg.model.n_classes} outputs; the file was changed or belongs to another run")
    return artifacts


def build_model(cfg) -> ViT | ImageEmbedder:
    """A classifier for 'image_classification', a unit-length embedder (no head) for 'image_embedding'."""
    if cfg.task == "image_embedding":
        return ImageEmbedder(ViT(replace(cfg.model, n_classes=0)))
    return ViT(cfg.model)


def vit_of(model) -> ViT:
    """The ViT inside a run's model."""
    return model.vit if isinstance(model, ImageEmbedder) else model


def read_split(run_dir: Path) -> dict:
    path = RunDir(run_dir).file(SPLIT)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (an image run records its train/valid/test split here)") from None


def load_split_images(cfg, split: dict) -> dict[str, ImageSet]:
    """The run's source, cut by a recorded split; an error when the source changed size since."""
    m = cfg.model
    images = load_images(split["source"], size=m.image_size, channels=m.channels, resize=cfg.data.resize)
    total = sum(len(split[k]) for k in ("train", "valid", "test"))
    if total != len(images):
        raise DataError(f"{split['source']}: has {len(images)} images, but the run's split.json was made "
                        f"from {total}; the data changed since training")
    return {k: images.subset(split[k]) for k in ("train", "valid", "test")}


# -- data for a run -----------------------------------------------------------------------------------
class ImageRunData:
    """Reads the source, splits it (or on resume reads split.json), and fixes the normalisation."""

    def __init__(self, cfg, run_dir: Path, *, resume: bool):
        d, m, run_dir = cfg.data, cfg.model, Path(run_dir)
        if resume:
            split, artifacts = read_split(run_dir), load_artifacts(cfg, run_dir)
            parts = load_split_images(cfg, split)
        else:
            images = load_images(d.source, size=m.image_size, channels=m.channels, resize=d.resize)
            split = {"source": d.source, "seed": d.split_seed, "valid_fraction": d.valid_fraction,
                     "test_fraction": d.test_fraction, "cv_folds": d.cv_folds, "cv_fold": d.cv_fold,
                     "train_on_valid": d.train_on_valid,
                     **split_indices(images.labels.numpy(), valid=d.valid_fraction, test=d.test_fraction,
                                     seed=d.split_seed, folds=d.cv_folds, fold=d.cv_fold,
                                     train_on_valid=d.train_on_valid)}
            parts = {k: images.subset(split[k]) for k in ("train", "valid", "test")}
            artifacts = ImageArtifacts(images.label_names, *channel_stats(parts["train"].images))
            run_dir.mkdir(parents=True, exist_ok=True)
            run = RunDir(run_dir)
            write_json(run.file(SPLIT), split)
            artifacts.save(run.file(IMAGES))
            if d.svm_baseline:
                write_json(run.file(BASELINE), svm_baseline(parts))
        if not len(parts["valid"]) and not d.train_on_valid:
            raise ConfigError(f"data.valid_fraction={d.valid_fraction}: no validation images to evaluate on")
        if d.train_on_valid and cfg.train.patience:
            raise ConfigError(f"data.train_on_valid leaves nothing to evaluate, so train.patience="
                              f"{cfg.train.patience} cannot stop early or pick the best checkpoint; set it to 0 "
                              "(the final model is then the last checkpoint, or train.average_last of them)")
        self.train, self.valid, self.test = parts["train"], parts["valid"], parts["test"]
        self.artifacts = artifacts
        n_classes = len(artifacts.label_names) if cfg.task == "image_classification" else 0
        if m.n_classes not in (0, n_classes):
            raise ConfigError(f"model.n_classes={m.n_classes}, but the data has {n_classes} classes "
                              "(leave it out: it comes from the labels)")
        self.cfg = replace(cfg, model=replace(m, n_classes=n_classes))
        log.info("%s: %d train, %d valid, %d test images of %s", d.source, len(self.train), len(self.valid),
                 len(self.test), "x".join(map(str, self.train.images.shape[1:])))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.artifacts.mean, self.artifacts.std)

    def train_batches(self, epoch: int, *, rank: int, world_size: int, per_class: int = 0) -> list[dict]:
        d, seed = self.cfg.data, self.cfg.train.seed
        labels = self.train.labels
        if per_class:
            index = class_balanced_batches(labels.tolist(), d.batch_size, per_class, seed=seed, epoch=epoch,
                                           rank=rank, world_size=world_size)
        else:
            index = sentence_batches(len(labels), d.batch_size, seed=seed, epoch=epoch, rank=rank,
                                     world_size=world_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        images = augment(self.train.images, generator=generator, shift=d.shift, rotate=d.rotate, scale=d.scale)
        images = self.prepare(images)
        return [{"images": images[torch.as_tensor(idx)], "labels": labels[torch.as_tensor(idx)]} for idx in index]


def svm_baseline(parts: dict[str, ImageSet]) -> dict:
    """An RBF SVM on raw pixels in [0, 1], fitted on the same training images as the ViT.

    C in {1, 10, 100} is chosen on the validation images, or by 5-fold stratified cross-validation
    of the training images when there are none (data.train_on_valid); scored on the test images.
    """
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    def flat(part):
        return part.images.flatten(1).numpy(), part.labels.numpy()

    (x, y), (xv, yv), (xt, yt) = flat(parts["train"]), flat(parts["valid"]), flat(parts["test"])
    start = time.perf_counter()
    if len(yv):
        chosen_by = "validation accuracy"
        scores = {C: SVC(kernel="rbf", C=C, gamma="scale").fit(x, y).score(xv, yv) for C in (1.0, 10.0, 100.0)}
    else:
        chosen_by = "5-fold cross-validation accuracy on the training images"
        scores = {C: cross_val_score(SVC(kernel="rbf", C=C, gamma="scale"), x, y, cv=5).mean()
                  for C in (1.0, 10.0, 100.0)}
    best = max(scores, key=scores.get)
    svm = SVC(kernel="rbf", C=best, gamma="scale").fit(x, y)
    test = float(svm.score(xt, yt)) if len(yt) else float("nan")
    return {"model": f"sklearn SVC(kernel='rbf', gamma='scale', C={best:g}) on raw pixels",
            "C_chosen_by": chosen_by, "accuracy_by_C": {str(k): float(v) for k, v in scores.items()}, "C": best,
            "selection_accuracy": float(scores[best]), "test_accuracy": test, "train_images": len(y),
            "test_images": len(yt), "seconds": round(time.perf_counter() - start, 2)}


# -- the two tasks ------------------------------------------------------------------------------------
class ImageClassificationTask:
    primary_metric = ("accuracy", "max")
    rate_unit = "images/s"

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        self.data, self.run_dir = ImageRunData(cfg, run_dir, resume=resume), Path(run_dir)
        self.cfg = self.data.cfg

    def build_model(self) -> ViT:
        return build_model(self.cfg)

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> list[dict]:
        return self.data.train_batches(epoch, rank=rank, world_size=world_size)

    def loss(self, model, batch: dict, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        logits = model(batch["images"])  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=label_smoothing), len(logits)

    def evaluate(self, model) -> dict[str, float]:
        d = self.data
        if not len(d.valid):  # data.train_on_valid
            return {}
        return score_classifier(model, d.prepare(d.valid.images), d.valid.labels, d.artifacts.label_names,
                                batch_size=self.cfg.data.eval_batch_size,
                                confusion_path=RunDir(self.run_dir).file(CONFUSION))


class ImageEmbeddingTask:
    primary_metric = ("nn_accuracy", "max")
    rate_unit = "images/s"

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        self.data = ImageRunData(cfg, run_dir, resume=resume)
        self.cfg = self.data.cfg
        if len(self.data.valid) < 2 and not self.cfg.data.train_on_valid:
            raise ConfigError("the image_embedding task needs at least 2 validation images")

    def build_model(self) -> ImageEmbedder:
        return build_model(self.cfg)

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> list[dict]:
        return self.data.train_batches(epoch, rank=rank, world_size=world_size,
                                       per_class=self.cfg.data.samples_per_class)

    def loss(self, model, batch: dict, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        embeddings = model(batch["images"])  # (B, D)
        return embedding_loss(embeddings, batch["labels"], self.cfg.data), len(embeddings)

    def evaluate(self, model) -> dict[str, float]:
        d = self.data
        if not len(d.valid):  # data.train_on_valid
            return {}
        return score_embedder(model, d.prepare(d.valid.images), d.valid.labels, self.cfg)


# -- metrics ------------------------------------------------------------------------------------------
def forward_all(model, images: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """The model's outputs (N, ...) for normalised images (N, C, H, W), in batches, on the model's device."""
    device = next(model.parameters()).device
    progress.expect(len(images))  # qkv evaluate's progress line (a no-op when none is active)
    outputs = []
    for chunk in images.split(batch_size):
        outputs.append(model(chunk.to(device)).float())
        progress.tick(len(chunk))
    return torch.cat(outputs)


def score_log_probs(log_probs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict:
    """Loss (mean negative log-likelihood), accuracy, macro-F1 and the confusion matrix (rows gold)."""
    gold = labels.to(log_probs.device)
    confusion = confusion_matrix(gold, log_probs.argmax(1), n_classes).cpu()
    return {"loss": float(F.nll_loss(log_probs, gold)), **confusion_scores(confusion), "confusion_matrix": confusion}


def score_classifier(model, images, labels, label_names, *, batch_size: int, confusion_path=None) -> dict:
    """Loss, accuracy, macro-F1; the confusion matrix (rows gold, columns predicted) to ``confusion_path``."""
    logits = forward_all(model, images, batch_size=batch_size)  # (N, C)
    scores = score_log_probs(logits.log_softmax(-1), labels, len(label_names))
    confusion = scores.pop("confusion_matrix")
    if confusion_path is not None:
        write_confusion(confusion_path, confusion, label_names)
    return scores


def score_embedder(model, images, labels, cfg) -> dict:
    """Leave-one-out nearest-neighbour accuracy and separation (ROC AUC of same- vs different-class cosine)."""
    embeddings = forward_all(model, images, batch_size=cfg.data.eval_batch_size)  # (N, D)
    gold = labels.to(embeddings.device)
    metrics = {"nn_accuracy": nn_accuracy(embeddings, gold)}
    auc = separation(embeddings, gold)
    if np.isfinite(auc):
        metrics["separation"] = auc
    return metrics


# -- library functions for the CLI --------------------------------------------------------------------
def read_raw_images(cfg, paths: list[str]) -> torch.Tensor:
    """Image files -> (N, C, H, W) in [0, 1] at the run's size (resized, or rejected per data.resize)."""
    m = cfg.model
    arrays = [read_image(p, size=m.image_size, channels=m.channels, resize=cfg.data.resize) for p in paths]
    if not arrays:
        return torch.zeros(0, m.channels, m.image_size, m.image_size)
    return fit_images(np.stack(arrays), size=m.image_size, channels=m.channels, resize=False, name=paths[0])


def read_images_for(cfg, artifacts: ImageArtifacts, paths: list[str]) -> torch.Tensor:
    """Image files -> normalised (N, C, H, W) at the run's size (resized, or rejected per data.resize)."""
    return normalize(read_raw_images(cfg, paths), artifacts.mean, artifacts.std)


from qkv.tasks.image_inference import ImageClassifierRun, ImageEmbedderRun  # noqa: E402 (it uses the above)

for _name, _data, _make, _run in (("image_classification", ImageData, ImageClassificationTask, ImageClassifierRun),
                                  ("image_embedding", ImageEmbeddingData, ImageEmbeddingTask, ImageEmbedderRun)):
    register(TaskSpec(name=_name, data_config=_data, model_config=ViTConfig, decode_config=ImageDecode,
                      make_task=_make, build_model=build_model, load_artifacts=load_artifacts, inference=_run))
