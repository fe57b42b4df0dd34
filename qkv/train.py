"""The training engine shared by every model family.

A *task* (qkv.tasks.*) knows its data, model and loss; the engine knows optimisation: Adam or
AdamW with the paper's schedule or a modern one, gradient accumulation and clipping, bf16
autocast, optional torch.compile, periodic evaluation, early stopping, atomic checkpoints, exact
resume, and a stop with a clear message (keeping the last good checkpoint) on a NaN/Inf loss.

Under torchrun (``world_size`` > 1) the same loop runs on every rank through qkv.distributed:
each rank takes its shard of the epoch's batches, gradients are averaged by DDP (or reduced by
FSDP2), the logged loss is the mean over ranks and ``tokens_per_s`` their sum; every rank
evaluates (so FSDP's collectives line up, and all agree on early stopping); rank 0 alone writes
checkpoints, metrics and the final model, with a barrier after each save. N ranks with
``accumulate`` k train exactly as one process with ``accumulate`` N x k (same global batch).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qkv import checkpoint as ckpt
from qkv import distributed, mfu
from qkv.config import TrainConfig
from qkv.errors import CheckpointError, ConfigError, TrainingError
from qkv.progress import Progress as ProgressLine
from qkv.progress import human_rate
from qkv.rundir import RunDir, read_metrics
from qkv.schedules import multiplier

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the engine needs from a model family."""

    #: ("bleu", "max") or ("loss", "min"): the validation metric for early stopping / best checkpoint
    primary_metric: tuple[str, str]
    #: what the loss's count (its second value) counts, per second: "tokens/s", "sentences/s", "images/s";
    #: the training rate is shown in it (metrics.jsonl keeps the key ``tokens_per_s`` whatever the unit)
    rate_unit: str

    def build_model(self) -> nn.Module: ...

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> list[Any]: ...

    def loss(self, model: nn.Module, batch: Any, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch's tokens (or examples), and how many there were."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint."""

    step: int = 0            # optimizer steps done
    epoch: int = 0
    batch_index: int = 0     # next batch of the epoch
    tokens: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked, or ('auto') on a CUDA device that supports it; else None (fp32)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def layer_depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """id(parameter) -> its index in ``model.layer_groups()``, and the number of groups.

    The contract (house style rule 20): group 0 the embeddings, then one group per layer in depth
    order (an encoder-decoder: the encoder's layers, then the decoder's), the last one the head,
    final norm and output; every trainable parameter exactly once.
    """
    if not callable(getattr(model, "layer_groups", None)):
        raise ConfigError(f"train.layer_lr_decay < 1 needs the model's layer_groups(); "
                          f"{type(model).__name__} has none")
    groups = model.layer_groups()
    depth: dict[int, int] = {}
    for i, group in enumerate(groups):
        for p in group:
            if id(p) in depth:
                raise ValueError(f"{type(model).__name__}.layer_groups() lists a parameter in groups "
                                 f"{depth[id(p)]} and {i}; each parameter belongs to one group")
            depth[id(p)] = i
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in depth]
    if missing:
        raise ValueError(f"{type(model).__name__}.layer_groups() leaves out {missing[0]!r}")
    return depth, len(groups)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on vectors (norms, biases); with ``layer_lr_decay`` < 1 each
    layer group also gets its own ``lr_scale`` (Howard & Ruder 2018; ELECTRA's recipe).

    With ``model.layer_groups()`` = [embeddings, layer 1 .. layer n, head] (see ``layer_depths``),
    group i gets lr * decay^(n + 1 - i): the embeddings decay^(n + 1), layer i decay^(n + 1 - i),
    the head 1. These are the exponents of the name-based depth this replaced (embeddings 0,
    ``layers.i`` i + 1, the rest n + 1), so a BERT fine-tune (SST-2) gets the same groups as before;
    an encoder-decoder now gets one scale per layer of both stacks (n = n_enc + n_dec), not 2.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layered = cfg.layer_lr_decay < 1.0
    depths, n_groups = layer_depths(model) if layered else ({}, 1)
    groups: dict[tuple[int, bool], dict] = {}
    for _, p in named:
        depth = depths.get(id(p), 0)
        decay = p.dim() >= 2 and cfg.optimizer == "adamw"
        key = (depth, decay)
        if key not in groups:
            scale = cfg.layer_lr_decay ** (n_groups - 1 - depth) if layered else 1.0
            groups[key] = {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (sec. 5.3: beta1 0.9, beta2 0.98, eps 1e-9) or AdamW without decay on norms/biases.

    The fused (single-kernel) implementation where PyTorch has one for the parameters' device:
    on CPU it replaces a per-parameter Python loop (0.24 -> 0.05 s a step on MiniLM)."""
    groups = param_groups(model, cfg)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(
        p.is_floating_point() for g in groups for p in g["params"])
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``task`` and writes everything into ``run_dir``."""

    def __init__(self, task: Task, cfg: TrainConfig, run_dir: str | Path, *, device: torch.device,
                 model: nn.Module | None = None, progress: bool = False, rank: int = 0, world_size: int = 1):
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.device, self.rank, self.world_size = device, rank, world_size
        self.model = (model if model is not None else task.build_model()).to(device)
        # DDP wraps self.model; FSDP2 shards it in place (so the optimizer comes after)
        wrapped = distributed.wrap(self.model, cfg.parallel, device) if world_size > 1 else self.model
        self.train_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.optimizer = build_optimizer(self.model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.state = Progress()
        self.show_progress = progress and rank == 0
        self._epoch_batches: tuple[int, list] | None = None
        self._grad_norm_max: float | None = None  # largest pre-clipping gradient norm since the last log line
        self._flops_per_token: float | None = None  # with a known peak: for the MFU figure
        self._peak: float | None = None

    # -- batches ---------------------------------------------------------------------------
    def _batches(self, epoch: int) -> list:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            batches = self.task.train_batches(epoch, rank=self.rank, world_size=self.world_size)
            if not batches:
                raise TrainingError("the training data produced no batches")
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    def _next_batch(self) -> Any:
        s = self.state
        batches = self._batches(s.epoch)
        if s.batch_index >= len(batches):
            s.epoch, s.batch_index = s.epoch + 1, 0
            batches = self._batches(s.epoch)
        batch = batches[s.batch_index]
        s.batch_index += 1
        return batch

    # -- one optimizer step ----------------------------------------------------------------
    def _set_lr(self) -> float:
        cfg = self.cfg
        lr = cfg.lr * multiplier(cfg.schedule, self.state.step, warmup=cfg.warmup_steps, total=cfg.max_steps,
                                 floor=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _step(self) -> tuple[float, int, float]:
        """Accumulate ``cfg.accumulate`` micro-batches, clip, update. Returns (loss, tokens, lr)."""
        self.train_model.train()
        lr = self._set_lr()
        total_loss, total_tokens, k = 0.0, 0, self.cfg.accumulate
        for i in range(k):
            batch = to_device(self._next_batch(), self.device)
            with distributed.gradient_sync(self.train_model, i == k - 1):  # all-reduce on the last micro-batch
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, n_tokens = self.task.loss(self.train_model, batch, label_smoothing=self.cfg.label_smoothing)
                (loss / k).backward()
            total_loss += loss.detach().float() / k
            total_tokens += int(n_tokens)
        # the global batch's loss: the mean over ranks (NaN on one rank is NaN on all, so all skip alike)
        summed_loss, total_tokens = distributed.all_reduce_sum([float(total_loss), total_tokens], self.device)
        value, total_tokens = summed_loss / distributed.world_size(), int(total_tokens)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            return value, total_tokens, lr
        if self.cfg.clip_grad_norm > 0:  # the norm before clipping goes to the log (the largest of the window)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
            self._grad_norm_max = max(self._grad_norm_max or 0.0, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value, total_tokens, lr

    def _bad_loss(self, value: float, skipped: int) -> int:
        step = self.state.step + 1
        if self.cfg.on_nan == "skip" and skipped + 1 < self.cfg.max_skipped:
            log.warning("step %d: loss is %s; skipping this step (%d in a row)", step, value, skipped + 1)
            return skipped + 1
        raise TrainingError(f"step {step}: the loss is {value}; training stopped and {self._kept()}. "
                            "Try a lower train.lr, train.clip_grad_norm, or train.precision=fp32")

    def _kept(self) -> str:
        """Which checkpoint to go back to: the newest whose weights are finite."""
        good = ckpt.good_checkpoint(self.run_dir)
        return f"the last good checkpoint is {good}" if good else "no good checkpoint had been saved yet"

    # -- the loop --------------------------------------------------------------------------
    def fit(self, *, resume: bool = False, restart: bool = False) -> dict[str, Any]:
        """Train to ``max_steps`` (or early stop); returns the last evaluation's metrics.

        ``resume``: from the newest good checkpoint; with none, a CheckpointError unless ``restart``
        (then from step 0)."""
        if resume:
            self._resume(restart=restart)
        self._measure_flops()
        # a bar in a terminal; elsewhere a plain line every log_every steps and at least once a minute
        bar = ProgressLine(desc="train", unit="step", total=self.cfg.max_steps, initial=self.state.step,
                           enabled=self.show_progress, every_n=self.cfg.log_every, every_s=60.0)
        window_tokens, window_start, skipped, metrics = 0, time.perf_counter(), 0, {}
        while self.state.step < self.cfg.max_steps:
            value, tokens, lr = self._step()
            if not math.isfinite(value):
                skipped = self._bad_loss(value, skipped)
                continue
            skipped = 0
            self.state.step += 1
            self.state.tokens += tokens
            window_tokens += tokens
            step = self.state.step
            if step % self.cfg.log_every == 0 or step == self.cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "split": "train", "loss": round(value, 5), "lr": lr,
                          "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1), "epoch": self.state.epoch}
                if self._grad_norm_max is not None:
                    record["grad_norm"] = round(self._grad_norm_max, 4)
                    self._grad_norm_max = None
                if self._flops_per_token is not None:
                    record["mfu"] = round(mfu.mfu(self._flops_per_token, window_tokens / max(elapsed, 1e-9),
                                                  self._peak, distributed.world_size()), 4)
                self._log(record)
                bar.set(loss=f"{value:.3f}", **{self.task.rate_unit: human_rate(record["tokens_per_s"])})
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)
            stop, paused = False, time.perf_counter()
            if step % self.cfg.eval_every == 0 or step == self.cfg.max_steps:
                metrics = self._evaluate()
                stop = distributed.broadcast_flag(self._early_stop(metrics), self.device)
            if step % self.cfg.save_every == 0 or step == self.cfg.max_steps or stop:
                self.save()
            window_start += time.perf_counter() - paused  # tokens/s and MFU count training time only
            if stop:
                log.info("early stopping at step %d: no improvement in %d evaluations", step, self.cfg.patience)
                break
        bar.close()
        self._export()
        return metrics

    def _measure_flops(self) -> None:
        """Model FLOPs per token of the next training batch, when a peak is known (see qkv.mfu)."""
        self._peak = mfu.peak_flops(self.cfg.peak_tflops, self.device, self.amp_dtype)
        if self._peak is None:
            return
        s = self.state
        batches = self._batches(s.epoch)
        batch = to_device(batches[min(s.batch_index, len(batches) - 1)], self.device)
        counted = {}

        def forward():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                counted["tokens"] = self.task.loss(self.model, batch, label_smoothing=0.0)[1]

        was_training = self.model.training
        self.model.eval()  # no dropout: the generators stay where exact resume expects them
        flops = mfu.forward_flops(forward)
        self.model.train(was_training)
        self._flops_per_token = mfu.training_flops_per_token(flops, int(counted["tokens"]))
        log.info("MFU: %.3g model FLOPs per token, peak %.3g TFLOP/s per device", self._flops_per_token,
                 self._peak / 1e12)

    def _evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model)
        self.model.train(was_training)
        if not metrics:  # a task with nothing held out (e.g. data.train_on_valid) evaluates nothing
            return metrics
        self._log({"step": self.state.step, "split": "valid", **metrics})
        log.info("step %d: %s", self.state.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                          if isinstance(v, (int, float))))
        return metrics

    def _early_stop(self, metrics: dict[str, float]) -> bool:
        name, mode = self.task.primary_metric
        if name not in metrics:
            return False
        value, s = metrics[name], self.state
        better = s.best is None or (value > s.best if mode == "max" else value < s.best)
        if better:
            s.best, s.best_step, s.bad_evals = value, s.step, 0
        else:
            s.bad_evals += 1
        return self.cfg.patience > 0 and s.bad_evals >= self.cfg.patience

    # -- persistence -----------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(RunDir(self.run_dir).metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    writer.add_scalar(f"{record['split']}/{key}", value, record["step"])
            writer.flush()

    def _tensorboard(self):
        """A TensorBoard writer in run_dir/tensorboard when the tensorboard package is installed."""
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = None
            else:
                self._writer = SummaryWriter(str(RunDir(self.run_dir).tensorboard))
        return self._writer

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint (the gathering is collective under FSDP); all ranks wait for it."""
        s, sharded = self.state, distributed.is_sharded(self.model)
        weights = distributed.full_state_dict(self.model) if self.rank == 0 or sharded else {}
        optimizer = distributed.optimizer_state_dict(self.model, self.optimizer) if self.rank == 0 or sharded else {}
        rngs = distributed.gather_objects(ckpt.rng_state())  # each rank's generators, for exact resume
        if distributed.broadcast_flag(self.rank == 0 and not ckpt.all_finite(weights), self.device):
            raise TrainingError(f"step {s.step}: the weights are not finite (NaN or Inf), so no checkpoint was "
                                f"saved; training stopped and {self._kept()}. Try a lower train.lr, "
                                "train.clip_grad_norm, or train.precision=fp32")
        path = None
        if self.rank == 0:
            progress = {**{k: v for k, v in vars(s).items() if k != "history"}, "world_size": self.world_size}
            train_state = {"optimizer": optimizer, "rng": rngs[0], "rng_ranks": rngs, "progress": progress}
            protect = {ckpt.checkpoint_name(s.best_step)} if s.best_step is not None else set()
            meta = {"epoch": s.epoch, "tokens": s.tokens, "best": s.best, "best_step": s.best_step,
                    "world_size": self.world_size}
            path = ckpt.save_checkpoint(self.run_dir, s.step, weights, train_state, meta,
                                        keep=self.cfg.keep_checkpoints, protect=protect)
        distributed.barrier()  # no rank runs ahead of a checkpoint that is not complete
        return path

    def _resume(self, *, restart: bool) -> None:
        if self.rank == 0:
            ckpt.cleanup_partial(self.run_dir)
        distributed.barrier()
        last = resume_point(RunDir(self.run_dir), restart=restart)
        if last is None:  # asked to start over (or restarted by torchrun before the first checkpoint)
            log.warning("%s: no good checkpoint to resume from; training from step 0", self.run_dir)
            self._truncate_metrics(0)
            return
        self._load_weights(last / ckpt.WEIGHTS)
        state = ckpt.load_train_state(last)
        distributed.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        progress = dict(state["progress"])
        saved_world = progress.pop("world_size", 1)
        for key, value in progress.items():
            setattr(self.state, key, value)
        if saved_world != self.world_size:  # batch_index counts this rank's batches: convert via the global count
            consumed = self.state.batch_index * saved_world
            self.state.batch_index = -(-consumed // self.world_size)
            if consumed % self.world_size:
                log.warning("%s: %d batches of the epoch done by %d processes cannot be split evenly among %d; "
                            "skipping to the next whole step", last, consumed, saved_world, self.world_size)
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != self.world_size:
            log.warning("%s was saved by %d processes, resumed by %d: the global batch (batch x processes x "
                        "train.accumulate) changes unless accumulate does, and dropout draws differ from an "
                        "uninterrupted run", last, len(ranks), self.world_size)
        ckpt.set_rng_state(ranks[self.rank] if len(ranks) == self.world_size else state["rng"])
        self._truncate_metrics(self.state.step)
        log.info("resumed from %s (step %d)", last, self.state.step)

    def _load_weights(self, path: Path) -> None:
        if not distributed.is_sharded(self.model):
            ckpt.load_weights(self.model, path)
            return
        tensors = ckpt.read_weights(path)
        missing, unexpected = distributed.unique_names(self.model) - set(tensors), set(tensors) - set(
            self.model.state_dict())
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not fit this model (missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(unexpected)[:3]})")
        distributed.load_full_state_dict(self.model, tensors)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again), and a
        last line a kill left half-written."""
        run = RunDir(self.run_dir)
        if self.rank != 0 or not run.metrics.exists():
            return
        records, _ = read_metrics(run.metrics)
        kept = [json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step]
        ckpt.atomic_write_bytes(run.metrics, "".join(kept).encode())

    def _export(self) -> None:
        """run_dir/model.safetensors: the average of the last k checkpoints, or the best, or the last."""
        sharded = distributed.is_sharded(self.model)
        if self.rank != 0 and not sharded:
            distributed.barrier()
            return
        saved = ckpt.list_checkpoints(self.run_dir)
        if self.cfg.average_last > 1 and len(saved) > 1:
            chosen = saved[-self.cfg.average_last:]
            distributed.load_full_state_dict(self.model, ckpt.average_weights(chosen))
            log.info("final model: average of %s", ", ".join(p.name for p in chosen))
        elif self.cfg.patience > 0 and self.state.best_step is not None:
            best = RunDir(self.run_dir).checkpoint(self.state.best_step)
            if best.exists():
                self._load_weights(best / ckpt.WEIGHTS)
                log.info("final model: best checkpoint %s", best.name)
        weights = distributed.full_state_dict(self.model)  # collective under FSDP
        if self.rank == 0:
            ckpt.save_weights(weights, RunDir(self.run_dir).weights)
        distributed.barrier()


# -- resuming: which checkpoint, checked before anything is written ---------------------------------
def resume_point(run: RunDir, *, restart: bool) -> Path | None:
    """The newest good checkpoint (finite weights) to resume from; None to train from step 0.

    With no good checkpoint, a CheckpointError unless ``restart``: a finished run whose
    checkpoints/ was deleted is not silently retrained over its final model."""
    latest, good = ckpt.latest_checkpoint(run.path), ckpt.good_checkpoint(run.path)
    if good is not None and good != latest:
        log.warning("%s: its weights are not finite (NaN or Inf); resuming from %s", latest, good)
    if good is not None or restart:
        return good
    what = "its checkpoints hold no finite weights" if latest else f"{run.checkpoints} holds no complete checkpoint"
    finished = f" (its final {run.weights.name} would be trained over)" if run.weights.exists() else ""
    raise CheckpointError(f"{run.path}: nothing to resume from: {what}{finished}; pass --restart as well to train "
                          "it again from step 0 with its stored config")


def check_resume(run: RunDir, model: nn.Module, *, restart: bool) -> Path | None:
    """Read and check what a resume will use, writing nothing: the checkpoint's weights against
    ``model`` (names and shapes), its training state, and metrics.jsonl. Returns the checkpoint."""
    last = resume_point(run, restart=restart)
    if last is not None:
        ckpt.load_weights(model, last / ckpt.WEIGHTS)
        ckpt.load_train_state(last)
    if run.metrics.exists():
        read_metrics(run.metrics)
    return last
