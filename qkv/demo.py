"""The demo (`make demo`): attention as retrieval, then a character-level GPT trained on Shakespeare.

It trains nanoGPT's CPU recipe (4 layers, 4 heads, d_model 128, block 64, batch 12, 2000 steps)
on the full Tiny Shakespeare when ../shared/data/tinyshakespeare exists, else on a ~40 KB
public-domain excerpt shipped in the package, then samples text and draws one head's attention
over the sample and the loss curves. About two minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch

from qkv.attention import retrieve
from qkv.record import AttentionRecord
from qkv.run import from_mapping, load_run, train_run

log = logging.getLogger(__name__)

FULL_TEXT = Path("../shared/data/tinyshakespeare/input.txt")
PROMPT = "ROMEO:\n"


def retrieval_example() -> dict:
    """One query against four keys: the similarities, the softmax weights and the output."""
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.7, 0.7, 0.0]])
    values = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [5.0, 5.0]])
    query = torch.tensor([2.0, 0.5, 0.0])
    found = retrieve(query, keys, values)
    return {"query": query, "keys": keys, "values": values, **found._asdict()}


def demo_config(text_path: Path, *, steps: int, excerpt: bool) -> dict:
    """nanoGPT's CPU recipe for Tiny Shakespeare as a qkv run config."""
    return {
        "task": "lm",
        "data": {"train": [str(text_path)], "tokenizer": "char", "batch_size": 12, "eval_batches": 20},
        "model": {"block_size": 64, "d_model": 128, "n_heads": 4, "n_layers": 4,
                  "dropout": 0.2 if excerpt else 0.0, "positional": "learned"},
        "train": {"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1,
                  "schedule": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1, "max_steps": steps,
                  "label_smoothing": 0.0, "clip_grad_norm": 1.0, "log_every": 100,
                  "eval_every": max(steps // 4, 1), "save_every": steps, "keep_checkpoints": 1},
        "decode": {"max_new_tokens": 300, "temperature": 0.8, "top_k": 200},
    }


def text_source() -> tuple[Path, bool]:
    """The full Tiny Shakespeare if it is here, else the excerpt shipped in the package."""
    if FULL_TEXT.is_file():
        return FULL_TEXT, False
    return Path(str(resources.files("qkv") / "assets" / "shakespeare_excerpt.txt")), True


def run(out_dir: str | Path, *, steps: int = 2000, seed: int = 0, progress: bool = True) -> dict:
    """Train, sample, draw; returns what the CLI reports. Replaces an earlier demo run in out_dir."""
    import shutil

    from qkv.generate import SamplingConfig, generate_ids
    from qkv.rundir import RunDir, read_metrics
    from qkv.viz import plot_curves, plot_head, plot_heads

    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    if RunDir(run_dir).is_run():
        shutil.rmtree(run_dir)  # the demo's own folder: a fresh run each time
    text_path, excerpt = text_source()
    cfg = from_mapping(demo_config(text_path, steps=steps, excerpt=excerpt), source="qkv demo")
    metrics = train_run(cfg, run_dir, device=torch.device("cpu"), progress=progress)
    cfg, model, tokenizer = load_run(run_dir)
    generator = torch.Generator().manual_seed(seed)
    d = cfg.decode
    sampling = SamplingConfig(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_k=d.top_k)
    new = generate_ids(model, [tokenizer.encode(PROMPT)], sampling, generator=generator)[0]
    sample = PROMPT + tokenizer.decode(new)
    ids = torch.tensor([tokenizer.encode(sample)[-cfg.model.block_size:]])
    last = cfg.model.n_layers - 1
    record = AttentionRecord(layers=[last])
    with torch.no_grad():
        model(ids, record=record)
    attention = record.weights["decoder"]  # {last: (B, H, T, T)}
    labels = [tokenizer.decode([i]) for i in ids[0].tolist()]
    head_picture = plot_head(attention[last][0, 0], labels, out_dir / "attention_head.png",
                             title=f"layer {last}, head 0: each character (row) attends to earlier ones")
    tail = slice(-32, None)  # every head of the last layer, over the last 32 characters
    weights = attention[last][0][:, tail, tail]  # (H, 32, 32)
    grid = plot_heads(weights, labels[tail], labels[tail], out_dir / "attention_heads.png",
                      title=f"layer {last}: the {cfg.model.n_heads} heads attend differently")
    records, _ = read_metrics(RunDir(run_dir).metrics)
    curve = plot_curves(records, out_dir / "loss_curve.png", title="character-level GPT on Shakespeare")
    return {"retrieval": retrieval_example(), "text": str(text_path), "excerpt": excerpt, "metrics": metrics,
            "sample": sample, "pictures": [head_picture, grid, curve], "run_dir": run_dir}
