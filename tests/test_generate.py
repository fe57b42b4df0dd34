"""Sampling from decoder-only models: filters, cached == uncached, batched == alone, sliding window, perplexity."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qkv.generate import (
    SamplingConfig,
    generate,
    generate_ids,
    perplexity_on_ids,
    sample_next,
    sliding_windows,
    top_k_filter,
    top_p_filter,
)
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig

V = 20
PROMPTS = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8, 9], [11, 12]]
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)


def tiny_model(positional: str = "learned", *, block_size: int = 32, dropout: float = 0.0, seed: int = 0,
               **overrides) -> DecoderOnly:
    """d_model 32, 2 layers, with weights large enough that greedy output is varied, not one repeated token."""
    torch.manual_seed(seed)
    cfg = DecoderOnlyConfig(vocab_size=V, block_size=block_size, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                            dropout=dropout, positional=positional, **overrides)
    model = DecoderOnly(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def greedy_reference(model: DecoderOnly, prompt: list[int], n_new: int, stride: int = 1) -> list[int]:
    """Full recomputation with the documented context rule: a full context (block_size tokens) keeps
    its last block_size + 1 - stride tokens when the next one arrives."""
    bs, pad = model.cfg.block_size, model.cfg.pad_id
    history = (list(prompt) or [model.cfg.bos_id])[-bs:]
    n, out = len(history), []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([history[-n:]]))[0, -1]
            logits[pad] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            history.append(token)
            n = n + 1 if n + 1 <= bs else bs + 1 - stride
    return out


# --- sample_next -----------------------------------------------------------------------------------

def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, V)
    logits[0, :6] = 1.0  # ties: still exactly k survive
    filtered = top_k_filter(logits, 5)
    assert (torch.isfinite(filtered).sum(dim=-1) == 5).all()
    assert torch.equal(filtered[1:].argsort(dim=-1, descending=True)[:, :5],
                       logits[1:].argsort(dim=-1, descending=True)[:, :5])
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    allowed = logits.topk(3, dim=-1).indices
    for _ in range(50):
        ids = sample_next(logits, cfg, generator=g)
        assert (allowed == ids[:, None]).any(dim=-1).all()


@pytest.mark.parametrize("p, kept", [(1e-3, [0]), (0.5, [0]), (0.7, [0, 1]), (0.75, [0, 1]),
                                     (0.8, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([[0.0625, 0.5, 0.125, 0.25, 0.0625]])  # ranked: 1, 3, 2, then 0 and 4
    filtered = top_p_filter(probs.log(), p)
    rank = [1, 3, 2, 0, 4]
    assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == sorted(rank[i] for i in kept)


def test_top_p_sampling_frequencies():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log().expand(4000, 4)
    sampling = SamplingConfig(temperature=1.0, top_k=None, top_p=0.7)
    ids = sample_next(logits, sampling, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 2 / 3) < 0.03


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(20000, 3)
    ids = sample_next(logits, SamplingConfig(temperature=0.5, top_k=None), generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(counts, (logits[0] / 0.5).softmax(-1), atol=0.015)


def test_temperature_zero_is_argmax_and_uses_no_randomness():
    logits = torch.randn(5, V)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=0.0), generator=g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_sampling_is_seeded():
    logits = torch.randn(8, V)
    cfg = SamplingConfig(top_k=10, top_p=0.9, temperature=1.3)
    a = sample_next(logits, cfg, generator=torch.Generator().manual_seed(4))
    b = sample_next(logits, cfg, generator=torch.Generator().manual_seed(4))
    c = [sample_next(logits, cfg, generator=torch.Generator().manual_seed(s)) for s in range(5, 10)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, x) for x in c)


# --- generate ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_cached_equals_uncached(positional):
    model = tiny_model(positional)
    cached = generate_ids(model, PROMPTS, GREEDY)
    assert cached == generate_ids(model, PROMPTS, GREEDY, use_cache=False)
    assert cached[0] == greedy_reference(model, PROMPTS[0], GREEDY.max_new_tokens)
    assert len({tuple(row) for row in cached}) > 1  # not degenerate
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=8, stop_at_eos=False)
    a = generate_ids(model, PROMPTS, sampled, generator=torch.Generator().manual_seed(5))
    b = generate_ids(model, PROMPTS, sampled, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert a == b


@pytest.mark.parametrize("positional", ["learned", "rope", "sinusoidal", "alibi"])
def test_batched_equals_alone(positional):
    model = tiny_model(positional)
    batched = generate_ids(model, PROMPTS, GREEDY)
    assert batched == [generate_ids(model, [p], GREEDY)[0] for p in PROMPTS]


def test_stream_yields_one_entry_per_prompt_and_none_after_eos():
    model = tiny_model()
    free = generate_ids(model, PROMPTS, GREEDY)
    eos = free[1][2]  # make a token that row 1 generates at step 2 the EOS
    stopping = DecoderOnly(replace(model.cfg, eos_id=eos))
    stopping.load_state_dict(model.state_dict())
    stopping.eval()
    cfg = replace(GREEDY, stop_at_eos=True)
    steps = list(generate(stopping, PROMPTS, cfg))
    assert all(len(step) == len(PROMPTS) for step in steps)
    first = free[1].index(eos)
    assert [s[1] for s in steps[:first + 1]] == free[1][:first + 1]
    assert all(s[1] is None for s in steps[first + 1:])
    new = generate_ids(stopping, PROMPTS, cfg)
    for row, full in zip(new, free):
        assert row == (full[:full.index(eos)] if eos in full else full)
    assert generate_ids(stopping, PROMPTS, cfg, use_cache=False) == new


def test_max_new_tokens_respected():
    model = tiny_model()
    assert [len(r) for r in generate_ids(model, PROMPTS, replace(GREEDY, max_new_tokens=5))] == [5] * 4
    assert generate_ids(model, PROMPTS, replace(GREEDY, max_new_tokens=0)) == [[]] * 4
    assert list(generate(model, [[1, 2]], replace(GREEDY, max_new_tokens=0))) == []
    assert generate_ids(model, [], GREEDY) == []


def test_pad_is_never_generated():
    model = tiny_model()
    with torch.no_grad():
        model.output.weight[model.cfg.pad_id] *= 0
        model.output.weight[model.cfg.pad_id, 0] = 100.0  # PAD would win almost everywhere
    out = generate_ids(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=None, stop_at_eos=False),
                       generator=torch.Generator().manual_seed(0))
    assert all(model.cfg.pad_id not in row for row in out)


@pytest.mark.parametrize("positional", ["learned", "rope"])
@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_window_past_block_size(positional, stride):
    model = tiny_model(positional, block_size=8)
    cfg = replace(GREEDY, max_new_tokens=20, window_stride=stride)
    prompts = [[5, 6, 7, 8, 9], [4], [3, 4, 5, 6, 7, 8, 9, 10]]
    cached = generate_ids(model, prompts, cfg)
    assert cached == [greedy_reference(model, p, 20, stride) for p in prompts]
    assert cached == [generate_ids(model, [p], cfg)[0] for p in prompts]  # the window rule is per row
    uncached = generate_ids(model, prompts, cfg, use_cache=False)
    assert uncached == [greedy_reference(model, p, 20, stride=1) for p in prompts]
    if stride == 1:
        assert cached == uncached


def test_sampled_sliding_window_cached_equals_uncached_with_stride_one():
    model = tiny_model(block_size=8)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=None, window_stride=1, stop_at_eos=False)
    a = generate_ids(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(7))
    b = generate_ids(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert a == b


def test_long_prompt_keeps_its_tail_and_warns(caplog):
    model = tiny_model(block_size=8)
    long = list(range(3, 15))
    with caplog.at_level(logging.WARNING, logger="qkv.generate"):
        out = generate_ids(model, [long], GREEDY)
    assert "block_size=8" in caplog.text
    assert out == generate_ids(model, [long[-8:]], GREEDY)


def test_empty_prompt_starts_from_bos():
    model = tiny_model()
    assert generate_ids(model, [[], [4, 5]], GREEDY) == generate_ids(model, [[model.cfg.bos_id], [4, 5]], GREEDY)


def test_seeded_generation_and_training_mode_restored():
    model = tiny_model(dropout=0.3).train()
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=None, stop_at_eos=False)
    a = generate_ids(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(8))
    assert model.training
    b = generate_ids(model.eval(), PROMPTS, cfg, generator=torch.Generator().manual_seed(8))  # dropout was off
    c = generate_ids(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(9))
    assert a == b and a != c
    stream = generate(model.train(), PROMPTS, cfg)
    next(stream)
    assert model.training and torch.is_grad_enabled()  # nothing leaks between steps


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"window_stride": 0}, "window_stride"),
])
def test_bad_sampling_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)


def test_sampling_defaults_are_the_lm_presets():
    """SamplingConfig is also the lm task's ``decode:`` section: its defaults are configs/shakespeare-char.yaml's."""
    import yaml

    preset = yaml.safe_load((Path(__file__).parents[1] / "configs" / "shakespeare-char.yaml").read_text())["decode"]
    defaults = SamplingConfig()
    assert {k: getattr(defaults, k) for k in preset} == preset
    assert (defaults.top_p, defaults.stop_at_eos, defaults.window_stride) == (None, True, None)


def test_bad_generate_arguments():
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(model, [[1], [2, V]], GREEDY)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, "abc", GREEDY)
    with pytest.raises(ValueError, match="window_stride"):
        generate(model, [[1]], replace(GREEDY, window_stride=9))
    with pytest.raises(ValueError, match="generator"):
        generate(model, [[1]], GREEDY, generator=0)
    with pytest.raises(ValueError, match="cfg"):
        generate(model, [[1]], {"temperature": 0})
    with pytest.raises(ValueError, match="logits"):
        sample_next(torch.zeros(V), GREEDY)


# --- perplexity -------------------------------------------------------------------------------------

def test_sliding_windows_score_every_token_once():
    for n, bs, stride in [(2, 4, 2), (30, 8, 3), (33, 8, 8), (9, 8, 4), (50, 7, 1)]:
        windows = sliding_windows(n, bs, stride)
        scored = [t for b, e, new in windows for t in range(e + 1 - new, e + 1)]
        assert scored == list(range(1, n))
        assert all(e - b <= bs and 1 <= new <= e - b for b, e, new in windows)


def test_perplexity_single_window_matches_direct():
    model = tiny_model(block_size=16)
    ids = torch.randint(3, V, (12,)).tolist()
    with torch.no_grad():
        direct = F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]))
    result = perplexity_on_ids(model, ids)
    assert result["tokens"] == 11
    assert math.isclose(result["loss"], float(direct), rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(float(direct)), rel_tol=1e-5)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_perplexity_sliding_matches_token_by_token(stride):
    model = tiny_model(block_size=8)
    ids = torch.randint(3, V, (30,)).tolist()
    # the context each target gets under the documented rule: from its window's begin
    begin_of = {t: b for b, e, new in sliding_windows(len(ids), 8, stride) for t in range(e + 1 - new, e + 1)}
    with torch.no_grad():
        nll = [F.cross_entropy(model(torch.tensor([ids[begin_of[t]:t]]))[0, -1], torch.tensor(ids[t]))
               for t in range(1, len(ids))]
    result = perplexity_on_ids(model, ids, stride=stride, batch_size=2)
    assert result["tokens"] == 29
    assert math.isclose(result["loss"], float(sum(nll)) / 29, rel_tol=1e-5)
    if stride == 1:  # every token gets its full block_size context
        assert all(begin_of[t] == max(0, t - 8) for t in begin_of)


def test_perplexity_bad_arguments():
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        perplexity_on_ids(model, [1, 2, 3], block_size=9)
    with pytest.raises(ValueError, match="stride"):
        perplexity_on_ids(model, [1, 2, 3], stride=9)
    with pytest.raises(ValueError, match="ids"):
        perplexity_on_ids(model, [1])
    with pytest.raises(ValueError, match="ids"):
        perplexity_on_ids(model, [1, V])
