"""Synthetic sequence-to-sequence tasks (copy, reverse) and a small training loop for the studies.

The loop is not qkv.train's engine on purpose: the studies need the gradient norm of every step
with clipping off (the "exploding" measurement), which the engine does not report, and data
drawn fresh each step from a seeded generator. Models are built with the library's own
families (qkv.models.rnn_seq2seq, qkv.models.transformer) from one dict of sizes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from qkv.data.batching import collate_pairs
from qkv.decode import greedy_decode
from qkv.models.rnn_seq2seq import RNNSeq2Seq, RNNSeq2SeqConfig
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.schedules import multiplier
from qkv.tasks.translation import sequence_loss

PAD, BOS, EOS, N_SPECIAL = 0, 1, 2, 3


@dataclass(frozen=True)
class SyntheticTask:
    """Sequences of ``n_symbols`` random symbols, lengths ``min_len..max_len``; target = copy or reverse."""

    kind: str = "reverse"
    n_symbols: int = 20
    min_len: int = 10
    max_len: int = 200

    def __post_init__(self):
        if self.kind not in ("copy", "reverse"):
            raise ValueError(f"kind must be 'copy' or 'reverse', got {self.kind!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len} and {self.max_len}")

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + N_SPECIAL

    def pairs(self, n: int, gen: torch.Generator, length: int | None = None) -> list[tuple[list[int], list[int]]]:
        """n (source + EOS, target) pairs; every source has ``length`` symbols when given."""
        out = []
        for _ in range(n):
            L = length or int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=gen))
            x = (torch.randint(0, self.n_symbols, (L,), generator=gen) + N_SPECIAL).tolist()
            out.append((x + [EOS], x[::-1] if self.kind == "reverse" else list(x)))
        return out

    def batch(self, n: int, gen: torch.Generator, length: int | None = None) -> dict[str, torch.Tensor]:
        return collate_pairs(self.pairs(n, gen, length), pad_id=PAD, bos_id=BOS, eos_id=EOS)


def build_model(kind: str, vocab_size: int, size: dict) -> nn.Module:
    """kind "transformer" or "<cell>-<attention>" (e.g. "gru-none", "lstm-additive"); sizes from ``size``.

    size: d_model, n_heads, d_ff, n_layers (Transformer); d_embed, d_hidden, n_rnn_layers (RNN);
    dropout for both.
    """
    common = dict(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    if kind == "transformer":
        cfg = TransformerConfig(d_model=size["d_model"], n_heads=size["n_heads"], d_ff=size["d_ff"],
                                n_encoder_layers=size["n_layers"], n_decoder_layers=size["n_layers"],
                                dropout=size.get("dropout", 0.0), norm="rmsnorm", norm_first=True, positional="rope",
                                activation="gelu", share_embeddings=True, max_len=1024, **common)
        return Transformer(cfg)
    cell, attention = kind.split("-", 1)
    cfg = RNNSeq2SeqConfig(cell=cell, attention=attention, d_embed=size["d_embed"], d_hidden=size["d_hidden"],
                           n_encoder_layers=size.get("n_rnn_layers", 1), n_decoder_layers=size.get("n_rnn_layers", 1),
                           dropout=size.get("dropout", 0.0), share_embeddings=True, **common)
    return RNNSeq2Seq(cfg)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def grad_norm(model: nn.Module) -> float:
    """The global L2 norm of all gradients (what clip_grad_norm_ would clip)."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def train(model: nn.Module, task: SyntheticTask, *, steps: int, batch_size: int, lr: float, seed: int,
          warmup: int = 100, clip: float = 0.0) -> dict:
    """Adam with warm-up + cosine; returns losses, pre-clipping gradient norms, skipped steps, seconds."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    losses, norms, skipped = [], [], 0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * multiplier("cosine", step, warmup=warmup, total=steps, floor=0.05)
        batch = task.batch(batch_size, gen)
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        loss, _ = sequence_loss(logits, batch["tgt_out"], pad_id=PAD, label_smoothing=0.0)
        loss.backward()
        norm = grad_norm(model)
        norms.append(norm)
        if not (math.isfinite(norm) and math.isfinite(float(loss.detach()))):
            skipped += 1  # an exploded step: recorded, not applied
        else:
            if clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"losses": losses, "grad_norms": norms, "skipped": skipped, "seconds": time.perf_counter() - start}


def accuracy_by_length(model: nn.Module, task: SyntheticTask, lengths: list[int], *, n: int, seed: int,
                       batch_size: int = 50) -> dict[int, dict[str, float]]:
    """Greedy-decode ``n`` fresh sequences per length; token accuracy (position-wise, a missing or extra
    token counts as wrong, over max(len(hyp), len(ref))) and exact-match accuracy."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for L in lengths:
        correct = total = exact = 0
        for start in range(0, n, batch_size):
            pairs = task.pairs(min(batch_size, n - start), gen, length=L)
            src = torch.tensor([s for s, _ in pairs])  # (B, L+1): one length, no padding
            hyps = greedy_decode(model, src, max_len=L + 5)
            for hyp, (_, ref) in zip(hyps, pairs):
                correct += sum(h == r for h, r in zip(hyp, ref))
                total += max(len(hyp), len(ref))
                exact += hyp == ref
        out[L] = {"token_accuracy": correct / max(total, 1), "exact": exact / n}
    return out
