"""Config values out of range, per task, through the CLI (issue 20, item 3): exit status 2, one line
``qkv: error: FILE: section.key ...`` naming the file and the key, and no run folder created.

Before, ``--set model.n_heads=0`` was ``internal error: ZeroDivisionError`` and ``model.d_model=-8``
a torch RuntimeError that left a config.json behind, so the corrected rerun was refused. Also: a
new run whose set-up fails after qkv created its folder leaves nothing of qkv's behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qkv.cli import main
from qkv.rundir import MARKER, MARKER_TEXT
from tests.bad_inputs.conftest import TEXT, classification_config, image_config, lm_config
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus


def task_config(task: str, root: Path) -> dict:
    """The tiny config of ``task`` (the families' test configs), with its data written under ``root``."""
    if task in ("translation", "translation-rnn"):
        cfg = tiny_translation_config(write_copy_corpus(root / "data", n_train=30, n_valid=4), max_steps=1)
        if task == "translation-rnn":
            cfg = {**cfg, "task": task, "model": {"cell": "gru", "d_embed": 16, "d_hidden": 16}}
        return cfg
    if task == "lm":
        (root / "text.txt").write_text(TEXT, encoding="utf-8")
        return lm_config(root / "text.txt")
    if task in ("classification", "embedding"):
        cfg = classification_config(root)
        return cfg if task == "classification" else {**cfg, "task": task,
                                                     "data": {**cfg["data"], "samples_per_class": 2}}
    cfg = image_config(root / "images.npz")
    return cfg if task == "image_classification" else {**cfg, "task": task}


# task -> [(--set KEY=VALUE, what the message must name besides the file and KEY)]
COMMON = [("train.label_smoothing=1.0", "[0, 1)"), ("data.batch_size=0", ">= 1")]
TRANSFORMER = [("model.n_heads=0", ">= 1"), ("model.d_model=-8", ">= 1"), ("model.dropout=1.0", "[0, 1)"),
               ("model.n_heads=5", "not divisible")]
CASES = {
    "translation": TRANSFORMER + COMMON[:1] + [("model.n_kv_heads=0", ">= 1"),
        ("model.n_encoder_layers=-1", ">= 1"), ("model.n_decoder_layers=0", ">= 1"), ("model.max_len=0", ">= 1"),
        ("model.src_vocab_size=-3", ">= 0"), ("data.vocab_size=-3", ">= 1"), ("data.max_len=0", ">= 1"),
        ("data.max_tokens=0", ">= 2"), ("decode.beam_size=0", ">= 1"), ("decode.eval_beam_size=0", ">= 1"),
        ("decode.batch_size=0", ">= 1"), ("decode.length_penalty=-1", "[0, 5]"), ("model.attn_dropout=-0.5", "[0, 1)"),
        ("model.dropout=.nan", "finite")],
    "translation-rnn": COMMON[:1] + [
        ("model.d_hidden=-8", ">= 2"), ("model.d_embed=0", ">= 1"), ("model.n_encoder_layers=-1", ">= 1"),
        ("model.dropout=1.0", "[0, 1)"), ("model.tgt_vocab_size=-3", ">= 0"), ("decode.beam_size=0", ">= 1")],
    "lm": TRANSFORMER + COMMON + [("model.n_kv_heads=0", ">= 1"),
        ("model.n_layers=-1", ">= 1"), ("model.vocab_size=-3", ">= 0"), ("model.block_size=0", ">= 1"),
        ("model.d_ff=-1", ">= 0"), ("data.vocab_size=-3", ">= 1"), ("data.val_fraction=1.0", "(0, 1)"),
        ("data.eval_batches=0", ">= 1"), ("decode.top_p=0", "(0, 1]"), ("decode.temperature=-1", ">= 0"),
        ("decode.top_k=0", ">= 1"), ("decode.max_new_tokens=-1", ">= 0")],
    "classification": TRANSFORMER + COMMON + [
        ("model.n_layers=-1", ">= 1"), ("model.max_len=0", ">= 1"), ("model.vocab_size=-3", ">= 0"),
        ("model.n_classes=-1", ">= 0"), ("model.norm_eps=0", "> 0"), ("data.max_len=2", ">= 3"),
        ("data.vocab_size=-3", ">= 1"), ("decode.batch_size=0", ">= 1")],
    "embedding": COMMON + [
        ("data.temperature=0", "> 0"), ("data.margin=-1", ">= 0"), ("data.samples_per_class=-2", ">= 0"),
        ("model.n_heads=0", ">= 1")],
    "image_classification": TRANSFORMER + COMMON + [
        ("model.patch_size=0", ">= 1"), ("model.patch_size=3", "not divisible by patch_size=3"),
        ("model.image_size=-8", ">= 1"), ("model.channels=0", ">= 1"), ("model.n_layers=-1", ">= 1"),
        ("data.valid_fraction=1.0", "[0, 1)"), ("data.scale=1.0", "[0, 1)"), ("data.rotate=-5", "[0, 180]"),
        ("data.split_seed=-1", "[0, 2**32)"), ("decode.batch_size=0", ">= 1")],
    "image_embedding": COMMON + [("data.temperature=0", "> 0"), ("model.patch_size=0", ">= 1")],
}
PARAMS = [(task, setting, named) for task, cases in CASES.items() for setting, named in cases]


@pytest.mark.parametrize("task,setting,named", PARAMS, ids=[f"{t}-{s}" for t, s, _ in PARAMS])
def test_a_bad_value_is_one_line_naming_file_and_key_and_no_folder(tmp_path, capsys, task, setting, named):
    config = write_config(tmp_path / "c.yaml", task_config(task, tmp_path))
    out = tmp_path / "run"
    code = main(["train", str(config), "--out", str(out), "--set", setting, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    key = setting.partition("=")[0]
    assert err.startswith(f"qkv: error: {config}: ") and err.count("\n") == 1, err
    assert key.rpartition(".")[2] in err and named in err and "Traceback" not in err, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_the_table_covers_every_task():
    from qkv.tasks import TASKS

    assert set(CASES) == set(TASKS)


# -- a set-up that fails after qkv created the folder ------------------------------------------------
@pytest.fixture
def failing_build(monkeypatch):
    """The lm task's model build fails (after the data was read and the tokenizer written)."""
    from qkv.tasks import lm

    def fail(self):
        raise ValueError("model.d_model: cannot build this model (a test)")

    monkeypatch.setattr(lm.LMTask, "build_model", fail)


@pytest.mark.parametrize("before", ["missing", "empty", "marker_only"])
def test_a_failed_set_up_removes_only_what_qkv_created(tmp_path, capsys, failing_build, before):
    config = write_config(tmp_path / "c.yaml", task_config("lm", tmp_path))
    out = tmp_path / "run"
    if before != "missing":
        out.mkdir()
    if before == "marker_only":
        (out / MARKER).write_bytes(MARKER_TEXT)
    assert main(["train", str(config), "--out", str(out), "--quiet"]) == 2
    assert "cannot build this model" in capsys.readouterr().err
    if before == "missing":
        assert not out.exists()
    else:  # the user's folder stays, with what it held and nothing of this start (tokenizer, lock, config)
        assert sorted(p.name for p in out.iterdir()) == ([MARKER] if before == "marker_only" else [])
    again = main(["train", str(config), "--out", str(out), "--quiet", "--set", "train.max_steps=1"])
    assert again == 2  # the build still fails (the fixture), but the folder is never "already holds a run"
    assert "already holds a run" not in capsys.readouterr().err
