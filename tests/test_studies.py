"""The studies: tiny end-to-end runs that write their reports, and the measurements they rest on."""

import dataclasses
from pathlib import Path

import pytest
import torch

from qkv.cli import main
from qkv.studies import attention_variants, rnn_vs_attention, synthetic

TINY_SIZE = dict(d_model=16, n_heads=2, d_ff=32, n_layers=1, d_embed=16, d_hidden=16)


def test_rnn_vs_attention_writes_its_report(tmp_path):
    s = dataclasses.replace(
        rnn_vs_attention.Settings.quick(), name="tiny", grad_len=6, grad_batches=1, speed_lengths=(4, 8),
        task=synthetic.SyntheticTask("reverse", 5, 2, 6), eval_lengths=(2, 6), eval_n=4, steps=5, batch_size=4,
        size=TINY_SIZE, models=("gru-none", "gru-general", "transformer"))
    report = rnn_vs_attention.run_study(tmp_path, tmp_path / "work", settings=s, data_dir=str(tmp_path / "none"),
                                        command="test")
    text = report.read_text()
    for heading in ("1. Vanishing", "2. Exploding", "3. A long-range task", "4. Speed", "5. Multi30k", "Skipped"):
        assert heading in text
    for png in ("vanishing", "grad-norms", "synthetic", "speed"):
        assert (tmp_path / f"rnn-vs-attention-{png}.png").stat().st_size > 1000
    # one part rerun: the report keeps the other parts' last results
    (tmp_path / "rnn-vs-attention-synthetic.png").unlink()
    again = rnn_vs_attention.run_study(tmp_path, tmp_path / "work", settings=s, data_dir=None, command="again",
                                       parts=("gradients",)).read_text()
    assert "3. A long-range task" in again and "`again`" in again and "`test`" in again
    assert not (tmp_path / "rnn-vs-attention-synthetic.png").exists()
    with pytest.raises(ValueError, match="unknown part 'bleu'"):
        rnn_vs_attention.run_study(tmp_path, tmp_path / "work", settings=s, data_dir=None, parts=("bleu",))


def test_multi30k_section_trains_presets_and_scores_buckets(tmp_path):
    """The Multi30k part on a tiny de/en corpus with the real presets, shrunk by overrides."""
    from tests.helpers import write_copy_corpus

    data = write_copy_corpus(tmp_path / "data", n_train=200, n_valid=12)
    for split in ("train", "val"):
        (data / f"{split}.de").write_text((data / f"{split}.src").read_text())
        (data / f"{split}.en").write_text((data / f"{split}.tgt").read_text())
    s = dataclasses.replace(rnn_vs_attention.Settings.quick(), multi30k=("multi30k-rnn-gru-additive", "multi30k-de-en"),
                            multi30k_steps=2, multi30k_sentences=12,
                            multi30k_overrides=("data.vocab_size=60", "data.max_tokens=256", "data.max_len=32",
                                                "model.d_model=16", "model.d_ff=32", "model.n_heads=2",
                                                "model.d_embed=16", "model.d_hidden=16"))
    text = rnn_vs_attention._multi30k_section(tmp_path, tmp_path / "work", s, str(data), ())
    assert "multi30k-rnn-gru-additive (2 steps)" in text and "multi30k-de-en (2 steps)" in text
    assert (tmp_path / "rnn-vs-attention-multi30k.png").is_file()


def test_bleu_by_bucket_splits_by_source_words():
    srcs = ["a b", "a b c d e f g h i j k l", "x"]
    refs = ["the cat sat on the mat", "a dog ran in the park today", "hello there my friend"]
    out = rnn_vs_attention.bleu_by_bucket(refs, refs, srcs)
    assert out["all"] == (pytest.approx(100.0), 3)
    assert out["1-10"][1] == 2 and out["11-15"][1] == 1 and ">=21" not in out


def test_recurrence_vanishes_and_attention_does_not():
    n = 48
    gru = rnn_vs_attention.gradient_by_distance("gru", n=n, d=16, n_layers=1, batches=2, seed=0)
    attn = rnn_vs_attention.gradient_by_distance("transformer", n=n, d=16, n_layers=1, batches=2, seed=0)
    # distance 0 also has the residual path to the output; compare with distance 1
    assert gru[n - 1] / gru[1] < 1e-6  # orders of magnitude smaller far from the output
    assert attn[n - 1] / attn[1] > 0.3


def test_sequential_operations_grow_only_for_recurrence():
    size = {"n_layers": 2}
    assert rnn_vs_attention.sequential_ops("gru-general", 512, size) == 4 * rnn_vs_attention.sequential_ops(
        "gru-general", 128, size)
    assert rnn_vs_attention.sequential_ops("transformer", 512, size) == rnn_vs_attention.sequential_ops(
        "transformer", 32, size)


def test_attention_variants_writes_its_report(tmp_path):
    s = dataclasses.replace(attention_variants.Settings.quick(), name="tiny",
                            task=synthetic.SyntheticTask("reverse", 5, 2, 6), eval_lengths=(2, 6), eval_n=4,
                            steps=5, batch_size=4, d_embed=8, widths=(8, 16), d_ks=(4, 64), lengths=(4, 8), repeats=1)
    report = attention_variants.run_study(tmp_path, settings=s, command="test")
    text = report.read_text()
    assert "| additive | 8 |" in text and "| scaled_dot | 16 |" in text
    for png in ("saturation", "quality", "loss", "cost"):
        assert (tmp_path / f"attention-variants-{png}.png").stat().st_size > 1000


def test_unscaled_softmax_saturates_and_scaled_does_not():
    small, large = (attention_variants.saturation(d, scaled=False) for d in (4, 1024))
    assert large["max_weight"] > 0.9 > small["max_weight"] and large["entropy"] < small["entropy"] / 5
    scaled = [attention_variants.saturation(d, scaled=True)["entropy"] for d in (4, 1024)]
    assert abs(scaled[0] - scaled[1]) < 0.2


def test_additive_keeps_more_for_backward_than_multiplicative():
    sizes = {k: attention_variants.score_cost(k, B=2, T=8, S=8, d=16, repeats=1)[1]
             for k in attention_variants.VARIANTS}
    assert sizes["additive"] > 4 * sizes["dot"] > 0
    assert all(isinstance(v, int) for v in sizes.values())


def test_synthetic_task_targets():
    task = synthetic.SyntheticTask("reverse", 5, 3, 3)
    (src, tgt), = task.pairs(1, torch.Generator().manual_seed(0))
    assert src[-1] == synthetic.EOS and tgt == src[:-1][::-1]
    with pytest.raises(ValueError, match="kind must be"):
        synthetic.SyntheticTask("sort")


def test_study_cli_rejects_bad_threads(capsys):
    assert main(["study", "attention-variants", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "must be an int >= 1, got 0" in err


def test_study_writes_under_runs_studies_by_default_and_quick_says_it_proves_nothing(tmp_path, monkeypatch):
    from qkv import commands
    from qkv.studies import QUICK_NOTE, default_out

    assert default_out("attention-variants") == Path("runs/studies/attention-variants")
    seen = {}

    def fake_run_study(out, *, settings, command):
        seen.update(out=Path(out), settings=settings)
        return Path(out) / "attention-variants.md"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(attention_variants, "run_study", fake_run_study)
    assert main(["study", "attention-variants", "--quick"]) == 0
    assert seen["out"] == Path("runs/studies/attention-variants") and seen["settings"].name == "quick"
    assert main(["study", "attention-variants", "--output", "elsewhere"]) == 0
    assert seen["out"] == Path("elsewhere")
    assert "too small to conclude" in QUICK_NOTE and commands.cmd_study


def test_quick_report_carries_the_note(tmp_path):
    from qkv.studies import QUICK_NOTE

    s = dataclasses.replace(
        rnn_vs_attention.Settings.quick(), grad_len=6, grad_batches=1, speed_lengths=(4,),
        task=synthetic.SyntheticTask("reverse", 5, 2, 6), eval_lengths=(2,), eval_n=4, steps=2, batch_size=4,
        size=TINY_SIZE, models=("gru-none",))
    report = rnn_vs_attention.run_study(tmp_path, tmp_path / "work", settings=s, data_dir=None, command="t",
                                        parts=("gradients",))
    assert s.name == "quick" and QUICK_NOTE in report.read_text()
