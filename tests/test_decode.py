"""Decoding: cached == uncached, beam 1 == greedy, batched == one at a time, beam beats greedy."""

import math

import pytest
import torch
from torch import nn

from qkv.decode import (
    DecoderCache,
    Seq2Seq,
    beam_search,
    beam_search_nbest,
    greedy_decode,
    length_penalty_factor,
    sequence_scores,
    translate,
)
from qkv.errors import DataError
from qkv.masks import padding_mask
from qkv.models.transformer import Transformer, TransformerConfig

PAD, BOS, EOS = 0, 1, 2
V = 12  # 3 specials + 9 words


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=32, n_heads=4, d_ff=64,
                            n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, max_len=64, **overrides)
    return Transformer(cfg)


def never_eos(model: Transformer) -> Transformer:
    """Make EOS impossible, so that only the length limit can end a sentence."""
    decode = model.decode

    def decode_without_eos(*args, **kwargs):
        logits = decode(*args, **kwargs)
        logits[..., EOS] = -1e4
        return logits

    model.decode = decode_without_eos
    return model


def random_src(B: int, *, generator: torch.Generator, min_len: int = 2, max_len: int = 7) -> torch.Tensor:
    """(B, S) word ids + EOS, right-padded, lengths min_len..max_len (words only)."""
    lengths = torch.randint(min_len, max_len + 1, (B,), generator=generator)
    src = torch.full((B, int(lengths.max()) + 1), PAD)
    for i, n in enumerate(lengths.tolist()):
        src[i, :n] = torch.randint(3, V, (n,), generator=generator)
        src[i, n] = EOS
    return src


def copy_batch(B: int, generator: torch.Generator):
    src = random_src(B, generator=generator)
    tgt = torch.full((B, src.shape[1] + 1), PAD)  # BOS + words + EOS
    tgt[:, 0] = BOS
    tgt[:, 1:] = src
    return src, tgt


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A copy-task model trained for a few seconds: it copies most sentences and emits EOS."""
    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains many times faster on one thread than on a busy two
    try:
        for _ in range(150):
            src, tgt = copy_batch(32, g)
            logits = model(src, tgt[:, :-1])  # (B, T, V)
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), tgt[:, 1:].reshape(-1), ignore_index=PAD)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model


def strip_src(src: torch.Tensor) -> list[list[int]]:
    return [[t for t in row if t not in (PAD, EOS)] for row in src.tolist()]


# --- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True, "positional": "rope"}, {"positional": "learned"}])
def test_greedy_cached_equals_uncached(overrides):
    model = tiny_model(**overrides)
    src = random_src(5, generator=torch.Generator().manual_seed(0))
    cached = greedy_decode(model, src, max_len=15)
    assert cached == greedy_decode(model, src, max_len=15, use_cache=False)
    assert all(len(h) <= 15 for h in cached)


def test_greedy_copies_on_trained_model(trained):
    src = random_src(16, generator=torch.Generator().manual_seed(2))
    hyps = greedy_decode(trained, src)
    assert hyps == greedy_decode(trained, src, use_cache=False)
    assert sum(h == ref for h, ref in zip(hyps, strip_src(src))) >= 12  # copied: no BOS, EOS or PAD in the output
    assert all(PAD not in h and BOS not in h and EOS not in h for h in hyps)


def test_greedy_limits():
    model = never_eos(tiny_model())
    src = random_src(6, generator=torch.Generator().manual_seed(3))
    n_words = [len(s) for s in strip_src(src)]
    assert greedy_decode(model, src, max_len=0) == [[]] * 6
    assert [len(h) for h in greedy_decode(model, src, max_len_a=1.0, max_len_b=2)] == [n + 2 for n in n_words]
    assert [len(h) for h in greedy_decode(model, src, max_len_a=0.0, max_len_b=3)] == [3] * 6


def test_learned_positions_cap_the_length():
    model = never_eos(tiny_model(positional="learned"))  # 64 positions: BOS + at most 63 tokens
    src = random_src(2, generator=torch.Generator().manual_seed(4))
    assert [len(h) for h in greedy_decode(model, src, max_len=500)] == [63, 63]
    assert [len(h) for h in beam_search(model, src, beam_size=2, max_len=500)] == [63, 63]


def test_decoding_restores_training_mode(trained):
    trained.train()
    src = random_src(2, generator=torch.Generator().manual_seed(5))
    greedy_decode(trained, src)
    assert trained.training
    trained.eval()
    beam_search(trained, src)
    assert not trained.training


def test_batched_greedy_equals_one_at_a_time(trained):
    src = random_src(6, generator=torch.Generator().manual_seed(6))
    one_by_one = [greedy_decode(trained, row[None, : int((row != PAD).sum())])[0] for row in src]
    assert greedy_decode(trained, src) == one_by_one


def test_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        greedy_decode(model, torch.tensor([3, 4, EOS]))
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, torch.tensor([[3, 4, EOS]]), beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, torch.tensor([[3, 4, EOS]]), max_len=-1)


# --- beam search --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy_random_model(seed):
    model = tiny_model(seed=seed)
    src = random_src(6, generator=torch.Generator().manual_seed(seed))
    assert beam_search(model, src, beam_size=1, max_len=12) == greedy_decode(model, src, max_len=12)


def test_beam_one_equals_greedy_trained_model(trained):
    src = random_src(16, generator=torch.Generator().manual_seed(7))
    assert beam_search(trained, src, beam_size=1) == greedy_decode(trained, src)


@pytest.mark.parametrize("model_name", ["random", "trained"])
def test_beam_cached_equals_uncached(model_name, trained):
    model = trained if model_name == "trained" else tiny_model(norm_first=True)
    src = random_src(4, generator=torch.Generator().manual_seed(8))
    cached = beam_search_nbest(model, src, beam_size=3, max_len=10)
    uncached = beam_search_nbest(model, src, beam_size=3, max_len=10, use_cache=False)
    assert [[h.tokens for h in hyps] for hyps in cached] == [[h.tokens for h in hyps] for hyps in uncached]
    for a, b in zip(cached, uncached):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@pytest.mark.parametrize("model_name", ["random", "trained"])
def test_batched_beam_equals_one_at_a_time(model_name, trained):
    """Padding, per-sentence limits and sentences finishing at different steps change nothing."""
    model = trained if model_name == "trained" else tiny_model(seed=3)
    src = random_src(5, generator=torch.Generator().manual_seed(9), min_len=1, max_len=8)
    alone = [beam_search_nbest(model, row[None, : int((row != PAD).sum())], beam_size=4, max_len_b=4)[0]
             for row in src]
    batched = beam_search_nbest(model, src, beam_size=4, max_len_b=4)
    assert [[h.tokens for h in hyps] for hyps in batched] == [[h.tokens for h in hyps] for hyps in alone]


def test_beam_scores_are_sequence_scores_and_sorted():
    model = tiny_model(seed=4)
    src = random_src(4, generator=torch.Generator().manual_seed(10))
    for alpha in (0.0, 0.6):
        nbest = beam_search_nbest(model, src, beam_size=4, length_penalty=alpha, max_len=8)
        for b, hyps in enumerate(nbest):
            assert len(hyps) == 4
            assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
            rescored = sequence_scores(model, src[b:b + 1].expand(4, -1), [h.tokens for h in hyps],
                                       length_penalty=alpha)
            assert [h.score for h in hyps] == pytest.approx(rescored, abs=1e-4)


def test_beam_finds_better_scores_than_greedy():
    """Not guaranteed for any one input (beam search is not exact), so assert on a seeded set."""
    wins, total = 0, 0
    for seed in range(4):
        model = tiny_model(seed=seed)
        src = random_src(8, generator=torch.Generator().manual_seed(seed))
        greedy = sequence_scores(model, src, greedy_decode(model, src, max_len=10))
        beam = sequence_scores(model, src, beam_search(model, src, beam_size=4, max_len=10))
        wins += sum(b >= g - 1e-5 for b, g in zip(beam, greedy))
        total += len(beam)
        assert sum(beam) > sum(greedy)
    assert wins >= 0.9 * total


def test_beam_max_len():
    model = never_eos(tiny_model())
    src = random_src(4, generator=torch.Generator().manual_seed(11))
    assert [len(h) for h in beam_search(model, src, beam_size=3, max_len=5)] == [5] * 4
    n_words = [len(s) for s in strip_src(src)]
    assert [len(h) for h in beam_search(model, src, beam_size=3, max_len_b=1)] == [n + 1 for n in n_words]
    assert beam_search(model, src, beam_size=3, max_len=0) == [[]] * 4


# --- a scripted bigram model: exact expectations ------------------------------------------------


class ScriptCache:
    """A decoder state that only records how beam search reorders it."""

    def __init__(self):
        self.length = 0
        self.reorders: list[list[int]] = []

    def reorder(self, index):
        self.reorders.append(index.tolist())


class BigramModel(nn.Module):
    """p(next | last token) from a fixed table; ignores the source. Enough to script EOS and beams.

    A Seq2Seq by the protocol alone: no config, no positions; ``max_target_len`` is settable.
    """

    pad_id, bos_id, eos_id = PAD, BOS, EOS
    max_source_len = None

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 6, max_target_len: int | None = None):
        super().__init__()
        self.max_target_len = max_target_len
        self.caches: list[ScriptCache] = []
        probs = torch.full((vocab, vocab), 1.0 / vocab)
        for last, row in table.items():
            probs[last] = 0.0
            for token, p in row.items():
                probs[last, token] = p
        self.register_buffer("log_probs", probs.log())
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, src, *, record=None):
        return torch.zeros(*src.shape, 8), padding_mask(src, PAD)

    def new_cache(self):
        self.caches.append(ScriptCache())
        return self.caches[-1]

    def decode(self, tgt, memory, src_mask, *, cache=None, record=None):
        return self.log_probs[tgt]  # (B, T, V): logits = log p, so log_softmax gives p back


A, B_, C = 3, 4, 5
TRAP = {BOS: {A: 0.5, B_: 0.4, EOS: 0.1}, A: {C: 0.4, B_: 0.3, EOS: 0.3}, B_: {EOS: 1.0}, C: {EOS: 1.0}}


def test_scripted_beam_beats_greedy_trap():
    model = BigramModel(TRAP)
    src = torch.tensor([[3, EOS]])
    assert greedy_decode(model, src) == [[A, C]]  # p = 0.5 * 0.4 * 1.0 = 0.2
    assert beam_search(model, src, beam_size=1) == [[A, C]]
    nbest = beam_search_nbest(model, src, beam_size=2, length_penalty=0.6)[0]
    assert [h.tokens for h in nbest] == [[B_], [A, C]]  # p([B]) = 0.4 beats 0.2
    assert nbest[0].score == pytest.approx(math.log(0.4) / length_penalty_factor(2, 0.6))
    assert nbest[1].score == pytest.approx(math.log(0.2) / length_penalty_factor(3, 0.6))


def test_scripted_eos_does_not_take_a_beam_slot():
    """2K candidates: a hypothesis that ends leaves room for the third-best continuation (A D)."""
    D, F = 6, 7
    table = {BOS: {A: 0.6, B_: 0.4}, A: {EOS: 0.55, D: 0.45}, B_: {C: 0.9, EOS: 0.1}, C: {EOS: 0.2, F: 0.8},
             D: {EOS: 1.0}, F: {EOS: 1.0}}
    nbest = beam_search_nbest(BigramModel(table, vocab=8), torch.tensor([[3, EOS]]), beam_size=2, length_penalty=0.0)
    assert [h.tokens for h in nbest[0]] == [[A], [A, D]]
    assert [h.score for h in nbest[0]] == pytest.approx([math.log(0.33), math.log(0.27)])


def test_scripted_sentence_keeps_at_most_beam_size_finished():
    """fairseq's rule: once K hypotheses have finished the sentence is done, even if a later,
    longer one (B, scored log 0.2 / lp(2) with alpha=2) would have beaten an earlier one ([])."""
    table = {BOS: {A: 0.5, EOS: 0.3, B_: 0.2}, A: {EOS: 1.0}, B_: {EOS: 1.0}}
    nbest = beam_search_nbest(BigramModel(table), torch.tensor([[3, EOS]]), beam_size=2, length_penalty=2.0)
    assert [h.tokens for h in nbest[0]] == [[A], []]
    assert math.log(0.2) / length_penalty_factor(2, 2.0) > nbest[0][1].score


def test_scripted_eos_first_gives_empty_hypothesis():
    model = BigramModel({BOS: {EOS: 0.9, A: 0.1}, A: {EOS: 1.0}})
    src = torch.tensor([[3, 3, EOS]])
    assert greedy_decode(model, src) == [[]]
    assert beam_search(model, src, beam_size=3) == [[]]


def test_scripted_pad_and_bos_are_never_generated():
    model = BigramModel({BOS: {PAD: 0.6, BOS: 0.3, A: 0.1}, A: {PAD: 0.9, A: 0.09, EOS: 0.01}})
    src = torch.tensor([[3, EOS]])
    assert greedy_decode(model, src, max_len=4) == [[A] * 4]
    for hyp in beam_search_nbest(model, src, beam_size=2, max_len=4)[0]:
        assert hyp.tokens and set(hyp.tokens) == {A}


def test_scripted_beam_search_reorders_the_cache_to_follow_the_survivors():
    """Step 1 keeps (A, B) from beam 0 of the single sentence: rows [0, 0]; then each keeps its own."""
    model = BigramModel(TRAP)
    beam_search_nbest(model, torch.tensor([[3, EOS]]), beam_size=2, length_penalty=0.6)
    assert isinstance(model.caches[-1], DecoderCache)
    assert model.caches[-1].reorders[0] == [0, 0]
    assert all(len(rows) == 2 for rows in model.caches[-1].reorders)
    beam_search_nbest(model, torch.tensor([[3, EOS]]), beam_size=2, use_cache=False)
    assert len(model.caches) == 1  # no cache asked for without use_cache


def test_scripted_max_target_len_caps_the_output():
    """max_target_len counts the decoder input, BOS included: at most max_target_len - 1 tokens."""
    loop = {BOS: {A: 1.0}, A: {A: 0.99, EOS: 0.01}}
    src = torch.tensor([[3, EOS]])
    assert greedy_decode(BigramModel(loop, max_target_len=5), src, max_len=50) == [[A] * 4]
    assert beam_search(BigramModel(loop, max_target_len=5), src, beam_size=1, max_len=50) == [[A] * 4]
    assert greedy_decode(BigramModel(loop), src, max_len=7) == [[A] * 7]


def test_length_penalty_factor_is_gnmt():
    assert length_penalty_factor(1, 0.6) == 1.0
    assert length_penalty_factor(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert length_penalty_factor(30, 0.0) == 1.0


# --- translate ----------------------------------------------------------------------------------


class WordTokenizer:
    """Words 'w0' .. 'w8' <-> ids 3 .. 11."""

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [BOS] * add_bos + [3 + int(w[1:]) for w in text.split()] + [EOS] * add_eos

    def decode(self, ids):
        return " ".join(f"w{i - 3}" for i in ids if i > EOS)


@pytest.mark.parametrize("beam_size,batching", [(1, {"batch_size": 2}), (4, {"batch_size": 8, "max_tokens": 12})])
def test_translate_restores_order(trained, beam_size, batching):
    g = torch.Generator().manual_seed(12)
    sentences = [" ".join(f"w{int(k)}" for k in torch.randint(0, 9, (n,), generator=g))
                 for n in [3, 7, 2, 5, 6, 2, 4]]
    tok = WordTokenizer()
    out = translate(trained, tok, tok, sentences, beam_size=beam_size, **batching)
    one_by_one = [tok.decode(beam_search(trained, torch.tensor([tok.encode(s, add_eos=True)]), beam_size=beam_size)[0])
                  for s in sentences]
    assert out == one_by_one
    assert sum(o == s for o, s in zip(out, sentences)) >= 5  # the model copies most
    assert translate(trained, WordTokenizer(), WordTokenizer(), []) == []


def test_translate_checks_the_source_length_against_max_source_len():
    model = tiny_model(positional="learned")  # 64 positions
    assert model.max_source_len == 64
    tok = WordTokenizer()
    translate(model, tok, tok, ["w1 " * 63], beam_size=1)  # 63 words + EOS fit
    with pytest.raises(DataError, match="my.en:3: 65 tokens.*max_source_len=64"):
        translate(model, tok, tok, ["w1", "w2", "w1 " * 64], names=["my.en:1", "my.en:2", "my.en:3"])
    with pytest.raises(ValueError, match="max_source_len=64"):
        greedy_decode(model, torch.full((1, 65), 3))
    assert tiny_model().max_source_len is None  # sinusoidal positions extend to any length


class ProtocolOnly(nn.Module):
    """A Transformer seen only through the Seq2Seq protocol (no ``cfg``): decoding must not need more."""

    def __init__(self, inner: Transformer):
        super().__init__()
        self.inner = inner

    pad_id = property(lambda self: self.inner.pad_id)
    bos_id = property(lambda self: self.inner.bos_id)
    eos_id = property(lambda self: self.inner.eos_id)
    max_source_len = property(lambda self: self.inner.max_source_len)
    max_target_len = property(lambda self: self.inner.max_target_len)

    def encode(self, src, *, record=None):
        return self.inner.encode(src, record=record)

    def decode(self, tgt, memory, src_mask, *, cache=None, record=None):
        return self.inner.decode(tgt, memory, src_mask, cache=cache, record=record)

    def new_cache(self):
        return self.inner.new_cache()


def test_decoding_reads_the_model_only_through_the_protocol(trained):
    wrapped = ProtocolOnly(trained)
    assert isinstance(wrapped, Seq2Seq) and isinstance(trained, Seq2Seq) and not hasattr(wrapped, "cfg")
    src = random_src(5, generator=torch.Generator().manual_seed(13))
    assert greedy_decode(wrapped, src) == greedy_decode(trained, src)
    assert beam_search(wrapped, src, beam_size=3) == beam_search(trained, src, beam_size=3)
    assert sequence_scores(wrapped, src, [[3, 4]] * 5) == sequence_scores(trained, src, [[3, 4]] * 5)
    tok = WordTokenizer()
    assert translate(wrapped, tok, tok, ["w1 w2 w3", "w4"]) == translate(trained, tok, tok, ["w1 w2 w3", "w4"])
    learned = tiny_model(positional="learned")
    assert ProtocolOnly(learned).max_target_len == learned.max_target_len == 64


def test_a_model_without_the_protocol_is_refused_naming_what_it_lacks():
    with pytest.raises(ValueError, match="not a Seq2Seq model.*max_target_len"):
        greedy_decode(nn.Linear(2, 2), torch.tensor([[3, EOS]]))


def test_translate_checks_tokenizer_ids(trained):
    class Other(WordTokenizer):
        eos_id = 5

    with pytest.raises(ValueError, match="eos_id=5"):
        translate(trained, WordTokenizer(), Other(), ["w1"])
