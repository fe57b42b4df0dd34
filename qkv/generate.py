"""Sampling from decoder-only models (qkv.models.decoder_only), and perplexity on a long token stream.

``generate`` streams: it yields, step by step, each prompt's new token, so a CLI can print text as
it comes; ``generate_ids`` collects the new tokens. Conventions:

- Prompts are lists of token ids. An empty prompt starts from ``model.cfg.bos_id``. A prompt
  longer than ``block_size`` keeps its last ``block_size`` tokens (a warning is logged).
- A batch of prompts is LEFT-padded with ``pad_id``; a key padding mask (B, 1, 1, S), True = real
  token, grows by one column per step, and absolute positions (B, T) count from 0 at each row's
  first real token, so every row sees exactly what it would see alone (RoPE and ALiBi are
  relative, column offsets cancel). Rows that finish leave the batch.
- PAD is never sampled (its logit is set to -inf). With ``stop_at_eos`` a row ends at EOS: the
  EOS is yielded, then None. ``generate_ids`` drops that EOS.
- KV cache: the prompts are prefilled in one forward, then each step feeds one token, O(S)
  attention. ``use_cache=False`` recomputes the whole context every step (the reference).
- Sliding window. The model never sees more than ``block_size`` tokens. Without a cache the
  context is the last ``block_size`` tokens, re-run every step (nanoGPT's crop). With a cache a
  row whose context is full (``block_size`` tokens) drops its oldest ``window_stride`` tokens
  when the next one arrives: its context becomes the last ``block_size + 1 - window_stride``
  tokens, re-prefilled into a fresh cache (positions from 0 again); then it grows one token per
  step until full again. ``window_stride=1`` re-prefills every step and equals the uncached crop
  token for token; a larger stride (default ``block_size // 4``) re-prefills once per stride
  steps and gives up some context for speed. The rule is per row, so a batch equals its rows
  generated alone at any length.
- Each forward runs in ``model.eval()`` under ``torch.inference_mode()``; the model's training
  mode is restored after each step, so an abandoned iterator leaves it as it was.
- Randomness comes only from ``generator`` (a ``torch.Generator`` on the model's device, or None
  for torch's global generator): the same seed gives the same tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qkv.config import check_ranges, ranged
from qkv.decode import inference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token: temperature, then top-k, then top-p (nucleus), then sample.

    The one dataclass for sampling settings: ``generate`` takes it and the lm task's ``decode:``
    section is it, so its defaults are the lm preset's (nanoGPT's sample.py: 500 tokens,
    temperature 0.8, top-k 200). ``temperature=1.0, top_k=None`` samples the model's own distribution.
    """

    max_new_tokens: int = ranged(500, ge=0)
    temperature: float = ranged(0.8, ge=0.0, note="0 = greedy")  # 0 = greedy (argmax)
    top_k: int | None = ranged(200, ge=1)   # keep the k most probable tokens (all when k >= V)
    top_p: float | None = ranged(None, gt=0.0, le=1.0)  # keep the smallest set with probability >= top_p
    stop_at_eos: bool = True
    window_stride: int | None = ranged(None, ge=1)  # dropped per re-prefill past block_size; None = block_size // 4

    def __post_init__(self):
        # typed checks for values given in Python (the CLI shows them as --flag messages), then the
        # fields' declared ranges (qkv.config.ranged: finite floats), which from_dict checks for a file
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.window_stride is not None and (not isinstance(self.window_stride, int) or self.window_stride < 1):
            raise ValueError(f"window_stride must be an int >= 1 or None, got {self.window_stride!r}")
        check_ranges(self)


# --- choosing one token ---------------------------------------------------------------------------

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties broken by ``topk``), -inf elsewhere. (B, V)."""
    k = min(k, logits.shape[-1])
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Holtzman et al. 2020, sec. 3.1: keep the smallest set of most probable tokens whose
    probability sums to >= p (at least one token), -inf elsewhere. (B, V)."""
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)  # (B, V) each
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= p  # the top token has before = 0 < p: always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, *, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Next-token logits (B, V) -> sampled ids (B,): softmax(logits / temperature) after the
    top-k and top-p filters; temperature 0 takes the argmax and uses no randomness."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor of shape (B, V), got {logits.dtype} {tuple(logits.shape)}")
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = top_p_filter(logits, cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


# --- generation -----------------------------------------------------------------------------------

def generate(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[list[int | None]]:
    """Stream new tokens: each step yields a list with one entry per prompt, its new token id or
    None once the row has finished. At most ``cfg.max_new_tokens`` steps; see the module docstring."""
    if not isinstance(cfg, SamplingConfig):
        raise ValueError(f"cfg must be a SamplingConfig, got {type(cfg).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    mcfg = model.cfg
    stride = max(1, mcfg.block_size // 4) if cfg.window_stride is None else cfg.window_stride
    if stride > mcfg.block_size:
        raise ValueError(f"window_stride={stride} exceeds the model's block_size={mcfg.block_size}")
    histories = _prepare_prompts(prompts, mcfg)
    window = _CachedWindow(model, stride) if use_cache else _UncachedWindow(model)
    return _stream(model, histories, cfg, window, generator)


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; without the EOS that ends a row)."""
    new: list[list[int]] = [[] for _ in prompts]
    eos_id = model.cfg.eos_id
    for step in generate(model, prompts, cfg, generator=generator, use_cache=use_cache):
        for row, token in zip(new, step):
            if token is not None and not (cfg.stop_at_eos and token == eos_id):
                row.append(token)
    return new


def _prepare_prompts(prompts: Sequence[Sequence[int]], mcfg) -> list[list[int]]:
    """Copies of the prompts as lists of ints: empty -> [bos], longer than block_size -> its tail."""
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    histories = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) or not isinstance(prompt, Sequence):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt) or [mcfg.bos_id]
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < mcfg.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has token id {bad[0]!r} outside [0, {mcfg.vocab_size})")
        if len(ids) > mcfg.block_size:
            logger.warning("prompts[%d] has %d tokens, more than block_size=%d; keeping the last %d",
                           i, len(ids), mcfg.block_size, mcfg.block_size)
            ids = ids[-mcfg.block_size:]
        histories.append(ids)
    return histories


@torch.inference_mode()
def _stream(model, histories: list[list[int]], cfg: SamplingConfig, window, generator) -> Iterator[list[int | None]]:
    """The sampling loop. ``rows`` are the indices of the prompts still generating, in batch order."""
    mcfg = model.cfg
    rows = list(range(len(histories)))
    if not rows or cfg.max_new_tokens == 0:
        return
    logits = window.start(histories)  # (B, V)
    # Padding is never generated, unless the pad token is also end or start of text (GPT-2: one
    # <|endoftext|> for all three), which a model must be able to say.
    block_pad = mcfg.vocab_size > 1 and mcfg.pad_id not in (mcfg.eos_id, mcfg.bos_id)
    for step in range(cfg.max_new_tokens):
        if block_pad:
            logits[:, mcfg.pad_id] = float("-inf")
        tokens = sample_next(logits, cfg, generator=generator)  # (B,)
        out: list[int | None] = [None] * len(histories)
        for r, token in zip(rows, tokens.tolist()):
            out[r] = token
            histories[r].append(token)
        yield out
        alive = [i for i, r in enumerate(rows) if not (cfg.stop_at_eos and out[r] == mcfg.eos_id)]
        if not alive or step == cfg.max_new_tokens - 1:
            return
        rows = [rows[i] for i in alive]
        logits = window.advance(alive, tokens, [histories[r] for r in rows])


class _UncachedWindow:
    """Recompute the last block_size tokens of every row at each step (nanoGPT's crop)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def start(self, histories: list[list[int]]) -> torch.Tensor:
        block_size = self.model.cfg.block_size
        ids, positions, mask = _left_pad([h[-block_size:] for h in histories], self.model)
        return _last_logits(self.model, ids, positions=positions, mask=mask, cache=None)

    def advance(self, alive: list[int], tokens: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        return self.start(histories)


class _CachedWindow:
    """A KV cache over the active rows, left-padded to the longest context; ``lengths`` counts each
    row's real tokens in it. Past block_size a row's context shrinks by ``stride`` and is re-prefilled."""

    def __init__(self, model: nn.Module, stride: int):
        self.model, self.stride = model, stride

    def start(self, contexts: list[list[int]]) -> torch.Tensor:
        ids, positions, self.mask = _left_pad(contexts, self.model)
        self.lengths = [len(c) for c in contexts]
        self.width = ids.shape[1]
        self.cache = self.model.new_cache()
        return _last_logits(self.model, ids, positions=positions, mask=self.mask, cache=self.cache)

    def advance(self, alive: list[int], tokens: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """Feed each surviving row's newest token (the last of its history); logits (B_alive, V)."""
        block_size = self.model.cfg.block_size
        if len(alive) < len(self.lengths):
            index = torch.tensor(alive, device=tokens.device)
            for layer_cache in self.cache:
                layer_cache.reorder(index)
            self.mask = self.mask.index_select(0, index) if self.mask is not None else None
            self.lengths = [self.lengths[i] for i in alive]
            tokens = tokens.index_select(0, index)
        if self.width + 1 > block_size:
            kept = [n + 1 if n + 1 <= block_size else block_size + 1 - self.stride for n in self.lengths]
            return self.start([h[-n:] for n, h in zip(kept, histories)])
        positions = torch.tensor(self.lengths, device=tokens.device)[:, None]  # (B, 1)
        if self.mask is not None:
            self.mask = F.pad(self.mask, (0, 1), value=True)  # (B, 1, 1, S + 1)
        self.lengths = [n + 1 for n in self.lengths]
        self.width += 1
        return _last_logits(self.model, tokens[:, None], positions=positions, mask=self.mask, cache=self.cache)


def _left_pad(contexts: list[list[int]], model: nn.Module):
    """ids (B, S) left-padded with pad_id, positions (B, S) from 0 at each row's first real token
    (0 on padding), and the key padding mask (B, 1, 1, S), or None when no row is padded."""
    device = next(model.parameters()).device
    S = max(len(c) for c in contexts)
    ids = torch.tensor([[model.cfg.pad_id] * (S - len(c)) + c for c in contexts], device=device)  # (B, S)
    pads = torch.tensor([S - len(c) for c in contexts], device=device)[:, None]  # (B, 1)
    columns = torch.arange(S, device=device)[None, :]  # (1, S)
    positions = (columns - pads).clamp(min=0)  # (B, S)
    padded = any(len(c) < S for c in contexts)
    mask = (columns >= pads)[:, None, None, :] if padded else None  # (B, 1, 1, S)
    return ids, positions, mask


def _last_logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's next-token logits at the last column, (B, V), computed in eval mode."""
    if not model.training:
        return model(ids, **kwargs)[:, -1]
    model.eval()
    try:
        return model(ids, **kwargs)[:, -1]
    finally:
        model.train()


# --- perplexity -----------------------------------------------------------------------------------

def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, n_new) over a stream of n_tokens: the inputs ids[begin:end] predict
    ids[begin+1:end+1], of which the last n_new are scored. Every token but the first is scored once."""
    windows, begin, scored_to = [], 0, 0
    while scored_to < n_tokens - 1:
        end = min(begin + block_size, n_tokens - 1)
        windows.append((begin, end, end - scored_to))
        scored_to, begin = end, begin + stride
    return windows


def perplexity_on_ids(model: nn.Module, ids: Sequence[int], *, block_size: int | None = None,
                      stride: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss (nats/token) of a long token stream, scored with sliding windows.

    HF's "perplexity of fixed-length models": windows of ``block_size`` inputs (default the model's)
    start every ``stride`` tokens (default ``block_size // 2``); each window scores only the tokens
    not scored before, so every token after the first is scored exactly once, with at least
    ``block_size - stride`` tokens of context once the first window is past. ``stride=1`` gives
    every token the full context (slow); ``stride=block_size`` is non-overlapping chunks (fast, less
    context). Returns {"loss", "tokens" (the number scored, len(ids) - 1), "perplexity": exp(loss)}.
    """
    mcfg = model.cfg
    block_size = mcfg.block_size if block_size is None else block_size
    if not isinstance(block_size, int) or not 1 <= block_size <= mcfg.block_size:
        raise ValueError(f"block_size must be in [1, {mcfg.block_size}] (the model's), got {block_size!r}")
    stride = max(1, block_size // 2) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = list(ids)
    if len(ids) < 2:
        raise ValueError(f"ids must hold at least 2 tokens to score one, got {len(ids)}")
    if any(not isinstance(t, int) or not 0 <= t < mcfg.vocab_size for t in ids):
        raise ValueError(f"ids must be ints in [0, {mcfg.vocab_size})")
    windows = sliding_windows(len(ids), block_size, stride)
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_length.setdefault(w[1] - w[0], []).append(w)
    total = 0.0
    with inference(model):
        data = torch.tensor(ids, device=next(model.parameters()).device)
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                total += _windows_nll(model, data, group[i:i + batch_size])
    n = len(ids) - 1
    return {"loss": total / n, "tokens": n, "perplexity": math.exp(total / n)}


def _windows_nll(model: nn.Module, data: torch.Tensor, windows: list[tuple[int, int, int]]) -> float:
    """Summed NLL of the new tokens of equal-length windows, run as one batch."""
    inputs = torch.stack([data[b:e] for b, e, _ in windows])  # (B, T)
    targets = torch.stack([data[b + 1:e + 1] for b, e, _ in windows])  # (B, T)
    logits = model(inputs)  # (B, T, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    return sum(float(nll[i, nll.shape[1] - new:].sum()) for i, (_, _, new) in enumerate(windows))
