"""Decoding for encoder-decoder models (any ``Seq2Seq``): greedy search, beam search, translate.

Sec. 6.1: "we used beam search with a beam size of 4 and length penalty alpha = 0.6 [GNMT] ...
We set the maximum output length during inference to input length + 50, but terminate early
when possible." Those are the defaults here. Decoder-only models get their own sampling.

Conventions shared by every function below:

- The model is read only through the ``Seq2Seq`` protocol below (house style rule 20): its
  special ids, its length limits, ``encode``, ``decode`` and ``new_cache``; never its config.
- Source ids (B, S) are a sentence's tokens followed by EOS, right-padded with ``model.pad_id``;
  no BOS. ``translate`` builds them that way; the translation task uses the same convention.
- The decoder starts from BOS. Returned hypotheses are plain ``list[int]``, without BOS or EOS.
- PAD and BOS are never generated: their log-probabilities are set to -inf after the softmax.
- Output length: at most ``max_len`` tokens (EOS not counted) when given, else
  ``int(max_len_a * src_len + max_len_b)`` per sentence as in fairseq, where ``src_len`` counts
  the source tokens that are neither padding nor EOS; the default a=1, b=50 is the paper's
  "input length + 50". When ``model.max_target_len`` is not None (learned positions) the limit is
  also capped at ``max_target_len - 1`` (the decoder input holds BOS too). A source longer than
  ``model.max_source_len`` is an error.
  A sentence that reaches its limit ends there (beam search scores it with a forced EOS).
- Scores are log-probabilities in float32 (float64 for a float64 model), whatever the model dtype.
- Decoding runs in ``model.eval()`` under ``torch.inference_mode()``; the training mode is restored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from qkv import progress
from qkv.errors import DataError
from qkv.record import AttentionRecord


@runtime_checkable
class DecoderCache(Protocol):
    """A decoder's incremental state (qkv.layers.StackCache, qkv.models.rnn_seq2seq.RecurrentState)."""

    @property
    def length(self) -> int:
        """Target positions decoded so far."""
        ...

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (N,) long, in that order (beam search follows its survivors)."""
        ...


@runtime_checkable
class Seq2Seq(Protocol):
    """What decoding needs from an encoder-decoder model (qkv.models.transformer, qkv.models.rnn_seq2seq).

    Besides these, an ``nn.Module``'s ``training``, ``train``, ``eval`` and ``parameters``.
    """

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def max_source_len(self) -> int | None:
        """The longest encoder input (EOS included), or None for unbounded."""
        ...

    @property
    def max_target_len(self) -> int | None:
        """The longest decoder input (BOS included), or None for unbounded."""
        ...

    def encode(self, src: torch.Tensor, *, record: AttentionRecord | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory (B, S, D), src_mask (B, 1, 1, S) bool, True = real token."""
        ...

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, *,
               cache: DecoderCache | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """tgt (B, T) from BOS -> logits (B, T, V); with ``cache`` only the new positions are given."""
        ...

    def new_cache(self) -> DecoderCache: ...


class Tokenizer(Protocol):
    """What ``translate`` needs from a tokenizer (qkv.data.tokenizer provides it)."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Hypothesis(NamedTuple):
    """A finished beam hypothesis: token ids (no BOS/EOS) and its length-normalised score."""

    tokens: list[int]
    score: float


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and torch.inference_mode for the block; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT (Wu et al. 2016, Eq. 14), used in sec. 6.1: lp(Y) = ((5 + |Y|) / 6) ** alpha.

    |Y| counts the scored tokens, EOS included. alpha=0 gives the raw sum of log-probabilities.
    """
    return ((5.0 + length) / 6.0) ** alpha


def _check_model(model: Seq2Seq) -> None:
    if not isinstance(model, Seq2Seq):
        missing = [name for name in ("pad_id", "bos_id", "eos_id", "max_source_len", "max_target_len", "encode",
                                     "decode", "new_cache") if not hasattr(model, name)]
        raise ValueError(f"{type(model).__name__} is not a Seq2Seq model (qkv.decode): it lacks {', '.join(missing)}")


def _check_src(model: Seq2Seq, src: torch.Tensor) -> None:
    _check_model(model)
    if src.dim() != 2:
        raise ValueError(f"src must have shape (B, S), got {tuple(src.shape)}")
    if src.is_floating_point() or src.dtype == torch.bool:
        raise ValueError(f"src must hold integer token ids, got dtype {src.dtype}")
    limit = model.max_source_len
    if limit is not None and src.shape[1] > limit:
        raise ValueError(f"src has {src.shape[1]} positions, more than the model's max_source_len={limit}")


def _length_limits(model: Seq2Seq, src: torch.Tensor, max_len: int | None, max_len_a: float,
                   max_len_b: int) -> torch.Tensor:
    """Most output tokens (EOS not counted) per sentence, (B,) long, on src's device."""
    if max_len is not None:
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        limits = torch.full((src.shape[0],), max_len, dtype=torch.long, device=src.device)
    else:
        src_len = ((src != model.pad_id) & (src != model.eos_id)).sum(dim=1)  # (B,)
        limits = (max_len_a * src_len + max_len_b).long().clamp(min=0)
    if model.max_target_len is not None:  # decoder inputs BOS y_1 .. y_n: n <= max_target_len - 1
        limits = limits.clamp(max=model.max_target_len - 1)
    return limits


def _next_log_probs(model: Seq2Seq, tokens: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
                    cache: DecoderCache | None) -> torch.Tensor:
    """log p(next token | tokens, src) (N, V) for tokens (N, t+1) that start with BOS.

    With a cache only the newest token is fed; without one the whole prefix is recomputed.
    """
    inputs = tokens[:, -1:] if cache is not None else tokens  # (N, 1) or (N, t+1)
    logits = model.decode(inputs, memory, src_mask, cache=cache)[:, -1]  # (N, V)
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
    log_probs[:, [model.pad_id, model.bos_id]] = float("-inf")
    return log_probs


def _strip(tokens: torch.Tensor, eos_id: int, pad_id: int) -> list[list[int]]:
    """(N, T) generated ids -> one list per row, cut at the first EOS or PAD."""
    out = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in (eos_id, pad_id)), len(row))
        out.append(row[:end])
    return out


def greedy_decode(model: Seq2Seq, src: torch.Tensor, *, max_len: int | None = None, max_len_a: float = 1.0,
                  max_len_b: int = 50, use_cache: bool = True) -> list[list[int]]:
    """Pick the most probable token at each step; src (B, S) -> B lists of ids (no BOS/EOS).

    The encoder runs once. With ``use_cache`` each step feeds only the new token and reuses the
    decoder's keys/values; ``use_cache=False`` recomputes the prefix (the reference for tests).
    A sentence stops at EOS or at its length limit; the loop stops when every sentence has.
    """
    _check_src(model, src)
    with inference(model):
        memory, src_mask = model.encode(src)  # (B, S, D), (B, 1, 1, S)
        limits = _length_limits(model, src, max_len, max_len_a, max_len_b)  # (B,)
        tokens = src.new_full((src.shape[0], 1), model.bos_id)  # (B, 1)
        finished = limits == 0  # (B,)
        cache = model.new_cache() if use_cache else None
        step = 0
        while not bool(finished.all()):
            next_token = _next_log_probs(model, tokens, memory, src_mask, cache).argmax(dim=-1)  # (B,)
            next_token = next_token.masked_fill(finished, model.pad_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, t+2)
            step += 1
            finished |= (next_token == model.eos_id) | (step >= limits)
        return _strip(tokens[:, 1:], model.eos_id, model.pad_id)


def _candidates(log_probs: torch.Tensor, scores: torch.Tensor, force_eos: torch.Tensor, eos_id: int):
    """Each sentence's best 2K one-token extensions of its K hypotheses (overwrites ``log_probs``).

    log_probs (B*K, V), scores (B, K) running sums, force_eos (B,) sentences at their length limit.
    Returns scores, beam index, token, each (B, 2K), best first. At most K of them end in EOS
    (one per beam), so at least K candidates can continue.
    """
    B, K = scores.shape
    V = log_probs.shape[-1]
    total = log_probs.view(B, K, V)  # (B, K, V)
    if bool(force_eos.any()):  # rare: only at a sentence's length limit
        not_eos = torch.ones(V, dtype=torch.bool, device=log_probs.device)
        not_eos[eos_id] = False
        total = total.masked_fill(force_eos[:, None, None] & not_eos, float("-inf"))
    total = total.add_(scores[:, :, None])  # in place (the step's log_probs are not used again): (B, K, V)
    # = log p(prefix) + log p(token | prefix)
    top, flat = total.view(B, K * V).topk(min(2 * K, K * V), dim=1)  # (B, 2K)
    return top, flat // V, flat % V


def _finalize(finished: list[list[Hypothesis]], top, beam, token, tokens, done, eos_id: int,
              length_penalty: float) -> None:
    """Move candidates that end in EOS and rank among their sentence's top K into ``finished``.

    fairseq's rule: an EOS candidate below the K-th best is discarded, and a sentence takes at
    most K finished hypotheses. All candidates of one step have the same length, so taking them
    best-raw-score first is also best-normalised first.
    """
    B = top.shape[0]
    K = tokens.shape[0] // B
    ends = (token[:, :K] == eos_id) & torch.isfinite(top[:, :K]) & ~done[:, None]  # (B, K)
    events = ends.nonzero().tolist()
    if not events:
        return
    raw, rows = top[:, :K].tolist(), (beam[:, :K] + K * torch.arange(B, device=beam.device)[:, None]).tolist()
    n_tokens = tokens.shape[1] - 1  # without BOS; + 1 for the EOS in the penalty
    lp = length_penalty_factor(n_tokens + 1, length_penalty)
    for b, j in events:
        if len(finished[b]) < K:
            finished[b].append(Hypothesis(tokens[rows[b][j], 1:].tolist(), raw[b][j] / lp))


def _select_alive(top, beam, token, eos_id: int, K: int):
    """The K best candidates that do not end in EOS: scores, beam index, token, each (B, K)."""
    n = top.shape[1]
    order = torch.arange(n, device=top.device).expand_as(top)  # (B, 2K)
    rank = torch.where(token == eos_id, order + n, order)  # EOS candidates sort last
    keep = rank.topk(K, dim=1, largest=False).indices  # (B, K), ascending rank
    top, beam, token = top.gather(1, keep), beam.gather(1, keep), token.gather(1, keep)
    return top.masked_fill(token == eos_id, float("-inf")), beam, token  # only with a tiny vocabulary


def beam_search_nbest(model: Seq2Seq, src: torch.Tensor, *, beam_size: int = 4, length_penalty: float = 0.6,
                      n_best: int | None = None, max_len: int | None = None, max_len_a: float = 1.0,
                      max_len_b: int = 50, use_cache: bool = True) -> list[list[Hypothesis]]:
    """Beam search (sec. 6.1) batched over sentences; src (B, S) -> B lists of ``n_best`` hypotheses.

    Rows b*K .. b*K+K-1 hold sentence b's K = ``beam_size`` hypotheses. The encoder runs once
    and its output is repeated per beam before the first step, so the static cross-attention
    caches are filled once; ``cache.reorder`` makes the decoder's state follow the surviving
    hypotheses.
    Score = sum of log-probs (EOS included) / lp(|Y|), lp from GNMT (``length_penalty_factor``).
    Stopping is fairseq's rule: a sentence is done once K hypotheses have finished (an EOS among
    its K best candidates of a step), or at its length limit, where EOS is forced. The search
    stops when every sentence is done. Hypotheses are returned best first.
    """
    _check_src(model, src)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    n_best = beam_size if n_best is None else n_best
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    with inference(model):
        finished = _beam_search(model, src, beam_size, length_penalty, max_len, max_len_a, max_len_b, use_cache)
    return [sorted(hyps, key=lambda h: -h.score)[:n_best] for hyps in finished]


def _beam_search(model: Seq2Seq, src, K, length_penalty, max_len, max_len_a, max_len_b,
                 use_cache) -> list[list[Hypothesis]]:
    B = src.shape[0]
    memory, src_mask = model.encode(src)  # (B, S, D), (B, 1, 1, S)
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, D)
    src_mask = src_mask.repeat_interleave(K, dim=0)  # (B*K, 1, 1, S)
    limits = _length_limits(model, src, max_len, max_len_a, max_len_b)  # (B,)
    tokens = src.new_full((B * K, 1), model.bos_id)  # (B*K, 1)
    scores = memory.new_full((B, K), float("-inf"), dtype=torch.promote_types(memory.dtype, torch.float32))
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    cache = model.new_cache() if use_cache else None
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for step in range(int(limits.max()) + 1 if B else 0):
        log_probs = _next_log_probs(model, tokens, memory, src_mask, cache)  # (B*K, V)
        force_eos = limits <= step  # (B,)
        top, beam, token = _candidates(log_probs, scores, force_eos, model.eos_id)  # (B, 2K) each
        _finalize(finished, top, beam, token, tokens, done, model.eos_id, length_penalty)
        done = done | force_eos | torch.tensor([len(h) >= K for h in finished], device=done.device)
        if bool(done.all()):
            break
        scores, beam, token = _select_alive(top, beam, token, model.eos_id, K)  # (B, K) each
        rows = (beam + K * torch.arange(B, device=beam.device)[:, None]).view(-1)  # (B*K,) previous rows
        tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)  # (B*K, t+2)
        if cache is not None:
            cache.reorder(rows)
    assert all(finished), "every sentence ends with at least one hypothesis (EOS is forced at the limit)"
    return finished


def beam_search(model: Seq2Seq, src: torch.Tensor, *, beam_size: int = 4, length_penalty: float = 0.6,
                max_len: int | None = None, max_len_a: float = 1.0, max_len_b: int = 50,
                use_cache: bool = True) -> list[list[int]]:
    """Beam search (sec. 6.1: beam 4, alpha 0.6); src (B, S) -> the best hypothesis per sentence.

    See ``beam_search_nbest`` for the algorithm and the scores.
    """
    nbest = beam_search_nbest(model, src, beam_size=beam_size, length_penalty=length_penalty, n_best=1,
                              max_len=max_len, max_len_a=max_len_a, max_len_b=max_len_b, use_cache=use_cache)
    return [hyps[0].tokens for hyps in nbest]


def sequence_scores(model: Seq2Seq, src: torch.Tensor, hyps: Sequence[Sequence[int]], *,
                    length_penalty: float = 0.6) -> list[float]:
    """What beam search maximises, by teacher forcing: sum log p(y_1 .. y_n, EOS | x) / lp(n + 1).

    src (B, S) and B hypotheses (ids without BOS/EOS). Lets tests and rerankers compare decoders.
    """
    _check_src(model, src)
    if len(hyps) != src.shape[0]:
        raise ValueError(f"got {len(hyps)} hypotheses for {src.shape[0]} source sentences")
    T = max(len(h) for h in hyps) + 1
    tgt = src.new_full((len(hyps), T + 1), model.pad_id)  # (B, T+1): BOS y_1 .. y_n EOS PAD ..
    for i, h in enumerate(hyps):
        tgt[i, : len(h) + 2] = torch.tensor([model.bos_id, *h, model.eos_id])
    with inference(model):
        memory, src_mask = model.encode(src)
        logits = model.decode(tgt[:, :-1], memory, src_mask)  # (B, T, V)
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
        picked = log_probs.gather(2, tgt[:, 1:, None]).squeeze(2)  # (B, T)
        picked = picked.masked_fill(tgt[:, 1:] == model.pad_id, 0.0)
        return [float(s) / length_penalty_factor(len(h) + 1, length_penalty) for s, h in zip(picked.sum(1), hyps)]


def _check_tokenizers(model: Seq2Seq, src_tok: Tokenizer, tgt_tok: Tokenizer) -> None:
    wanted = [("source", src_tok, "pad_id"), ("source", src_tok, "eos_id"),
              ("target", tgt_tok, "pad_id"), ("target", tgt_tok, "bos_id"), ("target", tgt_tok, "eos_id")]
    for side, tok, name in wanted:
        if getattr(tok, name) != getattr(model, name):
            raise ValueError(f"{side} tokenizer has {name}={getattr(tok, name)} but the model has "
                             f"{name}={getattr(model, name)}; decode with the tokenizers the model was trained with")


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped longest first, so each batch holds similar lengths and little padding.

    A batch has at most ``batch_size`` sentences and, when given, at most ``max_tokens`` source
    positions counting padding (a longer sentence goes alone).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            widest = lengths[batch[0]]  # sorted: the first is the longest
            if len(batch) < batch_size and (max_tokens is None or (len(batch) + 1) * widest <= max_tokens):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def _check_source_lengths(limit: int | None, ids: list[list[int]], names: Sequence[str] | None) -> None:
    if limit is None:
        return
    for i, x in enumerate(ids):
        if len(x) > limit:
            where = names[i] if names is not None else f"sentence {i + 1}"
            raise DataError(f"{where}: {len(x)} tokens (with EOS), more than the model's max_source_len={limit} "
                            f"(its learned positions); shorten or split the line")


def translate(model: Seq2Seq, src_tok: Tokenizer, tgt_tok: Tokenizer, sentences: Sequence[str], *,
              beam_size: int = 4, length_penalty: float = 0.6, batch_size: int = 64, max_tokens: int | None = None,
              max_len_a: float = 1.0, max_len_b: int = 50, device: torch.device | str | None = None,
              names: Sequence[str] | None = None) -> list[str]:
    """Translate sentences: tokenize (tokens + EOS), batch by length, decode, restore order, detokenize.

    beam_size=1 runs ``greedy_decode`` (identical output, less work), otherwise ``beam_search``.
    ``device`` is where the source ids go, by default the model's own. ``names`` (e.g.
    ``"input.txt:7"``) name the sentences in errors: a sentence longer than ``model.max_source_len``
    (a learned position table; sinusoidal, RoPE and ALiBi positions extend to any length) is an error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_model(model)
    _check_tokenizers(model, src_tok, tgt_tok)
    device = next(model.parameters()).device if device is None else torch.device(device)
    ids = [src_tok.encode(s) + [src_tok.eos_id] for s in sentences]
    _check_source_lengths(model.max_source_len, ids, names)
    out: list[str] = [""] * len(ids)
    progress.expect(len(ids))  # qkv evaluate's progress line (a no-op when none is active)
    for batch in _batches([len(x) for x in ids], batch_size, max_tokens):
        src = torch.full((len(batch), len(ids[batch[0]])), src_tok.pad_id, dtype=torch.long)  # (B, S)
        for row, i in enumerate(batch):
            src[row, : len(ids[i])] = torch.tensor(ids[i])
        src = src.to(device)
        if beam_size == 1:
            hyps = greedy_decode(model, src, max_len_a=max_len_a, max_len_b=max_len_b)
        else:
            hyps = beam_search(model, src, beam_size=beam_size, length_penalty=length_penalty,
                               max_len_a=max_len_a, max_len_b=max_len_b)
        for i, h in zip(batch, hyps):
            out[i] = tgt_tok.decode(h)
        progress.tick(len(batch))
    return out
