"""Language model (issue 5): qkv's DecoderOnly against HF GPT-2 and nanoGPT, same size, same weights.

    (a) lm_train_step   one training step (forward, cross-entropy, backward, AdamW step) of
                        qkv.models.DecoderOnly against transformers' GPT2LMHeadModel (SDPA attention)
                        and against nanoGPT's GPT (benchmarks/_nanogpt_model.py), same config, batch
                        and parameter count: nanoGPT's CPU recipe and its baby GPT.
    (b) lm_generate     greedy decoding, batch 1, a fixed number of new tokens: ours with its KV cache
                        against HF ``generate`` on the same weights (converted below; logits checked
                        equal first) and against our own uncached path.
    (c) lm_train_fraction_of_peak   our training step's FLOP/s over this machine's fp32 matmul peak.
    (d) lm_race         Tiny Shakespeare, the same wall-clock: nanoGPT's CPU recipe in a training loop
                        written as nanoGPT's train.py, and qkv's engine (our recipe) for as many steps as
                        a short timing run says fit in nanoGPT's time; the two run interleaved step by
                        step, so both see the same machine load; then the val loss of each on the same
                        200 random validation batches.

All fp32 on CPU, dropout 0, ``--threads`` (default 1) torch threads for every part.
Run: python benchmarks/lm.py [--quick] [--threads N] [--data PATH]
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import emit, emit_info, fraction_of_peak, parser, time_fns
from _nanogpt_model import GPT, GPTConfig

from qkv.config import TrainConfig
from qkv.generate import SamplingConfig, generate_ids
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.run import from_mapping
from qkv.train import Trainer, build_optimizer

DATA = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
HAVE_HF = importlib.util.find_spec("transformers") is not None  # a baseline, not a qkv dependency


@dataclass(frozen=True)
class Shape:
    name: str
    n_layers: int
    n_heads: int
    d_model: int
    block_size: int
    batch: int
    vocab_size: int = 65  # Tiny Shakespeare's characters


CPU_RECIPE = Shape("nanogpt-cpu", 4, 4, 128, 64, 12)  # nanoGPT README's "I only have a macbook" run
BABY_GPT = Shape("baby-gpt", 6, 6, 384, 256, 64)  # nanoGPT config/train_shakespeare_char.py


# --- three models of one size ---------------------------------------------------------------------

def ours_model(s: Shape, *, block_size: int | None = None) -> DecoderOnly:
    return DecoderOnly(DecoderOnlyConfig(vocab_size=s.vocab_size, block_size=block_size or s.block_size,
                                         d_model=s.d_model, n_heads=s.n_heads, n_layers=s.n_layers, dropout=0.0))


def hf_model(s: Shape, *, block_size: int | None = None):
    """GPT2LMHeadModel with exact GELU (ours and nanoGPT's; GPT-2's default is the tanh one), SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=s.vocab_size, n_positions=block_size or s.block_size, n_embd=s.d_model,
                     n_layer=s.n_layers, n_head=s.n_heads, activation_function="gelu", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


def _nanogpt_model(s: Shape) -> GPT:
    return GPT(GPTConfig(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layers, n_head=s.n_heads,
                         n_embd=s.d_model, dropout=0.0, bias=True))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def train_steps(s: Shape) -> tuple[dict, dict]:
    """One zero-argument training step per model, on the same batch; and their parameter counts."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(s.vocab_size, (s.batch, s.block_size), generator=g) for _ in range(2))  # (B, T) each
    lr, betas, wd = 1e-3, (0.9, 0.99), 0.1
    ours, nano = ours_model(s).train(), _nanogpt_model(s).train()

    def cross_entropy(logits):  # (B, T, V) -> mean over B*T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def step(loss_fn, optimizer):
        def run():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    ours_opt = build_optimizer(ours, TrainConfig(optimizer="adamw", lr=lr, betas=betas, weight_decay=wd))
    nano_opt = nano.configure_optimizers(wd, lr, betas, "cpu")
    steps = {"ours": step(lambda: cross_entropy(ours(x)), ours_opt), "nanogpt": step(lambda: nano(x, y)[1], nano_opt)}
    params = {"ours": n_params(ours), "nanogpt": n_params(nano)}
    if HAVE_HF:
        hf = hf_model(s).train()
        hf_opt = torch.optim.AdamW(decay_groups(hf, wd), lr=lr, betas=betas)
        steps["hf_gpt2_sdpa"] = step(lambda: cross_entropy(hf(input_ids=x, use_cache=False).logits), hf_opt)
        params["hf_gpt2_sdpa"] = n_params(hf)
    return steps, params


def train_flops(s: Shape) -> float:
    """FLOPs of one training step, nanoGPT's estimate_mfu (PaLM, app. B): per token 6 N + 12 L T D,
    N = parameters without the position table (the tied output matmul counts), T = block_size."""
    d, L, T, V = s.d_model, s.n_layers, s.block_size, s.vocab_size
    n = V * d + L * (12 * d * d + 13 * d) + 2 * d  # embeddings (tied) + blocks + final norm
    return (6 * n + 12 * L * T * d) * s.batch * T


def bench_train(shapes: list[Shape], warmup: int, repeats: int, threads: int) -> None:
    for s in shapes:
        steps, params = train_steps(s)
        if len(set(params.values())) != 1:
            raise AssertionError(f"parameter counts differ: {params}")
        times = dict(zip(steps, time_fns(*steps.values(), warmup=warmup, repeats=repeats)))
        common = dict(config=s.name, L=s.n_layers, H=s.n_heads, D=s.d_model, T=s.block_size, B=s.batch,
                      params=params["ours"], threads=threads)
        for baseline in ("hf_gpt2_sdpa", "nanogpt"):
            if baseline in times:
                emit("lm_train_step", times["ours"], baseline, times[baseline], **common)
        if s is shapes[-1]:
            measured = fraction_of_peak(steps["ours"], train_flops(s), repeats=repeats)
            emit_info("lm_train_fraction_of_peak", **measured, **common,
                      flops_counted="B*T*(6*N + 12*L*T*D), N = params without the position table",
                      peak="best square fp32 matmul (512..2048), timed in turns with the step")


# --- generation: our weights in HF's GPT-2 --------------------------------------------------------

GPT2_NAMES = {"self_residual.norm": "ln_1", "self_attn.qkv_proj": "attn.c_attn", "self_attn.out_proj": "attn.c_proj",
              "ff_residual.norm": "ln_2", "ff.w_1": "mlp.c_fc", "ff.w_2": "mlp.c_proj"}


def to_gpt2_state_dict(model: DecoderOnly) -> dict[str, torch.Tensor]:
    """A pre-norm, learned-position, biased, tied DecoderOnly's weights under GPT2LMHeadModel's names.

    GPT-2's Conv1D stores weights (in, out), nn.Linear (out, in): linear weights are transposed. Our
    qkv_proj stacks the q, k, v rows in that order, which is c_attn's column order after transposing.
    """
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["embed.weight"], "lm_head.weight": sd["embed.weight"],
           "transformer.wpe.weight": sd["positions.embedding.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"], "transformer.ln_f.bias": sd["final_norm.bias"]}
    for i in range(len(model.layers)):
        for ours, theirs in GPT2_NAMES.items():
            weight = sd[f"layers.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight if ours.endswith("norm") else weight.t().contiguous()
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"layers.{i}.{ours}.bias"]
    return out


def generation_model(s: Shape, context: int) -> DecoderOnly:
    """Our model in eval mode, its weights moved off init: like trained weights, and because init's zero
    biases, unit norms and ~uniform attention would hide a misplaced bias, norm or q/k in the converter."""
    ours = ours_model(s, block_size=context).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return ours


def hf_twin(ours: DecoderOnly, s: Shape):
    """GPT2LMHeadModel with our model's weights (eval mode), and the largest logit difference (checked <= 1e-4)."""
    context = ours.cfg.block_size
    hf = hf_model(s, block_size=context).eval()
    hf.load_state_dict(to_gpt2_state_dict(ours), strict=True)
    ids = torch.randint(s.vocab_size, (2, context), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        diff = float((ours(ids) - hf(input_ids=ids, use_cache=False).logits).abs().max())
    if diff > 1e-4:
        raise AssertionError(f"our logits and HF GPT-2's differ by {diff:.2e} > 1e-4: the converter is wrong")
    return hf, diff


def hf_generator(hf, prompt: list[int], new_tokens: int, pad_id: int):
    """A zero-argument HF greedy ``generate`` returning the new ids: the same rule as ours (no EOS stop,
    exactly ``new_tokens`` tokens, the pad id never chosen)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=pad_id, suppress_tokens=[pad_id])
    ids = torch.tensor([prompt])  # (1, T)

    def run() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)  # (1, T + new)
        return out[0, len(prompt):].tolist()

    return run


def bench_generate(s: Shape, new_tokens: int, prompt_len: int, warmup: int, repeats: int, threads: int) -> None:
    """Greedy tokens/s, batch 1: ours (KV cache) against HF generate on the same weights, then our uncached path."""
    ours = generation_model(s, prompt_len + new_tokens)
    prompt = torch.randint(3, s.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    runs = {"ours": lambda: generate_ids(ours, [prompt], sampling)[0],
            "ours_no_cache": lambda: generate_ids(ours, [prompt], sampling, use_cache=False)[0]}
    plan = [("ours_no_cache", 0, 1, {})]  # uncached is slow: one call each
    if HAVE_HF:
        hf, diff = hf_twin(ours, s)
        runs["hf_generate"] = hf_generator(hf, prompt, new_tokens, ours.cfg.pad_id)
        plan.insert(0, ("hf_generate", warmup, repeats, {"max_logit_diff": f"{diff:.1e}"}))
    out = {}

    def keeping(name):
        return lambda: out.__setitem__(name, runs[name]())

    for name, n_warmup, n_repeats, extra in plan:
        ours_s, theirs_s = time_fns(keeping("ours"), keeping(name), warmup=n_warmup, repeats=n_repeats)
        if not len(out["ours"]) == len(out[name]) == new_tokens:
            raise AssertionError(f"token counts differ: ours {len(out['ours'])}, {name} {len(out[name])}")
        emit("lm_generate", ours_s, name, theirs_s, ours_tok_s=round(new_tokens / ours_s, 1),
             baseline_tok_s=round(new_tokens / theirs_s, 1), same_tokens=out["ours"] == out[name],
             common_prefix=_common_prefix(out["ours"], out[name]), config=s.name, L=s.n_layers, D=s.d_model,
             new_tokens=new_tokens, prompt=prompt_len, batch=1, threads=threads, **extra)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- (d) the same wall-clock on Tiny Shakespeare --------------------------------------------------

RACE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4, warmup=100,
            betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0)  # nanoGPT README's CPU run, dropout 0
OUR_RECIPE = {  # qkv's engine; data, split, block, batch and width as nanoGPT's; RoPE, SwiGLU, no bias, 3x lr
    "model": {"block_size": 64, "d_model": 128, "n_heads": 4, "n_layers": 4, "dropout": 0.0,
              "positional": "rope", "bias": False, "activation": "swiglu", "d_ff": 344},  # 344: 4d's params
    "train": {"optimizer": "adamw", "lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.1, "schedule": "cosine",
              "warmup_steps": 100, "min_lr_ratio": 0.1, "label_smoothing": 0.0, "clip_grad_norm": 1.0,
              "precision": "fp32", "device": "cpu"},
}


def get_batch(ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator):
    """nanoGPT's get_batch: random offsets, x = block, y = block shifted by one. (B, T) each."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    rows = starts[:, None] + torch.arange(block_size)  # (B, T)
    return ids[rows], ids[rows + 1]


def nanogpt_lr(it: int, iters: int) -> float:
    """nanoGPT's get_lr: linear warm-up, cosine decay to min_lr at lr_decay_iters (= max_iters)."""
    lr, min_lr, warmup = RACE["lr"], RACE["min_lr"], RACE["warmup"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / (iters - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def nanogpt_training(train_ids: torch.Tensor, vocab_size: int, iters: int) -> Iterator[GPT]:
    """nanoGPT's train.py loop on CPU (no autocast, no compile, 1 micro-batch), one iteration per ``next``."""
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=RACE["block_size"], vocab_size=vocab_size, n_layer=RACE["n_layer"],
                          n_head=RACE["n_head"], n_embd=RACE["n_embd"], dropout=0.0, bias=True))
    optimizer = model.configure_optimizers(RACE["weight_decay"], RACE["lr"], RACE["betas"], "cpu")
    generator = torch.Generator().manual_seed(1337)
    for it in range(iters):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it, iters)
        x, y = get_batch(train_ids, RACE["block_size"], RACE["batch_size"], generator)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RACE["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield model


class Between:
    """Runs another training's iterations between our engine's steps, spread evenly, timed apart.

    Our task's ``loss`` is wrapped so that each of our ``ours_steps`` steps first runs the other
    training's share of its ``total`` iterations: the two take turns every few tens of ms, so a busy
    spell of the shared machine slows both alike. Our time is fit()'s wall-clock minus theirs.
    """

    def __init__(self, task, other: Iterator, total: int, ours_steps: int):
        self.other, self.total, self.ours_steps = other, total, ours_steps
        self.done = self.calls = 0
        self.seconds, self.model = 0.0, None
        loss = type(task).loss

        def loss_after_other(model, batch, *, label_smoothing):
            self.calls += 1
            self.run(self.calls * total // ours_steps)
            return loss(task, model, batch, label_smoothing=label_smoothing)

        task.loss = loss_after_other

    def run(self, upto: int) -> None:
        start = time.perf_counter()
        while self.done < min(upto, self.total):
            self.model = next(self.other)
            self.done += 1
        self.seconds += time.perf_counter() - start


def our_task(path: Path, run_dir: Path):
    """qkv's LM task on the same text and split, from a config mapping as a YAML file would give it."""
    data = {"train": [str(path)], "val_fraction": 0.1, "tokenizer": "char", "batch_size": RACE["batch_size"]}
    cfg = from_mapping({"task": "lm", "data": data, **OUR_RECIPE}, source="benchmarks/lm.py")
    task = cfg.spec.make_task(cfg, run_dir)
    task.evaluate = lambda model: {}  # val loss is measured after the timed run, on nanoGPT's batches
    return task


def race(task, train_ids: torch.Tensor, vocab: int, iters: int, steps: int, run_dir: Path):
    """nanoGPT for ``iters`` iterations and our engine for ``steps``, interleaved: (nano, its s, ours, our s)."""
    between = Between(task, nanogpt_training(train_ids, vocab, iters), iters, steps)
    torch.manual_seed(1337)
    train = {**vars(task.cfg.train), "max_steps": steps, "log_every": steps, "eval_every": steps,
             "save_every": steps}
    trainer = Trainer(task, TrainConfig(**train), run_dir, device=torch.device("cpu"))
    start = time.perf_counter()
    trainer.fit()  # batches, schedule, clipping, AdamW, a checkpoint at the end
    ours_s = time.perf_counter() - start - between.seconds
    between.run(iters)  # nothing is left when ours ran every step
    return between.model, between.seconds, trainer.model, ours_s


@torch.no_grad()
def estimate_loss(loss_fn, ids: torch.Tensor, n_batches: int) -> float:
    """nanoGPT's estimate_loss: the mean loss of ``n_batches`` random blocks (seeded: both models see the same)."""
    generator = torch.Generator().manual_seed(2024)
    total = 0.0
    for _ in range(n_batches):
        total += float(loss_fn(*get_batch(ids, RACE["block_size"], RACE["batch_size"], generator)))
    return total / n_batches


def bench_race(path: Path, iters: int, eval_iters: int, burst: int, threads: int) -> None:
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    n = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:n], ids[n:]  # nanoGPT's shakespeare_char/prepare.py split
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task = our_task(path, tmp / "ours")
        offset = task.cfg.model.vocab_size - len(chars)  # our char ids = nanoGPT's + our 3 special tokens
        if not torch.equal(task.valid_ids, val_ids + offset) or not torch.equal(task.train_ids, train_ids + offset):
            raise AssertionError("our train/validation split is not nanoGPT's")
        _, nano_s, _, ours_s = race(task, train_ids, len(chars), burst, burst, tmp / "timing")
        steps = max(1, int(iters * nano_s / ours_s * 0.97))  # as many as fit in nanoGPT's time, 3% margin
        nano, nano_s, ours, ours_s = race(task, train_ids, len(chars), iters, steps, tmp / "race")
    nano.eval()
    ours.eval()
    nano_loss = estimate_loss(lambda x, y: nano(x, y)[1], val_ids, eval_iters)
    ours_loss = estimate_loss(lambda x, y: F.cross_entropy(ours(x + offset).flatten(0, 1), (y + offset).flatten()),
                              val_ids, eval_iters)
    emit_info("lm_race", ours_val_loss=round(ours_loss, 4), ours_s=round(ours_s, 1), ours_steps=steps,
              baseline="nanogpt", baseline_val_loss=round(nano_loss, 4), baseline_s=round(nano_s, 1),
              baseline_steps=iters, eval_batches=eval_iters, threads=threads, timing_burst=burst,
              ours_params=n_params(ours), baseline_params=n_params(nano),
              ours_recipe={k: v for part in OUR_RECIPE.values() for k, v in part.items() if k != "device"})


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads for every part (default 1)")
    p.add_argument("--data", type=Path, default=DATA, help="Tiny Shakespeare input.txt for the race")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if HAVE_HF:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    else:
        emit_info("lm_note", note="Hugging Face transformers is not installed (.venv/bin/pip install transformers): "
                                  "the HF baselines are skipped")
    torch.manual_seed(0)
    if args.quick:
        shapes = [CPU_RECIPE, Shape("baby-gpt", 6, 6, 384, 256, 2)]
        warmup, repeats, new_tokens, race_sizes = 1, 3, 64, (60, 20, 20)
    else:
        shapes, warmup, repeats, new_tokens, race_sizes = [CPU_RECIPE, BABY_GPT], 1, 5, 512, (2000, 200, 200)
    if args.quick:
        emit_info("lm_note", note=f"--quick: baby GPT at batch {shapes[-1].batch}, {new_tokens} new tokens, "
                                  f"race of {race_sizes[0]} iterations with {race_sizes[1]} val batches")
    bench_train(shapes, warmup, repeats, args.threads)
    bench_generate(BABY_GPT, new_tokens, 16, warmup, repeats, args.threads)
    if args.data.is_file():
        bench_race(args.data, *race_sizes, args.threads)
    else:
        emit_info("lm_race", note=f"skipped: {args.data} not found (pass --data PATH)")


if __name__ == "__main__":
    main()
