"""Translation and language-model metrics.

Translation scores come from sacrebleu (Post 2018, "A Call for Clarity in Reporting BLEU
Scores") on detokenized text, each with the signature that says exactly how it was computed:

- ``bleu``: sacrebleu's default, 13a tokenisation, mixed case. The number to report.
- ``chrf``: character n-gram F-score (Popovic 2015), sacrebleu's default chrF2.
- ``tokenized_bleu``: lowercased BLEU on tokenized text, only to compare with published
  Multi30k numbers, which come from multi-bleu.perl -lc on Moses-tokenized text.

Every translation function takes one hypothesis and one reference string per sentence.
Classification and embedding metrics (confusion matrix, macro-F1, nearest-neighbour accuracy,
ROC AUC of similarities) follow at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF


def _check_corpus(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses and {len(refs)} references; need one reference per hypothesis")
    if not hyps:
        raise ValueError("got 0 hypotheses and 0 references; need at least one sentence to score")
    for name, texts in (("hypothesis", hyps), ("reference", refs)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"{name} {bad} is {type(texts[bad]).__name__}, not str (detokenize ids first)")


def _bleu(metric: BLEU, hyps: Sequence[str], refs: Sequence[str]) -> dict:
    _check_corpus(hyps, refs)
    result = metric.corpus_score(list(hyps), [list(refs)])
    return {
        "score": result.score,
        "signature": str(metric.get_signature()),
        "precisions": [float(p) for p in result.precisions],  # 1- to 4-gram precisions, %
        "bp": result.bp,  # brevity penalty
        "ratio": result.ratio,  # hypothesis length / reference length
        "hyp_len": result.sys_len,
        "ref_len": result.ref_len,
    }


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus BLEU (Papineni et al. 2002) by sacrebleu: 13a tokenisation, mixed case.

    Returns {"score", "signature", "precisions", "bp", "ratio", "hyp_len", "ref_len"}.
    """
    return _bleu(BLEU(), hyps, refs)


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str], *, tokenize: str = "13a") -> dict:
    """Lowercased corpus BLEU, for comparison with published Multi30k numbers only.

    Those numbers come from ``multi-bleu.perl -lc`` on Moses-tokenized text. This is sacrebleu
    with ``lowercase=True``: on detokenized text (``tokenize="13a"``, the default) the 13a
    tokenizer stands in for Moses' (they split punctuation alike but differ on e.g. hyphens
    and apostrophes), so the score approximates multi-bleu.perl to within a few tenths. On text
    that is already Moses-tokenized, pass ``tokenize="none"`` to split on whitespace only, which
    is what multi-bleu.perl does. Report ``bleu`` as the main number; this one is not comparable
    across tokenizers.
    """
    return _bleu(BLEU(lowercase=True, tokenize=tokenize), hyps, refs)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus chrF2 (Popovic 2015) by sacrebleu: character 6-grams, beta=2. Returns {"score", "signature"}."""
    _check_corpus(hyps, refs)
    metric = CHRF()
    result = metric.corpus_score(list(hyps), [list(refs)])
    return {"score": result.score, "signature": str(metric.get_signature())}


def corpus_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Every translation score with its signature, as a JSON-serialisable dict."""
    return {
        "n_sentences": len(hyps),
        "bleu": bleu(hyps, refs),
        "chrf": chrf(hyps, refs),
        "tokenized_bleu": tokenized_bleu(hyps, refs),
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy in nats per token); inf when it overflows."""
    if math.isnan(mean_loss):
        raise ValueError("mean_loss is NaN")
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def accuracy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int | None = None) -> float:
    """Fraction of positions whose argmax equals the target: logits (..., V), targets (...).

    Positions where ``targets == ignore_index`` (padding) are not counted.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits (..., V) {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    keep = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None else targets != ignore_index
    total = int(keep.sum())
    if total == 0:
        raise ValueError("no positions to score: every target is ignore_index")
    correct = ((logits.argmax(dim=-1) == targets) & keep).sum()
    return int(correct) / total


# -- classification and embeddings ---------------------------------------------------------------
SEPARATION_MAX = 4000
"""separation() uses at most this many texts (a fixed random subset): pairs grow quadratically."""


def confusion_matrix(gold: torch.Tensor, predicted: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts: row = gold class, column = predicted class."""
    return torch.bincount(gold * n_classes + predicted, minlength=n_classes**2).view(n_classes, n_classes)


def confusion_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, and macro-F1: the mean per-class F1 = 2TP / (2TP + FP + FN) over classes that occur
    in the gold labels or the predictions (a class absent from both has no F1 and is left out)."""
    confusion = confusion.double()
    tp = confusion.diag()
    denominator = confusion.sum(0) + confusion.sum(1)  # 2TP + FP + FN
    seen = denominator > 0
    f1 = 2 * tp[seen] / denominator[seen]
    return {"accuracy": float(tp.sum() / confusion.sum().clamp_min(1)), "macro_f1": float(f1.mean())}


def nn_accuracy(embeddings: torch.Tensor, labels: torch.Tensor, *, chunk: int = 1024) -> float:
    """Leave-one-out: the share of texts whose most cosine-similar other text has their label. (N, D), (N,)."""
    unit = F.normalize(embeddings.float(), dim=-1)
    hits = 0
    for start in range(0, len(unit), chunk):
        sim = unit[start:start + chunk] @ unit.T  # (n, N)
        rows = torch.arange(len(sim), device=sim.device)
        sim[rows, rows + start] = float("-inf")  # never one's own neighbour
        hits += int((labels[sim.argmax(1)] == labels[start:start + chunk]).sum())
    return hits / len(unit)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, tied scores sharing their mean rank:
    AUC = (R+ - n+ (n+ + 1) / 2) / (n+ n-), R+ the sum of the positives' ranks. NaN without both kinds."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct score
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def separation(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of cosine similarity for same-label (positive) vs different-label pairs i < j
    (among a fixed random SEPARATION_MAX of the texts when there are more)."""
    keep = fixed_order(len(labels))[:SEPARATION_MAX].to(labels.device)
    unit = F.normalize(embeddings[keep].float(), dim=-1)
    labels = labels[keep]
    i, j = torch.triu_indices(len(unit), len(unit), offset=1)
    sim = (unit @ unit.T)[i, j]  # (N (N - 1) / 2,)
    return roc_auc(sim.cpu().numpy(), (labels[i] == labels[j]).cpu().numpy())


def fixed_order(n: int) -> torch.Tensor:
    """The same permutation of range(n) at every evaluation (its own generator: library code never seeds)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))
