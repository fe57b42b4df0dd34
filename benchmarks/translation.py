"""Translation speed (issue 4): training throughput and beam-search decoding, qkv against what a user would write.

Two like-for-like comparisons, same shapes, same synthetic token ids, fp32 on CPU:

    train   target tokens/s of one training step (forward, label-smoothed cross-entropy over non-pad
            targets, backward, AdamW step). Ours: qkv.models.transformer.Transformer and its
            teacher_forcing_loss (what TranslationTask.loss runs on a bare model: the output projection
            fused with the loss, chunked, on the non-pad targets only). Baseline: TorchTransformer below,
            torch.nn.Transformer
            (batch_first=True) between nn.Embedding + sinusoidal positions and a tied output Linear, called
            as its docs say, with the causal fast path (generate_square_subsequent_mask + tgt_is_causal=True,
            so the decoder's self-attention runs the is_causal kernel) and bool key-padding masks.
            Batches: synthetic Multi30k-like pairs (10-30 tokens a side) grouped by qkv.data.batching
            into batches of <= 4096 padded tokens, as the trainer does.
    decode  sentences/s of beam search (beam 4, length penalty 0.6, cached keys/values), 32 source
            sentences of 15-25 tokens, N = 30 decoder steps. Ours: qkv.decode.beam_search. Baseline: Hugging
            Face transformers' MarianMTModel(MarianConfig(...)) (post-norm, sinusoidal positions, like
            ours) with generate(num_beams=4, length_penalty=0.6, early_stopping=True, max_new_tokens=N).
            Needs `pip install transformers` (not a qkv dependency); without it this part is skipped.

Equal work. nn.Transformer applies its one dropout rate also inside the FFN (after the activation);
qkv does not, so the baseline's FFN-inner dropout is replaced by nn.Identity, and the script checks,
with our weights copied in, that both models compute the same logits (pre-norm shape; post-norm
nn.Transformer adds a final LayerNorm per stack that qkv's post-norm model does not have). The stock
nn.Transformer (FFN dropout kept) is timed as a second baseline in the full run.
Random weights rarely emit EOS, and a search that stops early does less work, so both decoders run
exactly N decoder steps: HF gets min_new_tokens=N (EOS logit -inf until N tokens exist), and our
model is wrapped so that EOS gets a logit of -1e4 (finite, so the forced EOS at the length limit still
scores) with max_len=N-1, i.e. N-1 tokens + the forced EOS = N decoder calls. The script checks both.

Configs: the Multi30k preset's shape (d_model 256, 4 heads, d_ff 1024, 3+3 layers, pre-norm, GELU) and,
without --quick, the paper's base shape (512, 8, 2048, 6+6, post-norm, ReLU) for a few steps.
Dropout 0.1 (residuals and attention weights), LayerNorm, sinusoidal positions, vocabulary 8000 shared
by source, target and output. One torch thread by default (see --threads).
Run: python benchmarks/translation.py [--quick] [--threads N]
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
import warnings

import torch
from _common import emit, emit_info, parser, time_fns
from torch import nn

from qkv.data.batching import collate_pairs, collated_lengths, token_batches
from qkv.decode import beam_search
from qkv.models.transformer import Transformer, TransformerConfig, teacher_forcing_loss
from qkv.tasks.translation import sequence_loss

PAD, BOS, EOS = 0, 1, 2
VOCAB = 8000
MAX_TOKENS = 4096
LABEL_SMOOTHING = 0.1
DROPOUT = 0.1
SHAPES = {  # layers = encoder layers = decoder layers
    "multi30k": dict(d_model=256, n_heads=4, d_ff=1024, n_layers=3, norm_first=True, activation="gelu"),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_layers=6, norm_first=False, activation="relu"),
}


def ours_model(shape: dict) -> Transformer:
    return Transformer(TransformerConfig(
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=shape["d_model"], n_heads=shape["n_heads"],
        d_ff=shape["d_ff"], n_encoder_layers=shape["n_layers"], n_decoder_layers=shape["n_layers"],
        dropout=DROPOUT, attn_dropout=DROPOUT, activation=shape["activation"], norm="layernorm",
        norm_first=shape["norm_first"], positional="sinusoidal", share_embeddings=True, tie_output=True,
        pad_id=PAD, bos_id=BOS, eos_id=EOS))


class TorchTransformer(nn.Module):
    """What a user builds on torch.nn.Transformer: shared embedding * sqrt(D) + sinusoidal PE, tied output."""

    def __init__(self, shape: dict, *, ffn_dropout: bool = False, max_len: int = 512):
        super().__init__()
        D = shape["d_model"]
        self.embed = nn.Embedding(VOCAB, D)
        nn.init.normal_(self.embed.weight, std=D ** -0.5)
        position = torch.arange(max_len)[:, None]  # (L, 1)
        freq = torch.exp(torch.arange(0, D, 2) * (-math.log(10000.0) / D))  # (D/2,)
        pe = torch.zeros(max_len, D)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("pe", pe, persistent=False)  # (L, D)
        self.dropout = nn.Dropout(DROPOUT)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first": an inference path
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                D, shape["n_heads"], shape["n_layers"], shape["n_layers"], shape["d_ff"], DROPOUT,
                activation=shape["activation"], batch_first=True, norm_first=shape["norm_first"])
        if not ffn_dropout:  # qkv has no dropout inside the FFN: equal work needs none here
            for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
                layer.dropout = nn.Identity()
        self.output = nn.Linear(D, VOCAB, bias=False)
        self.output.weight = self.embed.weight
        self.scale = math.sqrt(D)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(ids) * self.scale + self.pe[: ids.shape[1]])  # (B, T, D)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        src_pad = src == PAD  # (B, S), torch's convention: True = ignore
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)  # (T, T)
        h = self.transformer(self._embed(src), self._embed(tgt), tgt_mask=causal, src_key_padding_mask=src_pad,
                             memory_key_padding_mask=src_pad, tgt_is_causal=True)
        return self.output(h)  # (B, T, V)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _norm_pairs(theirs: nn.LayerNorm, ours: nn.LayerNorm) -> list:
    return [(theirs.weight, ours.weight), (theirs.bias, ours.bias)]


def _attention_pairs(theirs: nn.MultiheadAttention, ours: nn.Module) -> list:
    if ours.cross:  # nn.MultiheadAttention stacks q, k, v rows; ours keeps q apart from k, v
        w = torch.cat([ours.q_proj.weight, ours.kv_proj.weight])
        b = torch.cat([ours.q_proj.bias, ours.kv_proj.bias])
    else:
        w, b = ours.qkv_proj.weight, ours.qkv_proj.bias
    return [(theirs.in_proj_weight, w), (theirs.in_proj_bias, b), (theirs.out_proj.weight, ours.out_proj.weight),
            (theirs.out_proj.bias, ours.out_proj.bias)]


def _ffn_pairs(theirs: nn.Module, ours: nn.Module) -> list:
    return [(theirs.linear1.weight, ours.ff.w_1.weight), (theirs.linear1.bias, ours.ff.w_1.bias),
            (theirs.linear2.weight, ours.ff.w_2.weight), (theirs.linear2.bias, ours.ff.w_2.bias)]


def check_same_function(ours: Transformer, theirs: TorchTransformer, batch: dict) -> None:
    """Copy our weights into a pre-norm baseline and check that both give the same logits (dropout off)."""
    t = theirs.transformer
    pairs = [(theirs.embed.weight, ours.src_embed.weight), (theirs.pe, ours.positions.table[: len(theirs.pe)])]
    pairs += _norm_pairs(t.encoder.norm, ours.encoder_norm) + _norm_pairs(t.decoder.norm, ours.decoder_norm)
    for a, b in zip(t.encoder.layers, ours.encoder):
        pairs += _attention_pairs(a.self_attn, b.self_attn) + _ffn_pairs(a, b)
        pairs += _norm_pairs(a.norm1, b.attn_residual.norm) + _norm_pairs(a.norm2, b.ff_residual.norm)
    for a, b in zip(t.decoder.layers, ours.decoder):
        pairs += _attention_pairs(a.self_attn, b.self_attn) + _attention_pairs(a.multihead_attn, b.cross_attn)
        pairs += _ffn_pairs(a, b) + _norm_pairs(a.norm1, b.self_residual.norm)
        pairs += _norm_pairs(a.norm2, b.cross_residual.norm) + _norm_pairs(a.norm3, b.ff_residual.norm)
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)
        ours.eval(), theirs.eval()
        torch.testing.assert_close(theirs(batch["src"], batch["tgt_in"]), ours(batch["src"], batch["tgt_in"]),
                                   atol=1e-4, rtol=1e-4)
    ours.train(), theirs.train()


def check_same_loss(model: Transformer, batch: dict) -> None:
    """Our fused loss and the plain one (logits, then cross-entropy) give one value (dropout off)."""
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(ours_loss(model, batch), logits_loss(model, batch), atol=1e-5, rtol=1e-5)
    model.train()


# -- training -------------------------------------------------------------------------------------

def synthetic_batches(n_pairs: int, seed: int = 0) -> list[dict]:
    """Multi30k-like pairs: source 10-30 tokens + EOS, target within +-4 of it; batched as the trainer does."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        s = rng.randint(10, 30)
        t = min(30, max(10, s + rng.randint(-4, 4)))
        pairs.append(([rng.randrange(3, VOCAB) for _ in range(s)] + [EOS], [rng.randrange(3, VOCAB) for _ in range(t)]))
    batches = token_batches(collated_lengths(pairs), MAX_TOKENS, seed=seed)
    return [collate_pairs([pairs[i] for i in b], pad_id=PAD, bos_id=BOS, eos_id=EOS) for b in batches]


def logits_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """What a user writes: logits (B, T, V), then label-smoothed cross-entropy over non-pad targets."""
    logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
    return sequence_loss(logits, batch["tgt_out"], pad_id=PAD, label_smoothing=LABEL_SMOOTHING)[0]


def ours_loss(model: Transformer, batch: dict) -> torch.Tensor:
    """The same value as logits_loss, from the real targets' states through the fused chunked projection."""
    return teacher_forcing_loss(model, batch["src"], batch["tgt_in"], batch["tgt_out"],
                                label_smoothing=LABEL_SMOOTHING)[0]


def train_steps(model: nn.Module, batches: list[dict], loss_fn=logits_loss):
    """A zero-argument callable: one training step on each of ``batches``, with this model's AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)

    def run():
        for batch in batches:
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def bench_train(name: str, shape: dict, n_batches: int, warmup: int, repeats: int, stock: bool) -> None:
    torch.manual_seed(0)
    batches = synthetic_batches(4000)[:n_batches]
    models = {"ours": ours_model(shape).train(), "nn.Transformer": TorchTransformer(shape).train()}
    if shape["norm_first"]:
        check_same_function(models["ours"], models["nn.Transformer"], batches[0])
    check_same_loss(models["ours"], batches[0])
    if stock:
        models["nn.Transformer (stock: + FFN-inner dropout)"] = TorchTransformer(shape, ffn_dropout=True).train()
    steps = [train_steps(m, batches, ours_loss if name == "ours" else logits_loss) for name, m in models.items()]
    seconds = time_fns(*steps, warmup=warmup, repeats=repeats)
    tokens = sum(int((b["tgt_out"] != PAD).sum()) for b in batches)
    padded = sum(b["tgt_out"].numel() for b in batches) / n_batches
    ours_s = seconds[0]
    for (baseline, model), baseline_s in list(zip(models.items(), seconds))[1:]:
        emit("translation_train_step", ours_s / n_batches, baseline, baseline_s / n_batches, config=name, **shape,
             dropout=DROPOUT, vocab=VOCAB, params=n_params(models["ours"]), baseline_params=n_params(model),
             tgt_tokens_per_step=round(tokens / n_batches), padded_tgt_tokens_per_step=round(padded),
             ours_tgt_tokens_per_s=round(tokens / ours_s), baseline_tgt_tokens_per_s=round(tokens / baseline_s),
             batches_per_call=n_batches, repeats=repeats,
             measures="fwd + label-smoothed CE + bwd + AdamW step; seconds per step (median)")


# -- decoding -------------------------------------------------------------------------------------

class SuppressEOS(nn.Module):
    """Our model with EOS pushed to logit -1e4: it is never chosen unless forced at the length limit."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.pad_id, self.bos_id, self.eos_id = model.pad_id, model.bos_id, model.eos_id
        self.max_source_len, self.max_target_len = model.max_source_len, model.max_target_len

    def encode(self, src, **kwargs):
        return self.model.encode(src, **kwargs)

    def new_cache(self):
        return self.model.new_cache()

    def decode(self, tgt, memory, src_mask, **kwargs):
        logits = self.model.decode(tgt, memory, src_mask, **kwargs)  # (N, T, V)
        logits[..., EOS] = -1e4
        return logits


def marian_model(shape: dict):
    from transformers import MarianConfig, MarianMTModel

    D, H, F, L = shape["d_model"], shape["n_heads"], shape["d_ff"], shape["n_layers"]
    config = MarianConfig(
        vocab_size=VOCAB, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H,
        decoder_attention_heads=H, encoder_ffn_dim=F, decoder_ffn_dim=F, max_position_embeddings=512,
        activation_function="relu", dropout=DROPOUT, attention_dropout=DROPOUT, scale_embedding=True,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=BOS, forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    return MarianMTModel(config).eval()


def decode_inputs(n_sentences: int, seed: int = 1) -> torch.Tensor:
    """(B, S) source ids: 15-25 tokens + EOS each, right-padded."""
    rng = random.Random(seed)
    rows = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(15, 25))] + [EOS] for _ in range(n_sentences)]
    src = torch.full((n_sentences, max(map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.tensor(r)
    return src


def bench_decode(name: str, shape: dict, n_sentences: int, n_steps: int, warmup: int, repeats: int) -> None:
    if importlib.util.find_spec("transformers") is None:  # not a qkv dependency
        emit_info("translation_beam_search_skipped", config=name,
                  note="Hugging Face transformers is not installed: .venv/bin/pip install transformers")
        return
    torch.manual_seed(0)
    shape = {**shape, "norm_first": False, "activation": "relu"}  # Marian's layout, whatever training used
    ours = SuppressEOS(ours_model(shape)).eval()
    theirs = marian_model(shape)
    hf_params = sum(p.numel() for n, p in theirs.named_parameters() if "embed_positions" not in n)
    src = decode_inputs(n_sentences)
    attention_mask = (src != PAD).long()

    def run_ours():
        return beam_search(ours, src, beam_size=4, length_penalty=0.6, max_len=n_steps - 1)

    def run_theirs():
        return theirs.generate(src, attention_mask=attention_mask, num_beams=4, length_penalty=0.6,
                               max_new_tokens=n_steps, min_new_tokens=n_steps, early_stopping=True)

    hyps, out = run_ours(), run_theirs()
    if any(len(h) != n_steps - 1 for h in hyps) or out.shape[1] != n_steps + 1:
        raise RuntimeError("the two searches did not run the same number of decoder steps")
    ours_s, theirs_s = time_fns(run_ours, run_theirs, warmup=warmup, repeats=repeats)
    emit("translation_beam_search", ours_s, "transformers.MarianMTModel.generate", theirs_s, config=name, **shape,
         vocab=VOCAB, params=n_params(ours), baseline_params=hf_params, sentences=n_sentences,
         src_shape=list(src.shape), decoder_steps=n_steps, beam=4, length_penalty=0.6,
         ours_sentences_per_s=round(n_sentences / ours_s, 2),
         baseline_sentences_per_s=round(n_sentences / theirs_s, 2), repeats=repeats,
         measures="seconds per batch of sentences (median); both run exactly decoder_steps cached decoder calls")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1; 0 = torch's choice). On a CPU shared with other jobs "
                        "keep 1: OpenMP threads spin-waiting for a descheduled peer slow every op down many times")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.quick:
        emit_info("translation_note", note="--quick: multi30k shape only, 1 batch per call, 3 repeats, "
                                           "no stock nn.Transformer line")
        bench_train("multi30k", SHAPES["multi30k"], n_batches=1, warmup=1, repeats=3, stock=False)
        bench_decode("multi30k", SHAPES["multi30k"], n_sentences=32, n_steps=30, warmup=1, repeats=3)
    else:
        bench_train("multi30k", SHAPES["multi30k"], n_batches=2, warmup=1, repeats=5, stock=True)
        bench_train("base", SHAPES["base"], n_batches=1, warmup=1, repeats=3, stock=True)
        bench_decode("multi30k", SHAPES["multi30k"], n_sentences=32, n_steps=30, warmup=1, repeats=7)
        bench_decode("base", SHAPES["base"], n_sentences=32, n_steps=30, warmup=1, repeats=3)
    emit_info("translation_wall", seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
