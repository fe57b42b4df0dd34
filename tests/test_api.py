"""qkv.load(run_dir): each family's object gives what the CLI and the lower-level functions give.

One tiny run per task (2 training steps: the figures are not the point, equality is).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qkv
from qkv.cli import main
from qkv.errors import ConfigError
from qkv.record import AttentionRecord
from qkv.tasks import TASKS
from qkv.tasks.inference import LoadedRun, OptionError
from tests.bad_inputs.conftest import TEXT, classification_config, image_config, lm_config
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus

KINDS = {"translation": "translation", "translation-rnn": "translation", "lm": "language-model",
         "classification": "text-classification", "embedding": "text-embedding",
         "image_classification": "image-classification", "image_embedding": "image-embedding"}


def _train(config: dict, folder: Path) -> Path:
    path = write_config(folder / "config.yaml", config)
    assert main(["train", str(path), "--out", str(folder / "run"), "--quiet", "--threads", "1"]) == 0
    return folder / "run"


def _configs(root: Path) -> dict[str, dict]:
    data = write_copy_corpus(root / "copy", n_train=40, n_valid=4)
    translation = tiny_translation_config(data, max_steps=2, save_every=2)
    rnn = {**translation, "task": "translation-rnn",
           "model": {"cell": "gru", "d_embed": 16, "d_hidden": 16, "attention": "additive"}}
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "cls").mkdir()
    classification = classification_config(root / "cls")
    embedding = {**classification, "task": "embedding",
                 "data": {**classification["data"], "samples_per_class": 2}}
    image = image_config(root / "images.npz")
    image_embedding = {**image, "task": "image_embedding"}
    return {"translation": translation, "translation-rnn": rnn, "lm": lm_config(root / "text.txt"),
            "classification": classification, "embedding": embedding, "image_classification": image,
            "image_embedding": image_embedding}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    out = {}
    for task, config in _configs(root).items():
        (root / task).mkdir()
        out[task] = _train(config, root / task)
    return out


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[str]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(paths[-1])
    return paths


def _cli_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _lines(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# -- every family ----------------------------------------------------------------------------------
def test_every_task_names_a_family_class():
    assert set(KINDS) == set(TASKS)
    for name, spec in TASKS.items():
        assert issubclass(spec.inference, LoadedRun) and spec.inference.kind == KINDS[name]
        assert spec.make_task.primary_metric == spec.inference.primary_metric


@pytest.mark.parametrize("task", sorted(KINDS))
def test_load_returns_the_family_object(runs, task):
    run = qkv.load(runs[task])
    assert run.kind == KINDS[task] and run.cfg.task == task and run.run_dir == runs[task]
    assert not run.model.training and run.primary_metric == TASKS[task].make_task.primary_metric
    for method in ("translate", "generate", "classify", "embed"):
        if method not in run.predicts:
            with pytest.raises(ConfigError, match=f"{run.kind} run .*it cannot {method} "
                                                  rf"\(it can: {', '.join(run.abilities)}\)"):
                getattr(run, method)(["x"])


def test_import_qkv_stays_cheap():
    code = "import sys, qkv; assert 'torch' not in sys.modules, 'torch'; assert callable(qkv.load)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- translation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["translation", "translation-rnn"])
def test_translate_equals_decode_translate_and_the_cli(runs, task, tmp_path, capsys):
    from qkv.decode import translate

    run = qkv.load(runs[task])
    texts = ["the red dog", "", "a cat sits on the ball"]
    ours = run.translate(texts, beam=2)
    src_tok, tgt_tok = run.artifacts
    reference = translate(run.model, src_tok, tgt_tok, [texts[0], texts[2]], beam_size=2,
                          length_penalty=run.cfg.decode.length_penalty)
    assert ours == [reference[0], "", reference[1]]
    assert run.translate("the red dog", beam=2) == ours[:1]  # one text is a list of one
    capsys.readouterr()
    assert main(["translate", str(runs[task]), "--beam", "2", "--input", _lines(tmp_path, "in.txt", texts)]) == 0
    assert capsys.readouterr().out.splitlines() == ours


def test_translation_evaluate_equals_the_cli_json(runs, tmp_path, capsys):
    src = _lines(tmp_path, "s.txt", ["the red dog", "a big house"])
    ref = _lines(tmp_path, "r.txt", ["the red dog", "a big house"])
    run = qkv.load(runs["translation"])
    result = run.evaluate(src=src, ref=ref, beam=1, output=str(tmp_path / "hyp.txt"))
    assert (tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines() == run.translate(
        ["the red dog", "a big house"], beam=1)
    cli = _cli_json(capsys, ["evaluate", str(runs["translation"]), "--src", src, "--ref", ref, "--beam", "1"])
    assert cli == {"run_dir": str(runs["translation"]), "task": "translation", **result}
    with pytest.raises(OptionError, match="is a translation run: evaluate takes no text "
                                          r"\(it takes: src, ref, beam, output\)"):
        run.evaluate(text="x.txt")


# -- language model ----------------------------------------------------------------------------
def test_generate_with_a_seed_equals_the_cli(runs, capsys):
    run = qkv.load(runs["lm"])
    text = run.generate(["HAMLET:\n"], max_new_tokens=12, temperature=1.0, seed=3)
    capsys.readouterr()
    assert main(["generate", str(runs["lm"]), "--prompt", "HAMLET:\n", "--max-new-tokens", "12",
                 "--temperature", "1.0", "--seed", "3"]) == 0
    assert capsys.readouterr().out == text[0] + "\n"
    assert "HAMLET:\n" + "".join(run.stream("HAMLET:\n", max_new_tokens=12, temperature=1.0, seed=3)) == text[0]
    assert run.generate("HAMLET:\n", max_new_tokens=12, temperature=1.0, seed=3) == text


def test_generate_batches_prompts_and_checks_its_settings(runs):
    run = qkv.load(runs["lm"])
    out = run.generate(["KING:", "QUEEN:\nTo be"], max_new_tokens=5, temperature=0)
    assert len(out) == 2 and out[0].startswith("KING:") and out[1].startswith("QUEEN:\nTo be")
    assert out == [run.generate([p], max_new_tokens=5, temperature=0)[0] for p in ["KING:", "QUEEN:\nTo be"]]
    assert run.sampling() == run.cfg.decode and run.cfg.decode.max_new_tokens == 4  # the run's decode: section
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        run.generate(["x"], temperature=-1.0)


def test_lm_evaluate_equals_the_cli_json(runs, tmp_path, capsys):
    path = tmp_path / "held.txt"
    path.write_text(TEXT[:300], encoding="utf-8")
    result = qkv.load(runs["lm"]).evaluate(text=str(path))
    assert _cli_json(capsys, ["evaluate", str(runs["lm"]), "--text", str(path)]) == {
        "run_dir": str(runs["lm"]), "task": "lm", **result}
    assert result["text"] == str(path) and result["tokens"] >= 299 and result["perplexity"] > 1


# -- text classification and embeddings ---------------------------------------------------------
def test_classify_and_embed_equal_the_library_functions(runs, tmp_path, capsys):
    from qkv.tasks.classification import classify_texts, embed_texts

    run = qkv.load(runs["classification"])
    texts = ["good film number 3", "bad film", "number"]
    labelled = run.classify(texts)
    assert labelled == classify_texts(run.model, run.artifacts, texts, batch_size=64)
    assert all(isinstance(label, str) and isinstance(p, float) for label, p in labelled)
    vectors = run.embed(texts, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 16)
    np.testing.assert_allclose(vectors, embed_texts(run.model, run.artifacts, texts, batch_size=64), atol=1e-6)
    capsys.readouterr()
    assert main(["classify", str(runs["classification"]), "--input", _lines(tmp_path, "t.txt", texts)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{label}\t{p:.4f}" for label, p in labelled]
    with pytest.raises(OptionError, match="text-classification run: classify takes no tta"):
        run.classify(texts, tta=True)


def test_text_evaluate_equals_the_cli_json(runs, capsys):
    for task in ("classification", "embedding"):
        data = json.loads((runs[task] / "config.json").read_text())["data"]["valid"]
        result = qkv.load(runs[task]).evaluate(data=data)
        assert _cli_json(capsys, ["evaluate", str(runs[task]), "--data", data]) == {
            "run_dir": str(runs[task]), "task": task, **result}
        assert result["examples"] == 24


def test_embedding_run_embeds(runs, tmp_path, capsys):
    from qkv.tasks.classification import embed_texts

    run = qkv.load(runs["embedding"])
    vectors = run.embed(["good film", "bad film"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, embed_texts(run.model, run.artifacts, ["good film", "bad film"],
                                                       batch_size=64))
    out = tmp_path / "e.npy"
    capsys.readouterr()
    assert main(["embed", str(runs["embedding"]), "--input", _lines(tmp_path, "t.txt", ["good film", "bad film"]),
                 "--output", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), vectors)


# -- images ------------------------------------------------------------------------------------
def test_image_classify_and_embed(runs, pngs, capsys):
    from qkv.tasks.image_inference import classify_images

    run = qkv.load(runs["image_classification"])
    labelled = run.classify(pngs)
    assert labelled == classify_images(run.cfg, run.model, run.artifacts, pngs)
    assert run.classify(pngs, tta=True) == classify_images(run.cfg, run.model, run.artifacts, pngs, tta=True)
    capsys.readouterr()
    assert main(["classify", str(runs["image_classification"]), "--image", *pngs]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{f}\t{label}\t{p:.4f}" for f, (label, p) in zip(pngs, labelled)]
    for task in ("image_classification", "image_embedding"):
        vectors = qkv.load(runs[task]).embed(pngs)
        assert vectors.dtype == np.float32 and vectors.shape == (3, 16)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    embedder = qkv.load(runs["image_embedding"])
    from qkv.tasks.vision import read_images_for

    with torch.no_grad():
        expected = embedder.model(read_images_for(embedder.cfg, embedder.artifacts, pngs))
    np.testing.assert_allclose(embedder.embed(pngs), expected.numpy(), atol=1e-6)


def test_image_evaluate_equals_the_cli_json(runs, capsys):
    for task, options in (("image_classification", {"tta": True}), ("image_embedding", {"split": "valid"})):
        result = qkv.load(runs[task]).evaluate(**options)
        argv = ["evaluate", str(runs[task]), *[f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]]
        assert _cli_json(capsys, argv) == {"run_dir": str(runs[task]), "task": task, **result}
    run = qkv.load(runs["image_classification"])
    alone = run.evaluate()
    voted = run.evaluate(ensemble=[runs["image_classification"]])  # the same run twice: the same mean
    assert voted["accuracy"] == alone["accuracy"] and voted["members"] == [str(run.run_dir)] * 2
    assert run.evaluate(ensemble=[qkv.load(runs["image_classification"])])["accuracy"] == alone["accuracy"]
    with pytest.raises(OptionError, match="image-embedding run: evaluate takes no tta"):
        qkv.load(runs["image_embedding"]).evaluate(tta=True)


# -- attention: the record's weights, with labels ------------------------------------------------
def _record(model, *inputs) -> dict:
    record = AttentionRecord(True)
    with torch.no_grad():
        model(*inputs, record=record)
    return record.weights


def _same(aset, weights) -> None:
    assert {g.kind for g in aset.groups} == set(weights)
    for g in aset.groups:
        assert set(g.layers) == set(weights[g.kind])
        for i, w in g.layers.items():
            torch.testing.assert_close(w, weights[g.kind][i][0])
        assert w.shape[-2:] == (len(g.queries), len(g.keys))


@pytest.mark.parametrize("task", ["translation", "translation-rnn"])
def test_translation_attention_is_the_record_of_the_hypothesis(runs, task):
    from qkv.decode import beam_search

    run = qkv.load(runs[task])
    aset = run.attention(text="the red dog")
    src_tok, tgt_tok = run.artifacts
    src = torch.tensor([src_tok.encode("the red dog") + [src_tok.eos_id]])
    with torch.no_grad():
        hyp = beam_search(run.model, src, beam_size=run.cfg.decode.beam_size,
                          length_penalty=run.cfg.decode.length_penalty)[0]
    _same(aset, _record(run.model, src, torch.tensor([[tgt_tok.bos_id, *hyp]])))
    assert "cross" in {g.kind for g in aset.groups}


@pytest.mark.parametrize("task, kind", [("lm", "decoder"), ("classification", "encoder"), ("embedding", "encoder")])
def test_text_attention_is_the_record(runs, task, kind):
    run = qkv.load(runs[task])
    aset = run.attention(text="To be, or not", layers=[0])
    tokenizer = run.artifacts if task == "lm" else run.artifacts.tokenizer
    ids = tokenizer.encode("To be, or not") if task == "lm" else tokenizer.encode_batch(["To be, or not"])[0]
    _same(aset, _record(run.model, torch.tensor([ids])))
    assert aset.groups[0].kind == kind
    assert (aset.prediction is not None) == (task == "classification")


@pytest.mark.parametrize("task", ["image_classification", "image_embedding"])
def test_image_attention_is_the_record(runs, pngs, task):
    from qkv.tasks.vision import read_images_for

    run = qkv.load(runs[task])
    aset = run.attention(image=pngs[0])
    _same(aset, _record(run.model, read_images_for(run.cfg, run.artifacts, pngs[:1])))
    assert aset.groups[0].grid == (2, 2) and aset.image.shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="reads images, not text"):
        run.attention(text="a dog")


def test_attention_refuses_the_wrong_input(runs):
    with pytest.raises(ConfigError, match="needs an image run"):
        qkv.load(runs["lm"]).attention(image="x.png")
    with pytest.raises(ConfigError, match="needs one input"):
        qkv.load(runs["lm"]).attention()
