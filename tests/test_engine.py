"""The shared training engine: resume, atomic checkpoints, NaN handling, schedules."""

import json
import math

import pytest
import torch

from qkv import checkpoint as ckpt
from qkv.errors import CheckpointError, ConfigError, TrainingError
from qkv.run import from_mapping, load_run, train_run
from qkv.schedules import multiplier, noam
from tests.helpers import tiny_translation_config, write_copy_corpus


def _train(tmp_path, name, *, resume=False, **train):
    data = write_copy_corpus(tmp_path / "data")
    cfg = from_mapping(tiny_translation_config(data, **train), source="test")
    torch.manual_seed(cfg.train.seed)
    return train_run(cfg, tmp_path / name, device=torch.device("cpu"), resume=resume)


def _weights(run_dir):
    return ckpt.read_weights(run_dir / "model.safetensors")


def test_resume_is_bit_identical(tmp_path):
    _train(tmp_path, "straight", max_steps=8)
    _train(tmp_path, "split", max_steps=4)
    data = tmp_path / "data"
    cfg = from_mapping(tiny_translation_config(data, max_steps=8), source="test")
    torch.manual_seed(12345)  # resuming must restore the generators itself
    train_run(cfg, tmp_path / "split", device=torch.device("cpu"), resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]  # no duplicated log lines


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, "run", max_steps=4)
    run = tmp_path / "run"
    before = ckpt.latest_checkpoint(run)
    good = ckpt.read_weights(before / ckpt.WEIGHTS)

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", crash)
    model = load_run(run)[1]
    with pytest.raises(CheckpointError, match=f"step_00000099: checkpoint not saved.*{before.name}, is intact"):
        ckpt.save_checkpoint(run, 99, model, {"x": 1}, {}, keep=5)
    assert ckpt.latest_checkpoint(run) == before
    after = ckpt.read_weights(before / ckpt.WEIGHTS)
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    with pytest.raises(OSError):
        ckpt.save_weights(model, run / "model.safetensors")
    assert ckpt.read_weights(run / "model.safetensors")  # the final weights are untouched


def test_interrupted_save_debris_is_ignored_and_cleaned(tmp_path):
    _train(tmp_path, "run", max_steps=4)
    run = tmp_path / "run"
    debris = run / "checkpoints" / ".step_00000008.abc"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(run).name == "step_00000004"
    (run / "checkpoints" / "latest").unlink()  # even without the pointer, the newest complete one wins
    assert ckpt.latest_checkpoint(run).name == "step_00000004"
    ckpt.cleanup_partial(run)
    assert not debris.exists()


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    from qkv.tasks import translation

    real = translation.sequence_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("nan"), n) if calls["n"] > 5 else (loss, n)

    monkeypatch.setattr(translation, "sequence_loss", poisoned)
    with pytest.raises(TrainingError, match=r"step 6: the loss is nan.*step_00000004"):
        _train(tmp_path, "run", max_steps=8)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000004"


def test_nan_skip_mode_skips_then_gives_up(tmp_path, monkeypatch):
    from qkv.tasks import translation

    real = translation.sequence_loss
    calls = {"n": 0}

    def sometimes(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("inf"), n) if calls["n"] == 3 else (loss, n)

    monkeypatch.setattr(translation, "sequence_loss", sometimes)
    _train(tmp_path, "run", max_steps=6, on_nan="skip")
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_all_padding_batch_gives_zero_loss_not_nan():
    from qkv.tasks.translation import sequence_loss

    logits = torch.randn(2, 3, 7, requires_grad=True)
    targets = torch.zeros(2, 3, dtype=torch.long)
    loss, n = sequence_loss(logits, targets, pad_id=0, label_smoothing=0.1)
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_existing_run_is_not_overwritten(tmp_path):
    from qkv.errors import ConfigError

    _train(tmp_path, "run", max_steps=2, save_every=2)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        _train(tmp_path, "run", max_steps=2)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_average_last_checkpoints(tmp_path):
    _train(tmp_path, "run", max_steps=8, save_every=2, keep_checkpoints=3, average_last=3)
    run = tmp_path / "run"
    kept = ckpt.list_checkpoints(run)
    assert [p.name for p in kept] == ["step_00000004", "step_00000006", "step_00000008"]
    parts = [ckpt.read_weights(p / ckpt.WEIGHTS) for p in kept]
    final = _weights(run)
    for name in final:
        expected = sum(p[name].double() for p in parts) / 3
        torch.testing.assert_close(final[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_corrupt_weights_and_state_are_clear_errors(tmp_path):
    _train(tmp_path, "run", max_steps=4)
    run = tmp_path / "run"
    (run / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_run(run)
    state = ckpt.latest_checkpoint(run) / ckpt.STATE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="train_state.pt"):
        ckpt.load_train_state(state.parent)
    with pytest.raises(CheckpointError, match="not a qkv run directory"):
        load_run(tmp_path)


def test_noam_matches_the_paper():
    d_model, warmup = 512, 4000
    peak = (d_model * warmup) ** -0.5
    for step in (1, 100, 4000, 10000, 100000):
        paper = d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
        assert math.isclose(peak * noam(step, warmup=warmup), paper, rel_tol=1e-9)
    assert multiplier("cosine", 10_000, warmup=10, total=10_000, floor=0.1) == pytest.approx(0.1)
    assert multiplier("linear", 5, warmup=10, total=100) == pytest.approx(0.6)


def test_early_stopping_keeps_the_best(tmp_path, monkeypatch):
    from qkv.tasks import translation

    scores = iter([10.0, 20.0, 15.0, 12.0, 30.0])
    monkeypatch.setattr(translation.TranslationTask, "evaluate", lambda self, model: {"bleu": next(scores)})
    _train(tmp_path, "run", max_steps=20, eval_every=2, save_every=2, patience=2, keep_checkpoints=2)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["bleu"] for r in records if r["split"] == "valid"] == [10.0, 20.0, 15.0, 12.0]  # stopped at step 8
    best = ckpt.read_weights(run / "checkpoints" / "step_00000004" / ckpt.WEIGHTS)  # kept despite keep=2
    final = _weights(run)
    assert all(torch.equal(best[k], final[k]) for k in best)


@pytest.mark.parametrize("settings", [{"precision": "bf16"}, {"accumulate": 2}, {"clip_grad_norm": 0.5},
                                      {"optimizer": "adam", "schedule": "linear"}])
def test_training_options_run_and_learn(tmp_path, settings):
    _train(tmp_path, "run", max_steps=12, save_every=12, log_every=1, **settings)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert all(math.isfinite(x) for x in losses) and min(losses[-3:]) < losses[0]


def test_layer_wise_learning_rates_and_decay_groups():
    from qkv.config import TrainConfig
    from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SequenceClassifier
    from qkv.train import build_optimizer, layer_depth

    assert layer_depth("encoder.embed.weight", 2) == 0
    assert layer_depth("encoder.layers.0.ff.w_1.weight", 2) == 1
    assert layer_depth("encoder.layers.1.ff.w_1.bias", 2) == 2
    assert layer_depth("head.weight", 2) == 3
    model = SequenceClassifier(EncoderOnly(EncoderOnlyConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                                                             n_layers=2, max_len=16)), n_classes=2)
    cfg = TrainConfig(optimizer="adamw", lr=1.0, weight_decay=0.01, layer_lr_decay=0.5)
    opt = build_optimizer(model, cfg)
    scale = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[id(p)] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.layers.1.self_attn.qkv_proj.weight"])] == (0.5, 0.01)
    assert scale[id(named["encoder.layers.0.self_attn.qkv_proj.bias"])] == (0.25, 0.0)
    assert scale[id(named["encoder.embed.weight"])][0] == 0.125
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)  # every parameter once
    flat = build_optimizer(model, TrainConfig(optimizer="adamw"))
    assert {g["lr_scale"] for g in flat.param_groups} == {1.0}
    with pytest.raises(ConfigError, match="layer_lr_decay"):
        TrainConfig(layer_lr_decay=0.0)


def test_log_records_the_largest_gradient_norm_before_clipping(tmp_path):
    _train(tmp_path, "run", max_steps=4, clip_grad_norm=1e-3, log_every=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if r["split"] == "train"]
    assert len(norms) == 2 and all(n > 1e-3 for n in norms)  # measured before clipping to 1e-3
