"""T5 relative position bias (Raffel et al. 2020, sec. 2.1) against Hugging Face's T5Attention."""

import dataclasses
from pathlib import Path

import pytest
import torch

from qkv.models.embedding import position_scheme
from qkv.positional import PositionScheme, T5RelativeBias, t5_bucket

transformers = pytest.importorskip("transformers")
from transformers import T5Config  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

HF_BUCKET = T5Attention._relative_position_bucket
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _distances() -> torch.Tensor:
    """Every distance from -300 to 300: the exact, the log-spaced and past max_distance=128."""
    return torch.arange(-300, 301)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20), (64, 256)])
def test_bucket_equals_hf(bidirectional, num_buckets, max_distance):
    n = _distances()
    ours = t5_bucket(n, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    hf = HF_BUCKET(n, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert ours.dtype == torch.long and torch.equal(ours, hf)
    assert ours.min() >= 0 and ours.max() == num_buckets - 1  # the last bucket is reached


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_equals_hf_on_query_key_grids(bidirectional):
    """Many (query, key) pairs, as compute_bias forms them: memory - query, shape (T, S)."""
    query = torch.randint(0, 1000, (40,))[:, None]
    key = torch.randint(0, 1000, (50,))[None, :]
    n = key - query  # (40, 50)
    assert torch.equal(t5_bucket(n, bidirectional=bidirectional), HF_BUCKET(n, bidirectional=bidirectional))


def test_bucket_by_hand():
    """32 buckets, 128 max: causal has 16 exact distances 0..15, then log bins up to 31."""
    n = torch.tensor([0, -1, -15, -16, -127, -128, -10_000, 5])
    assert t5_bucket(n, bidirectional=False).tolist() == [0, 1, 15, 16, 31, 31, 31, 0]  # the future -> 0
    # bidirectional: keys after the query take buckets 16..31, exact for 1..7
    assert t5_bucket(torch.tensor([0, -7, 7, 8, 200]), bidirectional=True).tolist() == [0, 7, 23, 24, 31]


def _hf_attention(*, is_decoder: bool) -> T5Attention:
    cfg = T5Config(d_model=32, num_heads=4, d_kv=8, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, is_decoder=is_decoder)
    torch.manual_seed(0)
    hf = T5Attention(cfg, has_relative_attention_bias=True)
    torch.nn.init.normal_(hf.relative_attention_bias.weight)
    return hf


def _ours_from(hf: T5Attention, *, bidirectional: bool) -> T5RelativeBias:
    ours = T5RelativeBias(4, bidirectional=bidirectional)
    ours.embedding.weight.data.copy_(hf.relative_attention_bias.weight.data)
    return ours


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("T, S", [(1, 1), (5, 5), (7, 3), (3, 200), (160, 160)])
def test_bias_equals_hf_compute_bias(is_decoder, T, S):
    hf = _hf_attention(is_decoder=is_decoder)
    ours = _ours_from(hf, bidirectional=not is_decoder)
    with torch.no_grad():
        expected = hf.compute_bias(T, S)  # (1, H, T, S)
        got = ours.bias(T, S, offset=0)
    assert expected.shape == (1, 4, T, S) and got.shape == (4, T, S)
    assert torch.equal(got, expected[0])


@pytest.mark.parametrize("S", [1, 9, 150])
def test_cached_decoder_step_gets_hf_last_rows(S):
    """A KV-cached step: one query at position S-1 over S keys is HF's last row, one new query
    or several (a chunk of 3), with HF's past_seen_tokens too."""
    hf = _hf_attention(is_decoder=True)
    ours = _ours_from(hf, bidirectional=False)
    with torch.no_grad():
        full = hf.compute_bias(S, S)[0]  # (H, S, S)
        assert torch.equal(ours.bias(1, S, offset=S - 1), full[:, -1:])
        if S >= 3:
            assert torch.equal(ours.bias(3, S, offset=S - 3), full[:, -3:])
            assert torch.equal(ours.bias(3, S, offset=S - 3), hf.compute_bias(3, S, past_seen_tokens=S - 3)[0])


def test_bias_is_learned_and_rotates_nothing():
    ours = T5RelativeBias(4, bidirectional=True)
    assert isinstance(ours, PositionScheme) and ours.embedding.weight.shape == (32, 4)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    assert ours.rotate(q, k, offset=0) == (q, k)
    ours.bias(5, 5, offset=0).sum().backward()
    grad = ours.embedding.weight.grad
    used = t5_bucket(torch.arange(5)[None, :] - torch.arange(5)[:, None], bidirectional=True).unique()
    assert grad[used].ne(0).all() and grad.abs().sum(dim=1).ne(0).sum() == len(used)  # only the used buckets


def test_bias_follows_the_weight_dtype_and_device():
    ours = T5RelativeBias(2, bidirectional=False).to(torch.float64)
    assert ours.bias(3, 4, offset=1).dtype == torch.float64


def test_position_scheme_builds_t5_per_direction():
    kw = dict(n_heads=4, head_dim=8, max_len=32)
    encoder, decoder = position_scheme("t5", causal=False, **kw), position_scheme("t5", causal=True, **kw)
    assert isinstance(encoder, T5RelativeBias) and encoder.bidirectional and encoder.n_heads == 4
    assert isinstance(decoder, T5RelativeBias) and not decoder.bidirectional
    assert (encoder.num_buckets, encoder.max_distance) == (32, 128)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=0, bidirectional=True), "n_heads"),
    (dict(n_heads=2, bidirectional=True, num_buckets=3), "num_buckets=3"),
    (dict(n_heads=2, bidirectional=False, num_buckets=1), "num_buckets=1"),
    (dict(n_heads=2, bidirectional=True, num_buckets=32, max_distance=8), "max_distance=8"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        T5RelativeBias(**kwargs)


# ---------------------------------------------------------------- end to end: a Transformer with positional="t5"


def _tiny_t5(seed: int = 0):
    from qkv.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(src_vocab_size=16, tgt_vocab_size=16, d_model=32, n_heads=4, d_ff=64,
                            n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, positional="t5", max_len=64)
    return Transformer(cfg)


def _copy_batch(B: int = 16, T: int = 8):
    """A reversal task: the output depends on position, so a position-blind model cannot learn it."""
    src = torch.randint(3, 16, (B, T), generator=torch.Generator().manual_seed(1))
    out = src.flip(1)
    bos, eos = torch.full((B, 1), 1), torch.full((B, 1), 2)
    return src, torch.cat([bos, out], dim=1), torch.cat([out, eos], dim=1)


def test_transformer_gets_one_t5_bias_per_stack_and_none_in_cross_attention():
    from qkv.layers import MultiHeadAttention

    model = _tiny_t5()
    assert model.positions is None  # no absolute positions added to the tokens
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            found[name] = module.position
    cross = [p for name, p in found.items() if name.startswith("decoder.") and "cross" in name]
    encoder = [p for name, p in found.items() if name.startswith("encoder.")]
    decoder = [p for name, p in found.items() if name.startswith("decoder.") and "cross" not in name]
    assert len(cross) == 2 and all(p is None for p in cross)
    assert len(encoder) == 2 and encoder[0] is encoder[1] and encoder[0].bidirectional  # shared, as in T5
    assert len(decoder) == 2 and decoder[0] is decoder[1] and not decoder[0].bidirectional
    assert isinstance(encoder[0], T5RelativeBias) and isinstance(decoder[0], T5RelativeBias)


def _train(model, steps: int = 40) -> list[float]:
    src, tgt_in, tgt_out = _copy_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        logits = model(src, tgt_in)  # (B, T+1, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_t5_transformer_trains_and_cached_greedy_equals_uncached():
    from qkv.decode import greedy_decode

    model = _tiny_t5()
    biases = [m for m in model.modules() if isinstance(m, T5RelativeBias)]
    before = [b.embedding.weight.detach().clone() for b in biases]
    losses = _train(model)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(b.embedding.weight, w) for b, w in zip(biases, before))  # the biases learn
    src = _copy_batch()[0][:6]
    cached = greedy_decode(model, src, max_len=12)
    assert cached == greedy_decode(model, src, max_len=12, use_cache=False)
    with torch.no_grad():  # biases large enough to decide every argmax: a wrong cached offset shows
        for b in biases:
            b.embedding.weight.normal_(0.0, 3.0)
    cached = greedy_decode(model, src, max_len=12)
    assert cached == greedy_decode(model, src, max_len=12, use_cache=False)


def test_t5_transformer_weights_round_trip(tmp_path):
    from qkv.checkpoint import load_weights, save_weights

    model = _tiny_t5(seed=0)
    _train(model, steps=3)
    save_weights(model, tmp_path / "model.safetensors")
    other = _tiny_t5(seed=1)
    load_weights(other, tmp_path / "model.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    src, tgt_in, _ = _copy_batch(4)
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(src, tgt_in), other(src, tgt_in))


def test_t5bias_preset_is_the_en_de_preset_with_t5_positions():
    from qkv.run import load_config

    t5, base = load_config(CONFIGS / "multi30k-t5bias.yaml"), load_config(CONFIGS / "multi30k-en-de.yaml")
    assert t5.model.positional == "t5" and base.model.positional == "rope"
    assert t5 == dataclasses.replace(base, model=dataclasses.replace(base.model, positional="t5"))


# ---------------------------------------------------------------- end to end: a GPT with a causal T5 bias


def _tiny_gpt_t5():
    from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig

    torch.manual_seed(0)
    cfg = DecoderOnlyConfig(vocab_size=20, block_size=32, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                            dropout=0.0, positional="t5")
    model = DecoderOnly(cfg)
    with torch.no_grad():  # weights large enough that greedy output is varied and the bias matters
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        for m in model.modules():
            if isinstance(m, T5RelativeBias):
                m.embedding.weight.normal_(0.0, 2.0)
    return model.eval()


def test_gpt_t5_cached_generation_equals_uncached_and_each_prompt_alone():
    from qkv.generate import SamplingConfig, generate_ids

    model = _tiny_gpt_t5()
    schemes = {id(m): m for m in model.modules() if isinstance(m, T5RelativeBias)}
    assert len(schemes) == 1 and not next(iter(schemes.values())).bidirectional
    prompts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8, 9], [11, 12]]  # left-padded together
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    cached = generate_ids(model, prompts, greedy)
    assert cached == generate_ids(model, prompts, greedy, use_cache=False)
    assert cached == [generate_ids(model, [p], greedy)[0] for p in prompts]
    assert len({tuple(row) for row in cached}) > 1  # not degenerate
