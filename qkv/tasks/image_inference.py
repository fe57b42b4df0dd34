"""Trained image runs at work: ``evaluate_run`` (``qkv evaluate``), ``classify_images`` (``qkv
classify --image``), the two ways they combine predictions, seed ensembles and test-time
augmentation (TTA), and the family objects ``qkv.load`` returns for image runs
(``ImageClassifierRun``, ``ImageEmbedderRun``).

Both average class probabilities, which lowers the variance of a single small model's
predictions (Dietterich 2000, "Ensemble Methods in Machine Learning"; Krizhevsky et al. 2012,
sec. 4.1, averaged predictions over shifted and mirrored crops):

    p(y | x) = 1/(M V) sum_m sum_v softmax(f_m(t_v(x)))_y

over M runs (``members``: the same task and classes, e.g. one recipe trained with M seeds) and V
views t_v of the image (``shift_views``: the image and its four one-pixel shifts, the shifts the
digits recipe trains with). Each member normalises the raw [0, 1] pixels with its own training
mean/std, so runs trained on different images can still be combined. Averaging is done in log
space (logsumexp of log-softmaxes), which is exact and keeps the loss finite; with one member and
no TTA the log-probabilities are the model's own log-softmax, so the figures equal the plain path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from qkv.data.images import ImageSet, load_images, normalize, shift_views
from qkv.errors import CheckpointError, ConfigError, DataError
from qkv.rundir import RunDir
from qkv.tasks.classification import write_confusion
from qkv.tasks.inference import LoadedRun, as_list, flagged
from qkv.tasks.vision import (
    SPLIT,
    ImageArtifacts,
    ImageClassificationTask,
    ImageEmbeddingTask,
    forward_all,
    load_split_images,
    read_images_for,
    read_raw_images,
    read_split,
    score_embedder,
    score_log_probs,
    vit_of,
)


class Member(NamedTuple):
    """One trained image classifier: its run's config, model (eval mode) and artifacts (images.json)."""

    cfg: object
    model: torch.nn.Module
    artifacts: object
    run_dir: Path


def load_members(run_dirs, *, device) -> list[Member]:
    """Load image_classification runs; a run of another task is a CheckpointError naming it."""
    from qkv.run import load_run

    return [Member(*load_run(d, device=device, task="image_classification"), Path(d)) for d in run_dirs]


def _image_shape(member: Member) -> tuple[int, int]:
    return member.cfg.model.image_size, member.cfg.model.channels


def check_members(members: list[Member], *, split: str | None = None) -> None:
    """ConfigError unless the runs can vote together: the same classes (in the same order), image size
    and channels, and, when a recorded ``split`` is scored, the same images in it (so no member has
    trained on what the others are scored on)."""
    first = members[0]
    for m in members[1:]:
        if m.artifacts.label_names != first.artifacts.label_names:
            raise ConfigError(f"{m.run_dir}: its classes {m.artifacts.label_names} differ from "
                              f"{first.run_dir}'s {first.artifacts.label_names}; an ensemble needs the same classes")
        if _image_shape(m) != _image_shape(first):
            raise ConfigError(f"{m.run_dir}: images of {_image_shape(m)} (size, channels), but {first.run_dir} "
                              f"takes {_image_shape(first)}")
        if split is not None and read_split(m.run_dir)[split] != read_split(first.run_dir)[split]:
            raise ConfigError(f"{m.run_dir}: its recorded {split} split differs from {first.run_dir}'s (another "
                              "source, seed, fraction or fold); an ensemble is scored on images none of its "
                              "members trained on")


def class_log_probs(members: list[Member], images: torch.Tensor, *, batch_size: int, tta: bool) -> torch.Tensor:
    """log of the mean class probability over members and views. Raw [0, 1] images (N, C, H, W) -> (N, classes)."""
    views = shift_views(images) if tta else [images]
    log_probs = []
    with torch.no_grad():
        for m in members:
            m.model.eval()
            for view in views:
                logits = forward_all(m.model, normalize(view, m.artifacts.mean, m.artifacts.std),
                                     batch_size=batch_size)  # (N, classes)
                log_probs.append(logits.log_softmax(-1))
    if len(log_probs) == 1:
        return log_probs[0]
    return torch.stack(log_probs).logsumexp(0) - math.log(len(log_probs))  # (M*V, N, C) -> (N, C)


def _members(cfg, model, artifacts, run_dir, ensemble, *, split: str | None = None) -> list[Member]:
    members = [Member(cfg, model, artifacts, Path(run_dir) if run_dir is not None else Path("."))]
    members += list(ensemble)
    if len(members) > 1:
        check_members(members, split=split)
    return members


def classify_images(cfg, model, artifacts: ImageArtifacts, paths: list[str], *, tta: bool | None = None,
                    ensemble: list[Member] = (), run_dir=None, batch_size: int | None = None
                    ) -> list[tuple[str, float]]:
    """(label, probability) of the most probable class of each image file, in order.

    ``tta`` (default: the run's decode.tta) and ``ensemble`` (more runs' Members) average the class
    probabilities (qkv.tasks.image_ensemble).
    """
    if cfg.task != "image_classification":
        raise CheckpointError(f"classify --image needs an 'image_classification' run, got {cfg.task!r}")
    members = _members(cfg, model, artifacts, run_dir, ensemble)
    images = read_raw_images(cfg, paths)
    if not len(images):
        return []
    tta = cfg.decode.tta if tta is None else tta
    batch_size = cfg.decode.batch_size if batch_size is None else batch_size
    probs = class_log_probs(members, images, batch_size=batch_size, tta=tta).exp()  # (N, C)
    best_p, best = probs.max(-1)
    return [(artifacts.label_names[int(c)], float(p)) for c, p in zip(best, best_p)]


def evaluate_run(cfg, model, artifacts: ImageArtifacts, run_dir: str | Path, *, data: str | None = None,
                 split: str = "test", tta: bool | None = None, ensemble: list[Member] = (),
                 confusion: str | Path | None = None) -> dict:
    """Metrics on the run's recorded ``split`` ("test" or "valid"; or on ``data``: an .npz or a class
    folder with the run's labels).

    A classification run's result carries the confusion matrix (rows gold), also written to
    ``confusion`` (a file) when given; nothing is written into the run. ``tta`` (default: the run's decode.tta) and
    ``ensemble`` (the other runs' Members, checked to share the classes and, for a recorded split,
    its images) average class probabilities (qkv.tasks.image_ensemble).
    """
    run_dir = Path(run_dir)
    part, where = _images_to_score(cfg, artifacts, run_dir, data=data, split=split)
    tta = cfg.decode.tta if tta is None else tta
    if cfg.task != "image_classification":
        if tta or ensemble:
            raise ConfigError("--tta and --ensemble are for image_classification runs (an embedding run has no "
                              "class probabilities to average)")
        with torch.no_grad():
            metrics = score_embedder(model.eval(), normalize(part.images, artifacts.mean, artifacts.std),
                                     part.labels, cfg)
        return {"data": where, "examples": len(part), **metrics}
    members = _members(cfg, model, artifacts, run_dir, ensemble, split=split if data is None else None)
    log_probs = class_log_probs(members, part.images, batch_size=cfg.data.eval_batch_size, tta=tta)
    metrics = score_log_probs(log_probs, part.labels, len(artifacts.label_names))
    matrix, confusion_path = metrics.pop("confusion_matrix"), confusion
    if confusion_path is not None:
        write_confusion(confusion_path, matrix, artifacts.label_names)
    extra = {"members": [str(m.run_dir) for m in members]} if len(members) > 1 else {}
    return {"data": where, "examples": len(part), "tta": tta, **extra, **metrics,
            "labels": artifacts.label_names, "confusion": matrix.tolist()}


def _images_to_score(cfg, artifacts: ImageArtifacts, run_dir: Path, *, data: str | None, split: str):
    """The raw images and labels to score (ImageSet) and where they come from."""
    if split not in ("test", "valid"):
        raise ConfigError(f"--split must be 'test' or 'valid', got {split!r}")
    if data is None:
        recorded = read_split(run_dir)
        part = load_split_images(cfg, recorded)[split]
        if not len(part):
            raise ConfigError(f"{RunDir(run_dir).file(SPLIT)}: the {split} split is empty; pass --data FILE")
        return part, f"{recorded['source']} ({split} split of {RunDir(run_dir).file(SPLIT)})"
    m = cfg.model
    part = load_images(data, size=m.image_size, channels=m.channels, resize=cfg.data.resize)
    unknown = sorted(set(part.label_names) - set(artifacts.label_names))
    if unknown:
        raise DataError(f"{data}: label {unknown[0]!r} is not one of the run's classes {artifacts.label_names}")
    remap = torch.tensor([artifacts.label_names.index(n) for n in part.label_names])
    return ImageSet(part.images, remap[part.labels], artifacts.label_names, data), data


# -- the family objects (qkv.load) ------------------------------------------------------------------
class _ImageRun(LoadedRun):
    """What the two image families share: embed, evaluate on a recorded split or a file, attention."""

    inputs = "image"
    exporters = {"hf": "qkv.export.hf:vit", "onnx": "qkv.export.onnx:image_encoder"}

    def embed(self, paths, *, batch_size: int | None = None, **options) -> np.ndarray:
        """(N, D) float32 unit-length embeddings of image files: the ViT's pooled output, normalised."""
        from qkv.models.vit import ImageEmbedder

        self.check_options("embed", options, ("batch_size",))
        paths = [str(p) for p in as_list(paths, name="paths")]
        embedder = ImageEmbedder(vit_of(self.model)).eval()
        if not paths:
            return np.zeros((0, vit_of(self.model).cfg.d_model), dtype=np.float32)
        images = read_images_for(self.cfg, self.artifacts, paths)  # (N, C, H, W), normalised
        with torch.no_grad():
            out = forward_all(embedder, images, batch_size=batch_size or self.cfg.decode.batch_size)  # (N, D)
        return out.cpu().numpy().astype(np.float32)

    def _evaluate(self, *, data=None, split=None, tta=None, ensemble=None, confusion=None) -> dict:
        """Metrics on the run's recorded ``split`` ("test" by default, or "valid"), or on ``data`` (an .npz
        or a folder of class subfolders); see ``evaluate_run``."""
        if split and data:
            message = "{0}split and {0}data exclude each other: {0}split picks one of the run's recorded splits"
            raise flagged(ConfigError(message.format("")), message.format("--"))
        return evaluate_run(self.cfg, self.model, self.artifacts, self.run_dir, data=data, split=split or "test",
                            tta=tta, ensemble=self.members(ensemble or ()), confusion=confusion)

    def members(self, ensemble) -> list[Member]:
        """More image classification runs to vote with: run directories or loaded ImageClassifierRuns."""
        members = []
        for item in ensemble:
            if isinstance(item, LoadedRun):
                if not isinstance(item, ImageClassifierRun):
                    raise CheckpointError(f"{item.run_dir}: {item.a_kind} run cannot vote in an image ensemble")
                members.append(Member(item.cfg, item.model, item.artifacts, item.run_dir))
            else:
                members += load_members([item], device=self.device)
        return members

    def _attention(self, path, layers):
        """The self-attention over the class token and the patches of one image file."""
        from qkv.attention_maps import AttentionSet, groups_of
        from qkv.record import AttentionRecord

        images = read_images_for(self.cfg, self.artifacts, [str(path)]).to(self.device)  # (1, C, H, W), normalised
        vit = vit_of(self.model)
        record = AttentionRecord(layers)
        outputs = self.model(images, record=record)  # (1, classes) or (1, D)
        H, W = images.shape[-2:]
        gh, gw = H // vit.cfg.patch_size, W // vit.cfg.patch_size
        labels = ["[class]"] * vit.n_special + [f"({r},{c})" for r in range(gh) for c in range(gw)]
        prediction, title = None, str(path)
        if vit.head is not None:
            probs = outputs[0].float().softmax(-1)  # (classes,)
            best = int(probs.argmax())
            prediction = (self.artifacts.label_names[best], float(probs[best]))
            title += f": {prediction[0]} ({prediction[1]:.2f})"
        std = torch.tensor(self.artifacts.std)[:, None, None]
        mean = torch.tensor(self.artifacts.mean)[:, None, None]
        image = (images[0].cpu() * std + mean).clamp(0, 1)  # (C, H, W) back to [0, 1]
        groups = groups_of(record.weights, {"encoder": (labels, labels)}, grid=(gh, gw), n_special=vit.n_special)
        return AttentionSet(title, groups, image=image, prediction=prediction)


class ImageClassifierRun(_ImageRun):
    """A trained image classifier: classify, embed, evaluate (split, data, tta, ensemble), attention(image=...)."""

    kind = "image-classification"
    primary_metric = ImageClassificationTask.primary_metric
    predicts = ("classify", "embed")
    evaluate_options = ("data", "split", "tta", "ensemble", "confusion")

    def classify(self, paths, *, tta: bool | None = None, ensemble=(), batch_size: int | None = None,
                 **options) -> list[tuple[str, float]]:
        """(label, probability) of each image file; ``tta`` (default the run's decode.tta) and ``ensemble``
        (run directories or loaded runs) average class probabilities."""
        self.check_options("classify", options, ("tta", "ensemble", "batch_size"))
        return classify_images(self.cfg, self.model, self.artifacts, [str(p) for p in as_list(paths, name="paths")],
                               tta=tta, ensemble=self.members(ensemble), run_dir=self.run_dir, batch_size=batch_size)


class ImageEmbedderRun(_ImageRun):
    """A trained image embedder: embed, evaluate (split, data), attention(image=...)."""

    kind = "image-embedding"
    primary_metric = ImageEmbeddingTask.primary_metric
    predicts = ("embed",)
    evaluate_options = ("data", "split")
