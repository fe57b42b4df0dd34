"""CTranslate2 export (qkv.export.ct2): the same tokens and log-probabilities in CTranslate2 as in qkv.

Trained runs (a reversal task, 300 steps, so that beam search differs from greedy; a character LM,
150 steps) for decoding; 2-step runs of each architecture variant for the log-probabilities.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")

import qkv  # noqa: E402
from qkv.cli import main  # noqa: E402
from qkv.decode import beam_search_nbest, greedy_decode  # noqa: E402
from qkv.errors import ConfigError  # noqa: E402
from qkv.export import ct2  # noqa: E402
from qkv.generate import SamplingConfig, generate_ids  # noqa: E402
from tests.bad_inputs.conftest import TEXT, lm_config  # noqa: E402
from tests.helpers import WORDS, tiny_translation_config, write_config, write_copy_corpus  # noqa: E402

TRANSLATION_VARIANTS = {
    "paper": {"norm_first": False, "activation": "relu", "positional": "sinusoidal"},
    "gelu-learned": {"activation": "gelu", "positional": "learned", "max_len": 64},
    "llama-like": {"norm": "rmsnorm", "positional": "rope", "activation": "swiglu", "n_kv_heads": 2},
    "untied": {"share_embeddings": False, "tie_output": False, "scale_embeddings": False, "activation": "gelu_tanh"},
}
LM_VARIANTS = {
    "gpt2": {},
    "llama": {"norm": "rmsnorm", "positional": "rope", "activation": "swiglu", "bias": False, "n_kv_heads": 1},
    "alibi": {"positional": "alibi"},
}


def _train(config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = write_config(folder / "config.yaml", config)
    assert main(["train", str(path), "--out", str(folder / "run"), "--quiet", "--threads", "1"]) == 0
    return folder / "run"


def _translation(root: Path, name: str, *, steps: int, **model) -> Path:
    data = write_copy_corpus(root / "data", n_train=300, n_valid=8, reverse=True)
    config = tiny_translation_config(data, max_steps=steps, save_every=10_000, warmup_steps=30)
    config["model"].update(dropout=0.0, **model)
    return _train(config, root / name)


def _lm(root: Path, name: str, *, steps: int, **model) -> Path:
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    config = lm_config(text)
    config["model"].update(model)
    config["train"].update(max_steps=steps, eval_every=10_000, save_every=10_000)
    return _train(config, root / name)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ct2")


@pytest.fixture(scope="module")
def reversal(root) -> Path:
    return _translation(root, "reversal", steps=300)


@pytest.fixture(scope="module")
def shakespeare(root) -> Path:
    return _lm(root, "shakespeare", steps=150)


def _sentences(n: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _translator(run, out: Path):
    summary = run.export("ctranslate2", out)
    assert summary["format"] == "ctranslate2" and summary["spec"] == "TransformerSpec"
    assert {"model.bin", "config.json", "source_tokenizer.json", "target_tokenizer.json"} <= set(summary["files"])
    return ctranslate2.Translator(str(out), device="cpu", intra_threads=1)


def _tokens(vocabulary: list[str], ids: list[int]) -> list[str]:
    return [vocabulary[i] for i in ids]


# -- translation -----------------------------------------------------------------------------------
def test_greedy_and_beam_4_equal_qkv_on_a_trained_model(reversal, tmp_path):
    run = qkv.load(reversal)
    translator = _translator(run, tmp_path / "ct2")
    src_tok, tgt_tok = run.artifacts
    source, target = ct2.vocabulary(src_tok), ct2.vocabulary(tgt_tok)
    ids = [src_tok.encode(s) for s in _sentences(40)]
    batch = [_tokens(source, x) for x in ids]  # CTranslate2 appends </s> (add_source_eos), as qkv does
    greedy = translator.translate_batch(batch, beam_size=1, max_decoding_length=60)
    beam = translator.translate_batch(batch, beam_size=4, length_penalty=0.0, max_decoding_length=60)
    differs = 0
    for x, g, b in zip(ids, greedy, beam):
        src = torch.tensor([x + [src_tok.eos_id]])
        ours_greedy = greedy_decode(run.model, src, max_len=60)[0]
        (best, *_) = beam_search_nbest(run.model, src, beam_size=4, length_penalty=0.0, max_len=60)[0]
        assert [target.index(t) for t in g.hypotheses[0]] == ours_greedy
        assert [target.index(t) for t in b.hypotheses[0]] == best.tokens
        differs += best.tokens != ours_greedy
    assert differs >= 5, "the beams must be non-trivial for the comparison to mean something"


@pytest.mark.parametrize("variant", sorted(TRANSLATION_VARIANTS))
def test_log_probs_equal_qkv_for_each_architecture(root, variant, tmp_path):
    run = qkv.load(_translation(root, f"tr-{variant}", steps=2, **TRANSLATION_VARIANTS[variant]))
    translator = _translator(run, tmp_path / "ct2")
    src_tok, tgt_tok = run.artifacts
    source, target = ct2.vocabulary(src_tok), ct2.vocabulary(tgt_tok)
    pairs = [("the red dog", "dog red the"), ("a cat sits on the big ball", "ball big"), ("house", "house")]
    for s, t in pairs:
        x, y = src_tok.encode(s), tgt_tok.encode(t)
        (scored,) = translator.score_batch([_tokens(source, x)], [_tokens(target, y)])
        with torch.no_grad():
            logits = run.model(torch.tensor([x + [src_tok.eos_id]]), torch.tensor([[tgt_tok.bos_id] + y]))
        reference = logits.log_softmax(-1)[0, torch.arange(len(y) + 1), torch.tensor(y + [tgt_tok.eos_id])]
        np.testing.assert_allclose(scored.log_probs, reference.numpy(), atol=1e-4)


@pytest.mark.parametrize("positional", ["alibi", "t5"])
def test_translation_without_a_ct2_counterpart_is_refused_naming_the_key(root, positional, tmp_path):
    run = qkv.load(_translation(root, f"tr-{positional}", steps=1, positional=positional))
    with pytest.raises(ConfigError, match=f"model.positional={positional} has no CTranslate2 counterpart"):
        ct2.translation(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_rnn_translation_run_is_refused(root, tmp_path):
    data = write_copy_corpus(root / "rnn-data", n_train=40, n_valid=4)
    config = {**tiny_translation_config(data, max_steps=1, save_every=1), "task": "translation-rnn",
              "model": {"cell": "gru", "d_embed": 16, "d_hidden": 16, "attention": "additive"}}
    run = qkv.load(_train(config, root / "rnn"))
    with pytest.raises(ConfigError, match="not a Transformer"):
        ct2.translation(run, tmp_path / "out")


# -- language model --------------------------------------------------------------------------------
def _generator(run, out: Path):
    summary = run.export("ctranslate2", out)
    assert summary["spec"] == "TransformerDecoderSpec"
    assert {"model.bin", "vocabulary.json", "tokenizer.json"} <= set(summary["files"])
    return ctranslate2.Generator(str(out), device="cpu", intra_threads=1)


def test_lm_greedy_tokens_equal_qkv(shakespeare, tmp_path):
    run = qkv.load(shakespeare)
    generator = _generator(run, tmp_path / "ct2")
    vocabulary = ct2.vocabulary(run.artifacts)
    prompts = [run.artifacts.encode(p) for p in ("HAMLET:\n", "To be, or", "Q", "OPHELIA:\nTo")]
    n = 4  # the longest prompt + n stays within block_size=16 (the learned position table)
    ours = generate_ids(run.model, prompts, SamplingConfig(temperature=0, max_new_tokens=n))
    # the prompt as a forced prefix (include_prompt_in_result=True): max_length counts from its start
    longest = max(map(len, prompts))
    results = generator.generate_batch([_tokens(vocabulary, p) for p in prompts], max_length=longest + n,
                                       sampling_topk=1, include_prompt_in_result=True)
    theirs = [[vocabulary.index(t) for t in r.sequences[0]][len(p):len(p) + n] for p, r in zip(prompts, results)]
    assert theirs == ours
    assert len({tuple(o) for o in ours}) > 1, "a trained model continues different prompts differently"


@pytest.mark.parametrize("variant", sorted(LM_VARIANTS))
def test_lm_logits_equal_qkv_for_each_architecture(root, variant, tmp_path):
    run = qkv.load(_lm(root, f"lm-{variant}", steps=2, **LM_VARIANTS[variant]))
    generator = _generator(run, tmp_path / "ct2")
    vocabulary = ct2.vocabulary(run.artifacts)
    for text in ("HAMLET:\nTo be", "KING:"):
        ids = run.artifacts.encode(text)
        logits = np.asarray(generator.forward_batch([_tokens(vocabulary, ids)]))  # (1, T, V)
        with torch.no_grad():
            reference = run.model(torch.tensor([ids])).numpy()
        np.testing.assert_allclose(logits, reference, atol=1e-4)


def test_lm_t5_bias_is_refused(root, tmp_path):
    run = qkv.load(_lm(root, "lm-t5", steps=1, positional="t5"))
    with pytest.raises(ConfigError, match="model.positional=t5 has no CTranslate2 counterpart"):
        run.export("ctranslate2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_foreign_folder_is_refused_and_a_qkv_one_reused(shakespeare, tmp_path):
    run = qkv.load(shakespeare)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(ConfigError, match="notes.txt"):
        run.export("ctranslate2", tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    first = run.export("ctranslate2", tmp_path / "out")
    assert run.export("ctranslate2", tmp_path / "out")["files"] == first["files"]
