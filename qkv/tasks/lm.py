"""Language modelling: text -> characters or byte-level BPE -> a decoder-only Transformer.

Loss: next-token cross-entropy. Validation: the mean loss over a fixed set of random blocks of
the held-out text (as nanoGPT estimates it), with perplexity and, for character models, bits
per character.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv.config import check_ranges, ranged
from qkv.data.lm import RandomBlocks, read_text, read_texts, split_ids
from qkv.data.tokenizer import CharTokenizer, load_tokenizer, train_bpe
from qkv.errors import ConfigError, DataError
from qkv.generate import SamplingConfig
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.rundir import RunDir
from qkv.tasks import TaskSpec, register
from qkv.tasks.inference import LoadedRun, as_list, flagged

log = logging.getLogger(__name__)

TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class LMData:
    """Where the text is and how it becomes batches."""

    train: list[str] = field(default_factory=lambda: ["data/input.txt"])  # one or more UTF-8 text files
    valid: str | None = None         # a separate validation file; else the last val_fraction of train
    val_fraction: float = ranged(0.1, gt=0.0, lt=1.0)
    tokenizer: str = "char"          # "char" or "bpe" (byte-level BPE, GPT-2's scheme)
    vocab_size: int = ranged(4096, ge=1)  # bpe only
    batch_size: int = ranged(64, ge=1)
    eval_batches: int = ranged(200, ge=1)  # random validation blocks averaged per evaluation (nanoGPT's eval_iters)
    batches_per_epoch: int = ranged(1000, ge=1)  # random batches drawn per 'epoch' (only names the sampling stream)
    init_from: str | None = None     # a run directory (lm) whose weights and tokenizer this run starts from

    def __post_init__(self):
        check_ranges(self)
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")


def build_tokenizer(data: LMData, train_text: str, valid_text: str | None):
    if data.tokenizer == "char":  # the vocabulary of all the text, as nanoGPT's shakespeare_char builds it
        return CharTokenizer.from_text(train_text + (valid_text or ""))
    return train_bpe([train_text], data.vocab_size, byte_level=True)


class LMTask:
    primary_metric = ("loss", "min")
    rate_unit = "tokens/s"

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        data = cfg.data
        text = read_texts(data.train)
        valid_text = read_text(data.valid) if data.valid else None
        self.init_from = None if resume else data.init_from  # weights loaded by build_model, fresh runs only
        if resume:
            self.tokenizer = load_tokenizer(RunDir(run_dir).file(TOKENIZER))
        else:
            if data.init_from is not None:  # the source's architecture and tokenizer (qkv.tasks.init_from)
                cfg = start_from(cfg)
            self.tokenizer = (load_artifacts(cfg, data.init_from) if data.init_from is not None
                              else build_tokenizer(data, text, valid_text))
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(RunDir(run_dir).file(TOKENIZER))
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        if valid_text is None:
            self.train_ids, self.valid_ids = split_ids(ids, data.val_fraction)
        else:
            self.train_ids = ids
            self.valid_ids = torch.tensor(self.tokenizer.encode(valid_text), dtype=torch.long)
        t = self.tokenizer
        self.cfg = replace(cfg, model=replace(cfg.model, vocab_size=t.vocab_size, pad_id=t.pad_id, bos_id=t.bos_id,
                                              eos_id=t.eos_id))
        self.chars_per_token = len(text) / max(len(ids), 1)
        block = self.cfg.model.block_size
        self.valid_blocks = RandomBlocks(self.valid_ids, block_size=block, batch_size=data.batch_size,
                                         n_batches=data.eval_batches, seed=cfg.train.seed + 1, name="validation text")
        RandomBlocks(self.train_ids, block_size=block, batch_size=1, n_batches=1, seed=0, name="training text")
        log.info("language-model data: %d training tokens, %d validation tokens, vocab %d", len(self.train_ids),
                 len(self.valid_ids), t.vocab_size)

    def build_model(self) -> DecoderOnly:
        """The run's model; a fresh run with ``data.init_from`` starts from the source run's weights."""
        model = DecoderOnly(self.cfg.model)
        if self.init_from is not None:
            from qkv.tasks.init_from import load_source_weights

            load_source_weights(model, self.init_from)
        return model

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> RandomBlocks:
        d = self.cfg.data  # the epoch's batches_per_epoch batches dealt out to the ranks (rounded up)
        return RandomBlocks(self.train_ids, block_size=self.cfg.model.block_size, batch_size=d.batch_size,
                            n_batches=-(-d.batches_per_epoch // world_size), seed=self.cfg.train.seed, epoch=epoch,
                            rank=rank, world_size=world_size)

    def loss(self, model, batch: dict, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        logits = model(batch["x"])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["y"].reshape(-1),
                               label_smoothing=label_smoothing)
        return loss, batch["y"].numel()

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        total = 0.0
        for batch in self.valid_blocks:
            loss, _ = self.loss(model, {k: v.to(device) for k, v in batch.items()}, label_smoothing=0.0)
            total += float(loss)
        loss = total / len(self.valid_blocks)
        return {"loss": loss, **text_scores(loss, self.tokenizer, chars_per_token=self.chars_per_token)}


def start_from(cfg):
    """``cfg`` with the model section of the ``data.init_from`` run (ConfigError naming what differs)."""
    from qkv.tasks.init_from import model_from_source, read_source

    source = read_source(cfg.data.init_from, "lm")
    model = model_from_source(cfg, source, init_from=cfg.data.init_from, vocab_fields=("tokenizer", "vocab_size"))
    return replace(cfg, model=model, data=replace(cfg.data, tokenizer=source.data.tokenizer,
                                                  vocab_size=source.data.vocab_size))


def encode_file_text(tokenizer, content: str, *, name: str) -> list[int]:
    """``tokenizer.encode(content)``; a character the vocabulary lacks is an error naming FILE:LINE:COLUMN."""
    try:
        return tokenizer.encode(content)
    except DataError:
        for lineno, line in enumerate(content.split("\n"), start=1):
            try:
                tokenizer.encode(line)
            except DataError as err:
                column = next((i for i, ch in enumerate(line, start=1) if _unknown(tokenizer, ch)), None)
                where = f"{name}:{lineno}" + (f":{column}" if column else "")
                message = re.sub(r"; first at index \d+$", "", str(err).removeprefix("text: "))
                raise DataError(f"{where}: {message}") from None
        raise


def _unknown(tokenizer, ch: str) -> bool:
    try:
        tokenizer.encode(ch)
    except DataError:
        return True
    return False


def text_scores(loss: float, tokenizer, *, chars_per_token: float) -> dict[str, float]:
    """Perplexity per token, and bits per character (for BPE: nats per token spread over its characters)."""
    ppl = math.exp(loss) if loss < 700 else float("inf")
    bpc = loss / math.log(2) if isinstance(tokenizer, CharTokenizer) else loss / chars_per_token / math.log(2)
    return {"perplexity": ppl, "bits_per_char": bpc}


# -- a trained run at work (qkv.load) --------------------------------------------------------------
class LanguageModelRun(LoadedRun):
    """A trained language model: generate (or stream) text, score a text file, attention over a text."""

    kind = "language-model"
    primary_metric = LMTask.primary_metric
    predicts = ("generate",)
    exporters = {"hf": "qkv.export.hf:decoder_only", "onnx": "qkv.export.onnx:language_model",
                 "ctranslate2": "qkv.export.ct2:language_model"}
    evaluate_options = ("text",)

    def sampling(self, **given) -> SamplingConfig:
        """The run's decode section (a SamplingConfig), with the values given (not None)."""
        try:
            return replace(self.cfg.decode, **{k: v for k, v in given.items() if v is not None})
        except ValueError as err:  # "temperature must be ..." -> "--temperature must be ..."
            name, _, rest = str(err).partition(" ")
            raise flagged(ConfigError(str(err)), f"--{name.replace('_', '-')} {rest}") from None

    def prompt_ids(self, prompt: str) -> list[int]:
        try:
            return self.artifacts.encode(prompt)
        except DataError as err:
            message = str(err).removeprefix("text: ")
            raise flagged(DataError(f"prompt: {message}"), f"--prompt: {message}") from None

    def stream(self, prompt: str = "", *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        """An iterator over the pieces of text that continue ``prompt``, as each token is sampled.

        Settings and prompt are checked now, before the first token. The pieces joined equal
        ``generate([prompt], ...)[0]`` without the prompt.
        """
        sampling = self.sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        ids = self.prompt_ids(prompt)
        return self._pieces(ids, sampling, torch.Generator(device=self.device).manual_seed(seed))

    def _pieces(self, ids: list[int], sampling, generator):
        from qkv.generate import generate

        new: list[int] = []
        shown = ""
        for step in generate(self.model, [ids], sampling, generator=generator):
            if step[0] is None:
                break
            new.append(step[0])
            text = self.artifacts.decode(new)  # decode the whole tail: a BPE token may complete a character
            yield text[len(shown):]
            shown = text

    def generate(self, prompts, *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[str]:
        """Each prompt followed by its sampled continuation; the prompts go through as one batch.

        Defaults: the run's decode section. The same seed gives the same text (one prompt: what
        ``qkv generate --seed`` prints).
        """
        from qkv.generate import generate

        prompts = as_list(prompts, name="prompts")
        sampling = self.sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        ids = [self.prompt_ids(p) for p in prompts]
        if not ids:
            return []
        generator = torch.Generator(device=self.device).manual_seed(seed)
        new: list[list[int]] = [[] for _ in ids]
        for step in generate(self.model, ids, sampling, generator=generator):
            for row, token in enumerate(step):
                if token is not None:
                    new[row].append(token)
        return [p + self.artifacts.decode(n) for p, n in zip(prompts, new)]

    def _evaluate(self, *, text=None) -> dict:
        """Loss, perplexity and bits per character on a UTF-8 text file (sliding windows of block_size)."""
        from qkv.data.lm import read_text
        from qkv.generate import perplexity_on_ids

        if not text:
            raise ConfigError(f"{self.run_dir} is a language-model run: evaluate needs a text file (--text FILE)")
        content = read_text(text)
        ids = encode_file_text(self.artifacts, content, name=str(text))
        if len(ids) < 2:
            raise ConfigError(f"--text {text}: too short to evaluate ({len(ids)} tokens)")
        scored = perplexity_on_ids(self.model, ids, block_size=self.cfg.model.block_size)
        scores = text_scores(scored["loss"], self.artifacts, chars_per_token=len(content) / len(ids))
        return {"text": str(text), "tokens": scored["tokens"], "characters": len(content), "loss": scored["loss"],
                **scores}

    def _attention(self, text: str, layers):
        from qkv.attention_maps import AttentionSet, groups_of, token_labels
        from qkv.record import AttentionRecord

        ids = self.artifacts.encode(text)
        notes = []
        block = self.cfg.model.block_size
        if len(ids) > block:
            notes.append(f"the text has {len(ids)} tokens; the model's context is {block}: its last {block} are shown")
            ids = ids[-block:]
        record = AttentionRecord(layers)
        self.model(torch.tensor([ids], device=self.device), record=record)  # (1, T) -> (1, T, V)
        labels = token_labels(self.artifacts, ids)
        return AttentionSet(f"{len(ids)} tokens", groups_of(record.weights, {"decoder": (labels, labels)}),
                            notes=notes)


def load_artifacts(cfg, run_dir):
    """The run's tokenizer, which must fit the model's vocabulary (found at load, before any output)."""
    from qkv.tasks.inference import check_vocabulary

    path = RunDir(run_dir).file(TOKENIZER)
    tokenizer = load_tokenizer(path)
    check_vocabulary(path, tokenizer.vocab_size, cfg.model.vocab_size, key="model.vocab_size")
    return tokenizer


register(TaskSpec(
    name="lm",
    data_config=LMData,
    model_config=DecoderOnlyConfig,
    decode_config=SamplingConfig,  # the decode: section holds qkv generate's defaults
    make_task=LMTask,
    build_model=lambda cfg: DecoderOnly(cfg.model),
    load_artifacts=lambda cfg, run_dir: load_artifacts(cfg, run_dir),
    inference=LanguageModelRun,
))
