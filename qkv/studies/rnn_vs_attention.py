"""`qkv study rnn-vs-attention`: why self-attention replaced recurrence, measured.

Four measurements, each a section of the report and a PNG:

1. Gradients: ||dL/dx_t|| of a loss at the last position with respect to the input vector at
   position t, against the distance to the output (vanishing), for causal GRU/LSTM stacks and a
   causal Transformer at initialisation; and the largest gradient norm over training with
   clipping off (exploding), from the synthetic-task runs of part 3.
2. Speed: wall-clock of one training step (forward, backward, Adam) against sequence length,
   and the number of sequential operations (O(n) for recurrence, O(1) for self-attention).
3. A synthetic long-range task (reverse) trained at one parameter budget; accuracy by length.
4. Multi30k: models trained with the library's presets through the engine (qkv.run.train_run),
   plus any existing run directories; BLEU overall and by source-length bucket.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qkv.blocks import BlockConfig, DecoderBlock
from qkv.fileio import atomic_write_text
from qkv.models.rnn_seq2seq import CELLS
from qkv.positional import SinusoidalPositionalEncoding
from qkv.studies import QUICK_NOTE, synthetic
from qkv.studies.plots import grouped_bars, line_plot, markdown_table, panels

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Settings:
    """How much of each measurement to run; ``full()`` made the committed report, ``quick()`` is a check."""

    name: str = "full"
    grad_len: int = 128
    grad_batches: int = 4
    speed_lengths: tuple[int, ...] = (32, 64, 128, 256, 512)
    speed_batch: int = 8
    speed_repeats: int = 3
    task: synthetic.SyntheticTask = synthetic.SyntheticTask("reverse", 20, 10, 200)
    eval_lengths: tuple[int, ...] = (10, 25, 50, 100, 150, 200)
    eval_n: int = 30
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    size: dict = field(default_factory=lambda: dict(d_model=64, n_heads=4, d_ff=192, n_layers=2, d_embed=64,
                                                     d_hidden=128))
    models: tuple[str, ...] = ("gru-none", "lstm-general", "gru-general", "transformer")
    # Multi30k: preset configs trained for multi30k_steps each (0 = none trained), then decoded greedily
    multi30k: tuple[str, ...] = ("multi30k-rnn-gru-none", "multi30k-rnn-gru-additive", "multi30k-de-en")
    multi30k_steps: int = 100
    multi30k_sentences: int = 0       # validation sentences decoded for BLEU (0 = all)
    multi30k_overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> Settings:
        return cls(name="quick", grad_len=32, grad_batches=2, speed_lengths=(16, 32, 64), speed_batch=4,
                   speed_repeats=1, task=synthetic.SyntheticTask("reverse", 12, 4, 24), eval_lengths=(4, 12, 24),
                   eval_n=20, steps=120, batch_size=16,
                   size=dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, d_embed=32, d_hidden=64),
                   multi30k_steps=6, multi30k_sentences=100,
                   multi30k_overrides=("model.d_model=64", "model.d_ff=128", "model.n_encoder_layers=1",
                                       "model.n_decoder_layers=1", "data.max_tokens=1024"))


# -- 1. gradients through depth in time ---------------------------------------------------------
class CausalStack(nn.Module):
    """x (B, n, D) -> logits (B, V) at the last position, with a GRU, LSTM or causal Transformer."""

    def __init__(self, kind: str, d: int, n_layers: int, vocab: int = 32):
        super().__init__()
        self.kind = kind
        if kind == "transformer":
            block = BlockConfig(d_model=d, n_heads=4, d_ff=4 * d, dropout=0.0, norm_first=True)
            self.positions = SinusoidalPositionalEncoding(d)
            self.layers = nn.ModuleList(DecoderBlock(block, cross=False) for _ in range(n_layers))
        else:
            self.rnn = CELLS[kind](d, d, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformer":
            h = x + self.positions(x.shape[1])
            for layer in self.layers:
                h = layer(h)
        else:
            h, _ = self.rnn(x)  # (B, n, D)
        return self.head(h[:, -1])  # (B, V)


def gradient_by_distance(kind: str, *, n: int, d: int, n_layers: int, batches: int, seed: int) -> list[float]:
    """Mean ||dL/dx_t|| over batches of random inputs, indexed by distance n-1-t from the output."""
    torch.manual_seed(seed)
    model = CausalStack(kind, d, n_layers)
    total = torch.zeros(n)
    for _ in range(batches):
        x = torch.randn(8, n, d, requires_grad=True)  # (B, n, D)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 32, (8,)))
        (grad,) = torch.autograd.grad(loss, x)
        total += grad.norm(dim=-1).mean(dim=0)  # (n,)
    return (total / batches).flip(0).tolist()  # index = distance from the output


# -- 2. speed -----------------------------------------------------------------------------------
def step_seconds(model: nn.Module, n: int, batch: int, vocab: int, repeats: int) -> float:
    """Median wall-clock of one training step (forward, backward, Adam) on source = target length n."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    src = torch.randint(synthetic.N_SPECIAL, vocab, (batch, n))
    tgt = torch.randint(synthetic.N_SPECIAL, vocab, (batch, n))
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        model(src, tgt).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sequential_ops(kind: str, n: int, size: dict) -> int:
    """Operations that must run one after another in a teacher-forced step (Table 1 of the paper)."""
    if kind == "transformer":
        return 2 * size["n_layers"]  # each layer waits for the one below, never for another position
    return 2 * n * size.get("n_rnn_layers", 1)  # each position waits for the previous one, encoder and decoder


# -- 4. Multi30k ---------------------------------------------------------------------------------
BUCKETS = ((1, 10), (11, 15), (16, 20), (21, 1000))


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}" if hi < 1000 else f">={lo}"


def bleu_by_bucket(hyps: list[str], refs: list[str], srcs: list[str]) -> dict[str, tuple[float, int]]:
    """Corpus BLEU of the sentences whose source has lo..hi words, per bucket: (BLEU, sentences)."""
    from qkv.metrics import bleu

    out = {"all": (bleu(hyps, refs)["score"], len(hyps))}
    for lo, hi in BUCKETS:
        idx = [i for i, s in enumerate(srcs) if lo <= len(s.split()) <= hi]
        if idx:
            out[bucket_name(lo, hi)] = (bleu([hyps[i] for i in idx], [refs[i] for i in idx])["score"], len(idx))
    return out


def train_multi30k(preset: str, run_dir: Path, *, data_dir: str, s: Settings) -> Path:
    """Train ``configs/{preset}.yaml`` for ``s.multi30k_steps`` steps with the engine (resumes a finished run as is)."""
    from qkv.run import load_config, train_run
    from qkv.rundir import RunDir

    if RunDir(run_dir).weights.is_file():
        log.info("%s: already trained, reusing it", run_dir)
        return run_dir
    steps = s.multi30k_steps
    overrides = [f"data.dir={data_dir}", f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 4)}",
                 f"train.eval_every={steps}", f"train.save_every={steps}", "train.average_last=0",
                 f"data.bleu_sentences={s.multi30k_sentences or 200}", *s.multi30k_overrides]
    cfg = load_config(CONFIGS / f"{preset}.yaml", [o for o in overrides if _applies(o, preset)])
    train_run(cfg, run_dir, device=torch.device("cpu"))
    return run_dir


TRANSFORMER_ONLY = ("model.d_model=", "model.d_ff=", "model.n_heads=")
RNN_ONLY = ("model.d_embed=", "model.d_hidden=", "model.d_attention=")


def _applies(override: str, preset: str) -> bool:
    """Size overrides go only to the family that has the key (the configs are strict)."""
    return not override.startswith(RNN_ONLY if "rnn" not in preset else TRANSFORMER_ONLY)


def evaluate_run(run_dir: Path, *, data_dir: str, n: int) -> dict:
    """Greedy-decode the validation set with a run; BLEU by source-length bucket, parameters, seconds."""
    from qkv.data.parallel import read_parallel
    from qkv.decode import translate
    from qkv.run import load_run

    cfg, model, (src_tok, tgt_tok) = load_run(run_dir)
    d = cfg.data
    corpus = read_parallel(f"{data_dir}/{d.valid}.{d.src_lang}", f"{data_dir}/{d.valid}.{d.tgt_lang}")
    srcs, refs = corpus.src[: n or None], corpus.tgt[: n or None]
    start = time.perf_counter()
    hyps = translate(model, src_tok, tgt_tok, srcs, beam_size=1, batch_size=64)
    seconds = time.perf_counter() - start
    steps = _trained_steps(run_dir)
    return {"run": str(run_dir), "task": cfg.task, "params": synthetic.n_params(model), "steps": steps,
            "decode_s": round(seconds, 1), "bleu": bleu_by_bucket(hyps, refs, srcs)}


def _trained_steps(run_dir: Path) -> int | None:
    from qkv.rundir import RunDir, read_metrics

    path = RunDir(run_dir).metrics
    if not path.is_file():
        return None
    steps = [r.get("step", 0) for r in read_metrics(path)[0]]
    return max(steps, default=None)


# -- the study ------------------------------------------------------------------------------------
PARTS = ("gradients", "synthetic", "speed", "multi30k")


def run_study(out_dir: str | Path, work_dir: str | Path, *, settings: Settings, data_dir: str | None,
              extra_runs: tuple[str, ...] = (), command: str = "", parts: tuple[str, ...] = PARTS) -> Path:
    """Run the measurements in ``parts`` and write ``{out_dir}/rnn-vs-attention.md`` and its PNGs.

    Each part's text is kept in ``{work_dir}/rnn-vs-attention-parts/`` and the report is assembled
    from every part found there, so one part can be rerun (or run later, e.g. Multi30k once its
    runs are trained) without redoing the others. Returns the report's path.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r} (parts: {', '.join(PARTS)})")
    out, work, s = Path(out_dir), Path(work_dir), settings
    out.mkdir(parents=True, exist_ok=True)
    store = work / "rnn-vs-attention-parts"
    command = command or "qkv study rnn-vs-attention"
    for part in (p for p in PARTS if p in parts):
        started = time.perf_counter()
        if part == "gradients":
            text = _gradients_section(out, s)
        elif part == "synthetic":
            trained, text = _synthetic_section(out, s)
            text = _exploding_section(out, trained) + "\n" + text
        elif part == "speed":
            text = _speed_section(out, s)
        else:
            text = _multi30k_section(out, work, s, data_dir, extra_runs)
        minutes = (time.perf_counter() - started) / 60
        note = (f"_Measured by `{command}` ({s.name} settings, torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s)) in {minutes:.1f} min._\n")
        if s.name == "quick":
            note += f"\n> **{QUICK_NOTE}**\n"
        atomic_write_text(store / f"{part}.md", text + "\n" + note)
    body = [(store / f"{p}.md").read_text() for p in PARTS if (store / f"{p}.md").is_file()]
    report = out / "rnn-vs-attention.md"
    atomic_write_text(report, "\n".join([_header(), *body]))
    return report


def _header() -> str:
    return ("# RNN vs self-attention, measured\n\nEvery number below comes from the command named under its "
            "section (CPU; seeded; wall-clock figures depend on the machine and its load). Rerun a command to "
            "reproduce its section; `--part NAME` reruns one part.\n")


def _gradients_section(out: Path, s: Settings) -> str:
    d, n = s.size["d_hidden"] // 2, s.grad_len
    curves = {kind: gradient_by_distance(kind, n=n, d=d, n_layers=2, batches=s.grad_batches, seed=0)
              for kind in ("gru", "lstm", "transformer")}
    line_plot({k: (range(n), v) for k, v in curves.items()}, out / "rnn-vs-attention-vanishing.png", logy=True,
              title=f"||dL/dx_t|| at initialisation (n={n}, d={d}, 2 layers)", xlabel="distance from the output",
              ylabel="gradient norm")
    picks = [t for t in (0, 1, 4, 16, 64, 127, n - 1) if t < n]
    rows = [[k, *[f"{v[t]:.2e}" for t in sorted(set(picks))], f"{v[n - 1] / v[1]:.1e}"] for k, v in curves.items()]
    table = markdown_table(["model", *[f"dist {t}" for t in sorted(set(picks))], f"dist {n - 1} / dist 1"], rows)
    return ("## 1. Vanishing gradients\n\nA loss on the last position of a causal stack (2 layers, random "
            "inputs, random targets, initial weights), and the norm of its gradient with respect to the input "
            "vector t positions earlier; mean over "
            f"{s.grad_batches} batches of 8.\n\n![vanishing](rnn-vs-attention-vanishing.png)\n\n{table}\n\n"
            "Through recurrence the signal from position t is multiplied by one Jacobian per step in between; "
            "through self-attention every position is one step from the output, so the norm does not decay "
            "with distance. (Distance 0 is larger for the Transformer: its own input also reaches the output "
            "through the residual path.)\n")


def _exploding_section(out: Path, trained: dict) -> str:
    series = {k: (range(1, len(r["grad_norms"]) + 1), r["grad_norms"]) for k, r in trained.items()}
    line_plot(series, out / "rnn-vs-attention-grad-norms.png", logy=True, xlabel="step", ylabel="gradient norm",
              title="global gradient norm per step, clipping off (synthetic task)")
    rows = [[k, f"{max(r['grad_norms']):.3g}", f"{statistics.median(r['grad_norms']):.3g}", r["skipped"]]
            for k, r in trained.items()]
    return ("## 2. Exploding gradients\n\nThe global gradient norm of every training step of part 3's runs, "
            "with clipping **off** (a non-finite step would be counted and not applied).\n\n"
            "![gradient norms](rnn-vs-attention-grad-norms.png)\n\n"
            + markdown_table(["model", "largest norm", "median norm", "non-finite steps"], rows) + "\n")


def _speed_section(out: Path, s: Settings) -> str:
    vocab = s.task.vocab_size
    kinds = [k for k in s.models if k != "gru-none"]
    secs: dict[str, list[float]] = {}
    params = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = synthetic.build_model(kind, vocab, s.size)
        params[kind] = synthetic.n_params(model)
        secs[kind] = [step_seconds(model, n, s.speed_batch, vocab, s.speed_repeats) for n in s.speed_lengths]
    lengths = list(s.speed_lengths)
    panels([
        {"series": {k: (lengths, v) for k, v in secs.items()}, "xlabel": "sequence length n", "logx": True,
         "logy": True, "ylabel": "seconds per training step", "title": f"wall-clock (batch {s.speed_batch}, CPU)"},
        {"series": {k: (lengths, [sequential_ops(k, n, s.size) for n in lengths]) for k in kinds},
         "xlabel": "sequence length n", "logx": True, "logy": True, "ylabel": "sequential operations",
         "title": "sequential operations per step"},
    ], out / "rnn-vs-attention-speed.png")
    rows = [[k, params[k], *[f"{t * 1000:.0f}" for t in v]] for k, v in secs.items()]
    table = markdown_table(["model", "params", *[f"n={n} (ms)" for n in lengths]], rows)
    return ("## 4. Speed and sequential operations\n\nOne training step (forward, backward, Adam) with source "
            f"and target of length n, batch {s.speed_batch}, median of {s.speed_repeats} after a warm-up.\n\n"
            f"![speed](rnn-vs-attention-speed.png)\n\n{table}\n\nSequential operations per step: "
            "2 x n x layers for the recurrent encoder-decoder, 2 x layers for the Transformer (Table 1 of the "
            "paper: O(n) against O(1)). On one CPU thread nothing runs in parallel, so the wall-clock reflects "
            "the total arithmetic (recurrence O(n d^2), self-attention O(n^2 d + n d^2)) and how efficient each "
            "kernel is, not the sequential depth; the O(1) depth pays off on hardware that runs the n positions "
            "at once (a GPU), where a recurrent layer still needs n dependent steps.\n")


def _synthetic_section(out: Path, s: Settings) -> tuple[dict, str]:
    trained, accuracy, params = {}, {}, {}
    for kind in s.models:
        torch.manual_seed(0)
        model = synthetic.build_model(kind, s.task.vocab_size, s.size)
        params[kind] = synthetic.n_params(model)
        trained[kind] = synthetic.train(model, s.task, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=1)
        accuracy[kind] = synthetic.accuracy_by_length(model, s.task, list(s.eval_lengths), n=s.eval_n, seed=2)
        log.info("synthetic %s: %s", kind, accuracy[kind])
    lengths = list(s.eval_lengths)
    line_plot({k: (lengths, [a[L]["token_accuracy"] for L in lengths]) for k, a in accuracy.items()},
              out / "rnn-vs-attention-synthetic.png", xlabel="sequence length", ylabel="token accuracy (greedy)",
              title=f"{s.task.kind} task, trained on lengths {s.task.min_len}..{s.task.max_len}")
    rows = [[k, params[k], f"{trained[k]['seconds']:.0f}", f"{trained[k]['losses'][-1]:.3f}",
             *[f"{a[L]['token_accuracy']:.2f} / {a[L]['exact']:.2f}" for L in lengths]] for k, a in accuracy.items()]
    table = markdown_table(["model", "params", "train s", "last loss", *[f"len {L}" for L in lengths]], rows)
    text = (f"## 3. A long-range task: {s.task.kind}\n\nSequences of {s.task.n_symbols} symbols, lengths "
            f"{s.task.min_len}..{s.task.max_len} drawn uniformly, {s.steps} steps of {s.batch_size} sequences "
            f"(Adam lr {s.lr}, warm-up then cosine, clipping off), sizes {s.size}. Models: `gru-none` has no "
            "attention (one fixed context vector), `*-general` are bidirectional recurrent encoders with "
            "Luong's general attention, `transformer` is the encoder-decoder with rotary positions. Scored by "
            f"greedy decoding of {s.eval_n} fresh sequences per length: token accuracy / exact match.\n\n"
            f"![synthetic](rnn-vs-attention-synthetic.png)\n\n{table}\n")
    return trained, text


def _multi30k_section(out: Path, work: Path, s: Settings, data_dir: str | None, extra_runs: tuple[str, ...]) -> str:
    head = "## 5. Multi30k de->en\n\n"
    if data_dir is None or not Path(data_dir, "train.de").is_file():
        return head + f"Skipped: no Multi30k data in {data_dir!r} (`qkv data multi30k`, then `--data data/multi30k`).\n"
    runs = []
    if s.multi30k_steps > 0:
        runs += [train_multi30k(p, work / p, data_dir=data_dir, s=s) for p in s.multi30k]
    runs += [Path(r) for r in extra_runs]
    results = [evaluate_run(r, data_dir=data_dir, n=s.multi30k_sentences) for r in runs]
    names = [f"{Path(r['run']).name} ({r['steps']} steps)" for r in results]
    groups = ["all", *[bucket_name(lo, hi) for lo, hi in BUCKETS]]
    groups = [g for g in groups if g in results[0]["bleu"]]
    grouped_bars(groups, {n: [r["bleu"][g][0] for g in groups] for n, r in zip(names, results)},
                 out / "rnn-vs-attention-multi30k.png", title="Multi30k de->en, greedy", ylabel="BLEU")
    rows = [[n, r["task"], r["params"], *[f"{r['bleu'][g][0]:.1f}" for g in groups], r["decode_s"]]
            for n, r in zip(names, results)]
    sizes = [f"{g}: {results[0]['bleu'][g][1]}" for g in groups]
    trained = (f"Trained with the presets {', '.join(s.multi30k)} in `configs/` through the engine for "
               f"{s.multi30k_steps} steps each (warm-up {max(1, s.multi30k_steps // 4)}, cosine, no checkpoint "
               "averaging), plus the run directories given with `--run`." if s.multi30k_steps > 0 else
               "The run directories given with `--run` (nothing trained here; each run's training command is in "
               "docs/results.md), with the steps each was trained for.")
    return (head + trained + " All decoded greedily on the validation set "
            f"({s.multi30k_sentences or 'all'} sentences); sacreBLEU by source length in words "
            f"(sentences per bucket: {', '.join(sizes)}).\n\n![multi30k](rnn-vs-attention-multi30k.png)\n\n"
            + markdown_table(["run", "task", "params", *[f"BLEU {g}" for g in groups], "decode s"], rows) + "\n")


def settings_for(quick: bool) -> Settings:
    return Settings.quick() if quick else Settings()

