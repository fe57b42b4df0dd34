"""Translation and language-model metrics.

Translation scores come from sacrebleu (Post 2018, "A Call for Clarity in Reporting BLEU
Scores") on detokenized text, each with the signature that says exactly how it was computed:

- ``bleu``: sacrebleu's default, 13a tokenisation, mixed case. The number to report.
- ``chrf``: character n-gram F-score (Popovic 2015), sacrebleu's default chrF2.
- ``tokenized_bleu``: lowercased BLEU on tokenized text, only to compare with published
  Multi30k numbers, which come from multi-bleu.perl -lc on Moses-tokenized text.

Every function takes one hypothesis and one reference string per sentence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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
