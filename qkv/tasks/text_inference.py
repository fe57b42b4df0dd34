"""Trained text classification and sentence-embedding runs at work (what ``qkv.load`` returns).

``TextClassifierRun`` labels texts (``classify``), embeds them with its pooled encoder output
(``embed``), scores a labelled file (``evaluate(data=...)``: loss, accuracy, macro-F1) and shows
the encoder's self-attention over one text. ``TextEmbedderRun`` embeds, scores (nearest-neighbour
accuracy, separation) and shows attention. Both batch by length (qkv.tasks.classification).
"""

from __future__ import annotations

import numpy as np
import torch

from qkv.errors import ConfigError
from qkv.tasks.classification import (
    ClassificationTask,
    EmbeddingTask,
    classify_texts,
    embed_texts,
    evaluate_file,
)
from qkv.tasks.inference import LoadedRun, as_list


class _TextRun(LoadedRun):
    """What the two text families share: embed, evaluate on a labelled file, encoder attention."""

    evaluate_options = ("data",)
    exporters = {"hf": "qkv.export.hf:text_encoder", "onnx": "qkv.export.onnx:text_encoder"}

    def _batch_size(self, batch_size: int | None) -> int:
        batch_size = self.cfg.decode.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return batch_size

    def embed(self, texts, *, batch_size: int | None = None, **options) -> np.ndarray:
        """(N, D) float32 unit-length embeddings of the texts (a classifier: its pooled encoder output)."""
        self.check_options("embed", options, ("batch_size",))
        return embed_texts(self.model, self.artifacts, as_list(texts, name="texts"),
                           batch_size=self._batch_size(batch_size))

    def _evaluate(self, *, data=None, confusion=None) -> dict:
        """The task's metrics on a labelled TSV/CSV file (columns as in the run's data section); a
        classifier's carry the confusion matrix, also written to ``confusion`` (a file) if given.
        Nothing is written into the run."""
        if not data:
            raise ConfigError(f"{self.run_dir} is {self.a_kind} run: evaluate needs a labelled file "
                              "(--data FILE, TSV/CSV with labels)")
        return evaluate_file(self.cfg, self.model, self.artifacts, data, confusion=confusion)

    def _attention(self, text: str, layers):
        from qkv.attention_maps import AttentionSet, groups_of, token_labels
        from qkv.record import AttentionRecord

        ids = self.artifacts.tokenizer.encode_batch([text])[0]
        record = AttentionRecord(layers)
        outputs = self.model(torch.tensor([ids], device=self.device), record=record)  # (1, T) -> (1, C) or (1, D)
        labels = token_labels(self.artifacts.tokenizer, ids)
        prediction = self._prediction(outputs)
        title = f"{len(ids)} tokens"
        if prediction is not None:
            title += f", predicted {prediction[0]!r} ({prediction[1]:.2f})"
        return AttentionSet(title, groups_of(record.weights, {"encoder": (labels, labels)}), prediction=prediction)

    def _prediction(self, outputs: torch.Tensor) -> tuple[str, float] | None:
        return None


class TextClassifierRun(_TextRun):
    """A trained text classifier: classify, embed, evaluate(data=FILE), attention(text=...)."""

    kind = "text-classification"
    primary_metric = ClassificationTask.primary_metric
    predicts = ("classify", "embed")
    evaluate_options = ("data", "confusion")

    def classify(self, texts, *, batch_size: int | None = None, **options) -> list[tuple[str, float]]:
        """(label, probability) of the most probable class of each text, in order."""
        self.check_options("classify", options, ("batch_size",))
        return classify_texts(self.model, self.artifacts, as_list(texts, name="texts"),
                              batch_size=self._batch_size(batch_size))

    def _prediction(self, outputs: torch.Tensor) -> tuple[str, float]:
        probs = outputs[0].float().softmax(-1)  # (C,)
        best = int(probs.argmax())
        return self.artifacts.label_names[best], float(probs[best])


class TextEmbedderRun(_TextRun):
    """A trained sentence encoder: embed, evaluate(data=FILE), attention(text=...)."""

    kind = "text-embedding"
    primary_metric = EmbeddingTask.primary_metric
    predicts = ("embed",)
