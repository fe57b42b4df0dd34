"""Metrics against sacrebleu called directly, and the boundary checks."""

import json
import math

import pytest
import sacrebleu
import torch
from sacrebleu.metrics import BLEU

from qkv.metrics import accuracy, bleu, chrf, corpus_scores, perplexity, tokenized_bleu

REFS = ["A man is riding a bicycle down the street.", "Two dogs play in the snow.", "The child, smiling, eats."]
HYPS = ["A man rides a bike down the street.", "two dogs are playing in snow .", "The child eats."]


def test_bleu_matches_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPS, [REFS])
    result = bleu(HYPS, REFS)
    assert result["score"] == pytest.approx(expected.score)
    assert result["bp"] == pytest.approx(expected.bp)
    assert result["precisions"] == pytest.approx(expected.precisions)
    assert "case:mixed" in result["signature"] and "tok:13a" in result["signature"]
    assert 0.0 < result["score"] < 100.0


def test_perfect_match_is_100():
    assert bleu(REFS, REFS)["score"] == pytest.approx(100.0)
    assert chrf(REFS, REFS)["score"] == pytest.approx(100.0)
    assert tokenized_bleu(REFS, REFS)["score"] == pytest.approx(100.0)


def test_empty_hypotheses_score_zero():
    empty = [""] * len(REFS)
    assert bleu(empty, REFS)["score"] == 0.0
    assert chrf(empty, REFS)["score"] == 0.0
    mixed = ["", *REFS[1:]]
    assert bleu(mixed, REFS)["score"] == pytest.approx(sacrebleu.corpus_bleu(mixed, [REFS]).score)


def test_chrf_matches_sacrebleu():
    result = chrf(HYPS, REFS)
    assert result["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert result["signature"].startswith("nrefs:1|case:mixed")


def test_tokenized_bleu_is_lowercased():
    expected = BLEU(lowercase=True).corpus_score(HYPS, [REFS]).score
    result = tokenized_bleu(HYPS, REFS)
    assert result["score"] == pytest.approx(expected)
    assert "case:lc" in result["signature"]
    assert result["score"] > bleu(HYPS, REFS)["score"]  # "two dogs" matches "Two dogs" only when lowercased
    upper = [h.upper() for h in HYPS]
    assert tokenized_bleu(upper, REFS)["score"] == pytest.approx(result["score"])


def test_tokenized_bleu_on_pretokenized_text_splits_on_spaces_only():
    hyps, refs = ["a man , riding ."], ["A man , riding ."]
    result = tokenized_bleu(hyps, refs, tokenize="none")
    assert result["score"] == pytest.approx(100.0)
    assert "tok:none" in result["signature"]


@pytest.mark.parametrize("fn", [bleu, chrf, tokenized_bleu, corpus_scores])
def test_length_mismatch_names_both_counts(fn):
    with pytest.raises(ValueError, match="3 hypotheses and 2 references"):
        fn(HYPS, REFS[:2])


@pytest.mark.parametrize("hyps,refs,match", [([], [], "at least one"), ([1, 2, 3], REFS, "hypothesis 0 is int")])
def test_rejects_bad_corpora(hyps, refs, match):
    with pytest.raises(ValueError, match=match):
        bleu(hyps, refs)


def test_corpus_scores_is_json_serialisable():
    scores = corpus_scores(HYPS, REFS)
    assert json.loads(json.dumps(scores)) == scores
    assert scores["n_sentences"] == 3
    assert scores["bleu"]["score"] == pytest.approx(bleu(HYPS, REFS)["score"])
    assert scores["chrf"]["signature"] and scores["tokenized_bleu"]["signature"]


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="NaN"):
        perplexity(float("nan"))


def test_accuracy_ignores_padding():
    logits = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, 3, V=3): argmax 1, 0, 2
    targets = torch.tensor([[1, 2, 0]])
    assert accuracy(logits, targets) == pytest.approx(1 / 3)
    assert accuracy(logits, targets, ignore_index=0) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="every target"):
        accuracy(logits, torch.zeros(1, 3, dtype=torch.long), ignore_index=0)
    with pytest.raises(ValueError, match="do not match"):
        accuracy(logits, targets[:, :2])
