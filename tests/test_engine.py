"""The shared training engine: resume, atomic checkpoints, NaN handling, schedules."""

import json
import math

import pytest
import torch
from torch import nn

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

    real = translation.TranslationTask.loss  # the task's loss, whatever it computes with
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("nan"), n) if calls["n"] > 5 else (loss, n)

    monkeypatch.setattr(translation.TranslationTask, "loss", poisoned)
    with pytest.raises(TrainingError, match=r"step 6: the loss is nan.*step_00000004"):
        _train(tmp_path, "run", max_steps=8)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000004"


def test_nan_skip_mode_skips_then_gives_up(tmp_path, monkeypatch):
    from qkv.tasks import translation

    real = translation.TranslationTask.loss
    calls = {"n": 0}

    def sometimes(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("inf"), n) if calls["n"] == 3 else (loss, n)

    monkeypatch.setattr(translation.TranslationTask, "loss", sometimes)
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


def _scales(opt) -> dict[int, tuple[float, float]]:
    """id(parameter) -> (lr_scale, weight_decay) of its optimizer group; each parameter in one group."""
    scale = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in scale
            scale[id(p)] = (group["lr_scale"], group["weight_decay"])
    return scale


def _name_based_depth(name: str, n_layers: int) -> int:
    """The regex over parameter names that layer_groups() replaced: the reference for "unchanged"."""
    import re

    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embed" in name or "positions" in name else n_layers + 1


def _classifier():
    from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig, SequenceClassifier

    torch.manual_seed(0)
    return SequenceClassifier(EncoderOnly(EncoderOnlyConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                                                            n_layers=2, max_len=16)), n_classes=2)


def test_layer_wise_learning_rates_and_decay_groups_are_unchanged_for_encoder_only():
    """BERT fine-tuning (SST-2) gets today's groups: embeddings decay^3, layer i decay^(2 - i), head 1."""
    from qkv.config import TrainConfig
    from qkv.train import build_optimizer

    model = _classifier()
    cfg = TrainConfig(optimizer="adamw", lr=1.0, weight_decay=0.01, layer_lr_decay=0.5)
    opt = build_optimizer(model, cfg)
    scale = _scales(opt)
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.layers.1.self_attn.qkv_proj.weight"])] == (0.5, 0.01)
    assert scale[id(named["encoder.layers.0.self_attn.qkv_proj.bias"])] == (0.25, 0.0)
    assert scale[id(named["encoder.embed.weight"])][0] == 0.125
    assert scale[id(named["head.weight"])] == (1.0, 0.01)
    assert len(scale) == len(named)  # every parameter once
    for name, p in named.items():  # every parameter as the name-based depth put it
        depth = _name_based_depth(name, 2)
        assert scale[id(p)] == (0.5 ** (3 - depth), 0.01 if p.dim() >= 2 else 0.0), name
    groups = [([id(p) for p in g["params"]], g["lr_scale"], g["weight_decay"]) for g in opt.param_groups]
    assert len(groups) == 8  # 4 depths x (decay, no decay)
    flat = build_optimizer(model, TrainConfig(optimizer="adamw"))
    assert {g["lr_scale"] for g in flat.param_groups} == {1.0}
    with pytest.raises(ConfigError, match="layer_lr_decay"):
        TrainConfig(layer_lr_decay=0.0)


def _family(name: str):
    """(a tiny model of each family, its number of layers)."""
    torch.manual_seed(0)
    if name == "transformer":
        from qkv.models.transformer import Transformer, TransformerConfig

        return Transformer(TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=16, n_heads=2, d_ff=32,
                                             n_encoder_layers=2, n_decoder_layers=3, max_len=16)), 5
    if name == "decoder_only":
        from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig

        return DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=8, d_model=16, n_heads=2, n_layers=3)), 3
    if name == "encoder_only":
        return _classifier(), 2
    if name == "vit":
        from qkv.models.vit import ViT, ViTConfig

        return ViT(ViTConfig(image_size=8, channels=1, patch_size=2, d_model=16, n_heads=2, d_ff=32, n_layers=3,
                             n_classes=3)), 3
    from qkv.models.rnn_seq2seq import RNNSeq2Seq, RNNSeq2SeqConfig

    return RNNSeq2Seq(RNNSeq2SeqConfig(src_vocab_size=20, tgt_vocab_size=20, d_embed=8, d_hidden=16,
                                       n_encoder_layers=2, n_decoder_layers=2)), None


@pytest.mark.parametrize("family", ["transformer", "decoder_only", "encoder_only", "vit", "rnn_seq2seq"])
def test_layer_lr_decay_gives_one_scale_per_layer_in_every_family(family):
    from qkv.config import TrainConfig
    from qkv.train import build_optimizer

    model, n_layers = _family(family)
    layer_groups = model.layer_groups()
    if n_layers is not None:
        assert len(layer_groups) == n_layers + 2  # embeddings, each layer, head
    scale = _scales(build_optimizer(model, TrainConfig(optimizer="adamw", lr=1.0, layer_lr_decay=0.5)))
    assert len(scale) == len(list(model.parameters()))  # every parameter once
    for i, group in enumerate(layer_groups):  # group i of the model's layer_groups gets decay^(n + 1 - i)
        assert {scale[id(p)][0] for p in group} <= {0.5 ** (len(layer_groups) - 1 - i)}
    # a group may be empty (a post-norm Transformer with a tied output has no head parameters of its own)
    assert len({s for s, _ in scale.values()}) == sum(1 for group in layer_groups if group)
    assert all(layer_groups[1:-1])  # every layer has parameters


def test_layer_lr_decay_checks_the_models_layer_groups():
    from qkv.config import TrainConfig
    from qkv.train import build_optimizer

    cfg = TrainConfig(optimizer="adamw", layer_lr_decay=0.9)
    plain = nn.Sequential(nn.Linear(3, 3))
    build_optimizer(plain, TrainConfig(optimizer="adamw"))  # without layer-wise decay no groups are needed
    with pytest.raises(ConfigError, match="layer_groups"):
        build_optimizer(plain, cfg)

    class Grouped(nn.Sequential):
        def __init__(self, groups):
            super().__init__(nn.Linear(3, 3), nn.Linear(3, 3))
            self.groups = groups

        def layer_groups(self):
            return self.groups(self)

    build_optimizer(Grouped(lambda m: [[m[0].weight, m[0].bias], [m[1].weight, m[1].bias]]), cfg)
    with pytest.raises(ValueError, match="leaves out '1.bias'"):
        build_optimizer(Grouped(lambda m: [[m[0].weight, m[0].bias], [m[1].weight]]), cfg)
    with pytest.raises(ValueError, match="groups 0 and 1"):
        build_optimizer(Grouped(lambda m: [list(m[0].parameters()), list(m.parameters())]), cfg)


def test_log_records_the_largest_gradient_norm_before_clipping(tmp_path):
    _train(tmp_path, "run", max_steps=4, clip_grad_norm=1e-3, log_every=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if r["split"] == "train"]
    assert len(norms) == 2 and all(n > 1e-3 for n in norms)  # measured before clipping to 1e-3
