"""The foundation demo: attention as retrieval, then multi-head self-attention on a sentence."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qkv.attention import retrieve
from qkv.layers import MultiHeadAttention
from qkv.positional import sinusoidal_table
from qkv.viz import plot_heads

log = logging.getLogger(__name__)


def retrieval_example() -> dict:
    """One query against four keys: the similarities, the softmax weights and the output."""
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.7, 0.7, 0.0]])
    values = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [5.0, 5.0]])
    query = torch.tensor([2.0, 0.5, 0.0])
    found = retrieve(query, keys, values)
    return {"query": query, "keys": keys, "values": values, **found._asdict()}


def self_attention_weights(sentence: str, *, d_model: int = 64, n_heads: int = 4,
                           generator: torch.Generator | None = None) -> tuple[list[str], torch.Tensor]:
    """Weights (H, T, T) of a randomly initialised multi-head layer over word embeddings + sec. 3.5 PE."""
    words = sentence.split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w.lower() for w in words))}
    embedding = torch.randn(len(vocab), d_model, generator=generator)
    x = embedding[[vocab[w.lower()] for w in words]] + sinusoidal_table(len(words), d_model)  # (T, D)
    mha = MultiHeadAttention(d_model, n_heads)
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * d_model ** -0.5)
        _, weights = mha(x[None], return_weights=True)  # (1, H, T, T)
    return words, weights[0]


def run(out_dir: str | Path, *, seed: int = 0) -> dict:
    """Print-free: returns what it computed and the picture's path; the CLI reports it."""
    generator = torch.Generator().manual_seed(seed)
    example = retrieval_example()
    words, weights = self_attention_weights("the animal did not cross the street because it was too tired",
                                            generator=generator)
    picture = plot_heads(weights, words, words, Path(out_dir) / "attention_heads.png",
                         title="multi-head self-attention (random weights): rows attend to columns")
    return {"retrieval": example, "picture": picture}
