"""The MFU figure of the training log: counted model FLOPs, the peak's sources, the logged value."""

from __future__ import annotations

import json

import torch

from qkv import mfu
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.run import from_mapping, train_run
from tests.helpers import WORDS


def test_counted_flops_match_nanogpt_formula():
    """nanoGPT's estimate_mfu: 6N + 12 L D T per token, N without the position table (PaLM, app. B)."""
    cfg = DecoderOnlyConfig(vocab_size=96, block_size=64, d_model=64, n_heads=4, n_layers=3, dropout=0.0)
    model = DecoderOnly(cfg).eval()
    x = torch.randint(0, 96, (2, 64))
    counted = mfu.training_flops_per_token(mfu.forward_flops(lambda: model(x)), x.numel())
    n = sum(p.numel() for name, p in model.named_parameters() if "position" not in name)
    nanogpt = 6 * n + 12 * cfg.n_layers * cfg.d_model * cfg.block_size
    assert abs(counted - nanogpt) / nanogpt < 0.05, (counted, nanogpt)


def test_peak_sources(monkeypatch):
    cpu = torch.device("cpu")
    assert mfu.peak_flops(100.0, cpu, None, environ={"QKV_PEAK_TFLOPS": "5"}) == 100e12  # the config wins
    assert mfu.peak_flops(0.0, cpu, None, environ={"QKV_PEAK_TFLOPS": "5"}) == 5e12
    assert mfu.peak_flops(0.0, cpu, None, environ={"QKV_PEAK_TFLOPS": "fast"}) is None  # ignored, with a warning
    assert mfu.peak_flops(0.0, cpu, None, environ={}) is None  # no guess on CPU
    assert mfu.mfu(1e9, 100.0, 1e12, 2) == 1e9 * 100 / 2e12
    assert mfu.measured_matmul_peak(cpu, torch.float32, n=64, repeats=1) > 0


def _lm_run(tmp_path, name):
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 20) + "\n", encoding="utf-8")
    cfg = from_mapping({
        "task": "lm",
        "data": {"train": [str(tmp_path / "text.txt")], "tokenizer": "char", "batch_size": 2, "eval_batches": 1},
        "model": {"block_size": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.1},
        "train": {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant", "warmup_steps": 1, "max_steps": 4,
                  "eval_every": 4, "save_every": 4, "log_every": 2},
    }, source="test")
    torch.manual_seed(0)
    train_run(cfg, tmp_path / name, device=torch.device("cpu"))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"], tmp_path / name / "model.safetensors"


def test_mfu_is_logged_and_counting_does_not_change_training(tmp_path, monkeypatch):
    without, weights = _lm_run(tmp_path, "plain")
    assert all("mfu" not in r for r in without)
    monkeypatch.setenv("QKV_PEAK_TFLOPS", "0.001")
    logged, weights_mfu = _lm_run(tmp_path, "mfu")
    assert all(r["mfu"] > 0 for r in logged)
    assert [r["loss"] for r in logged] == [r["loss"] for r in without]  # same dropout draws, same batches
    assert weights.read_bytes() == weights_mfu.read_bytes()
