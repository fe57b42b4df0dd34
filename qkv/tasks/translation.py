"""Translation: parallel text -> BPE -> the encoder-decoder Transformer -> BLEU.

Data: two aligned files ``{dir}/{split}.{lang}`` or a TSV with two chosen columns. Source ids
are ``tokens + [EOS]``; the decoder reads ``[BOS] + y`` and predicts ``y + [EOS]`` (sec. 3).
Loss: cross-entropy with label smoothing (sec. 5.4) over non-padding target tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv.config import check_ranges, ranged
from qkv.data.batching import collate_pairs, token_batches
from qkv.data.parallel import ParallelCorpus, read_parallel, read_parallel_tsv
from qkv.data.split import held_out
from qkv.data.tokenizer import TextTokenizer, train_translation_tokenizers
from qkv.errors import ConfigError, DataError
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.rundir import RunDir
from qkv.tasks import TaskSpec, register
from qkv.tasks.inference import LoadedRun, as_list

log = logging.getLogger(__name__)

LENGTH_FACTOR = 4  # translate: sources up to 4 x the longest training pair (data.max_len tokens)
SRC_TOKENIZER, TGT_TOKENIZER = "src_tokenizer.json", "tgt_tokenizer.json"


@dataclass(frozen=True)
class TranslationData:
    """Where the parallel text is and how it becomes batches."""

    dir: str = "data/multi30k"       # aligned files {dir}/{train}.{src_lang} and {dir}/{train}.{tgt_lang}
    train: str = "train"             # the training split's file stem in dir
    valid: str | None = "val"        # the validation split's stem in dir; null = carve it from train
    src_lang: str = "en"             # the source files' extension (and language)
    tgt_lang: str = "de"             # the target files' extension (and language)
    tsv_train: str | None = None     # instead: a TSV file with columns src_column and tgt_column
    tsv_valid: str | None = None     # the validation TSV; unset with tsv_train = carve it from tsv_train
    src_column: str | int = "src"    # the TSVs' source column: a header name, or a 0-based index
    tgt_column: str | int = "tgt"    # the TSVs' target column: a header name, or a 0-based index
    header: bool = True              # the TSVs' first line names the columns; false = every line is a pair
    valid_fraction: float = ranged(0.05, gt=0.0, lt=1.0)  # share of the training pairs carved for validation
    vocab_size: int = ranged(8000, ge=1)
    joint_vocab: bool = True         # one BPE vocabulary for both languages (needed to share embeddings)
    min_frequency: int = ranged(2, ge=1)
    max_tokens: int = ranged(4096, ge=2)  # tokens per batch and side, padding included
    max_len: int = ranged(256, ge=1)  # tokens per sentence; longer ones follow on_long
    on_long: str = "error"           # "error" (names the line), "skip" or "truncate"
    max_chars: int = ranged(4096, ge=1)  # longer lines are reported before tokenising
    skip_empty: bool = False         # drop pairs with an empty side (counted) instead of failing
    bleu_sentences: int = ranged(0, ge=0, note="0 = all")  # validation sentences translated for BLEU in training
    init_from: str | None = None     # a translation run directory whose weights and tokenizers this run starts from

    def __post_init__(self):
        check_ranges(self)
        if self.on_long not in ("error", "skip", "truncate"):
            raise ValueError(f"on_long must be 'error', 'skip' or 'truncate', got {self.on_long!r}")
        if self.max_tokens < self.max_len + 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be > max_len={self.max_len}")


@dataclass(frozen=True)
class TranslationDecode:
    """Sec. 6.1: beam size 4, length penalty alpha = 0.6, maximum output length input + 50."""

    beam_size: int = ranged(4, ge=1)
    length_penalty: float = ranged(0.6, ge=0.0, le=5.0)  # alpha of ((5 + |Y|) / 6)^alpha (GNMT); 0 = none
    max_len_b: int = ranged(50, ge=0)
    batch_size: int = ranged(64, ge=1)
    eval_beam_size: int = ranged(1, ge=1)  # beam used for BLEU during training (1 = greedy, fast)

    def __post_init__(self):
        check_ranges(self)


def carves_valid(data: TranslationData) -> bool:
    """Whether the validation pairs are carved from the training data: no validation file is named."""
    return data.tsv_valid is None if data.tsv_train is not None else data.valid is None


def split_files(data: TranslationData, split: str) -> tuple[str, str]:
    """How the two sides of a split are named in messages: file names, or TSV file + column (a
    carved validation split is named by the training files, whose line numbers it keeps)."""
    split = "train" if carves_valid(data) else split
    tsv = data.tsv_train if split == "train" else data.tsv_valid
    if tsv is not None:
        return f"{tsv} (column {data.src_column!r})", f"{tsv} (column {data.tgt_column!r})"
    stem = Path(data.dir) / (data.train if split == "train" else data.valid)
    return f"{stem}.{data.src_lang}", f"{stem}.{data.tgt_lang}"


def read_split(data: TranslationData, split: str) -> ParallelCorpus:
    """One named split: the TSV's two columns, or the aligned pair of files ``{dir}/{stem}.{lang}``."""
    tsv = data.tsv_train if split == "train" else data.tsv_valid
    if tsv is not None:
        return read_parallel_tsv(tsv, src_col=data.src_column, tgt_col=data.tgt_column, header=data.header,
                                 max_chars=data.max_chars, skip_empty=data.skip_empty,
                                 keys=("data.src_column", "data.tgt_column"))
    src, tgt = split_files(data, split)
    if split != "train":
        check_valid_files(data, Path(src), Path(tgt))
    return read_parallel(src, tgt, max_chars=data.max_chars, skip_empty=data.skip_empty)


def check_valid_files(data: TranslationData, src: Path, tgt: Path) -> None:
    """A missing validation file names the key to set, and the splits the folder does have."""
    missing = next((p for p in (src, tgt) if not p.exists()), None)
    if missing is None or not Path(data.dir).is_dir():
        return
    stems = sorted({p.stem for p in Path(data.dir).glob(f"*.{data.src_lang}")
                    if (p.parent / f"{p.stem}.{data.tgt_lang}").exists()} - {data.train})
    found = f"{data.dir} has the split{'s' if len(stems) > 1 else ''} {', '.join(stems)}: set data.valid={stems[0]}" \
        if stems else f"{data.dir} has no other split"
    raise DataError(f"data.valid: no such file {missing}; {found}, or data.valid=null to carve "
                    f"data.valid_fraction={data.valid_fraction:g} of the training pairs")


def read_splits(data: TranslationData, run_dir: Path, *, seed: int,
                resume: bool) -> tuple[ParallelCorpus, ParallelCorpus]:
    """(training, validation) pairs: the validation file's, or a seeded share carved from the training
    pairs and recorded in the run (qkv.data.split), never another data set's."""
    train = read_split(data, "train")
    if not carves_valid(data):
        return train, read_split(data, "valid")
    held = held_out(run_dir, len(train), fraction=data.valid_fraction, seed=seed, source=train.source,
                    resume=resume)
    (pairs, valid_pairs), (lines, valid_lines) = held.split(train.pairs), held.split(list(train.lines))
    return (replace(train, pairs=pairs, lines=tuple(lines)),
            ParallelCorpus(pairs=valid_pairs, lines=tuple(valid_lines), source=f"{train.source} (carved)"))


def encode_corpus(corpus: ParallelCorpus, src_tok: TextTokenizer, tgt_tok: TextTokenizer,
                  data: TranslationData, names: tuple[str, str]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair (source + EOS, target without specials); over-long pairs per on_long."""
    src_ids = src_tok.encode_batch(corpus.src)
    tgt_ids = tgt_tok.encode_batch(corpus.tgt)
    out, dropped = [], 0
    for s, t, line in zip(src_ids, tgt_ids, corpus.lines):
        if len(s) + 1 > data.max_len or len(t) + 1 > data.max_len:
            if data.on_long == "error":
                name, n = (names[0], len(s) + 1) if len(s) + 1 > data.max_len else (names[1], len(t) + 1)
                raise DataError(f"{name}:{line}: sentence of {n} tokens is longer than data.max_len="
                                f"{data.max_len} (raise it, or set data.on_long=skip or truncate)")
            if data.on_long == "skip":
                dropped += 1
                continue
            s, t = s[: data.max_len - 1], t[: data.max_len - 1]
        out.append((s + [src_tok.eos_id], t))
    if dropped:
        log.warning("%s: skipped %d pairs longer than %d tokens", corpus.source, dropped, data.max_len)
    if not out:
        raise DataError(f"{corpus.source}: no usable sentence pairs")
    return out


def model_config(cfg, src_tok: TextTokenizer, tgt_tok: TextTokenizer) -> TransformerConfig:
    """The model section with vocabulary sizes and special ids filled in from the tokenizers, and a
    position table (a model with one: ``max_len``) long enough for the longest input and output."""
    filled = dict(src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size, pad_id=tgt_tok.pad_id,
                  bos_id=tgt_tok.bos_id, eos_id=tgt_tok.eos_id)
    if "max_len" in {f.name for f in fields(cfg.model)}:  # a recurrent model has no positions
        filled["max_len"] = max(cfg.model.max_len, cfg.data.max_len + cfg.decode.max_len_b + 1)
    return replace(cfg.model, **filled)


def load_tokenizers(run_dir: Path, *, model=None) -> tuple[TextTokenizer, TextTokenizer]:
    """The run's two tokenizers; given the run's ``model`` config, each must fit its vocabulary size."""
    from qkv.tasks.inference import check_vocabulary

    run = RunDir(run_dir)
    tokenizers = TextTokenizer.load(run.file(SRC_TOKENIZER)), TextTokenizer.load(run.file(TGT_TOKENIZER))
    for name, tok, key in zip((SRC_TOKENIZER, TGT_TOKENIZER), tokenizers, ("src_vocab_size", "tgt_vocab_size")):
        if model is not None and hasattr(model, key):
            check_vocabulary(run.file(name), tok.vocab_size, getattr(model, key), key=f"model.{key}")
    return tokenizers


class TranslationTask:
    """Reads and validates all data up front, so bad input fails before the first step."""

    primary_metric = ("bleu", "max")
    rate_unit = "tokens/s"  # target tokens

    def __init__(self, cfg, run_dir: Path, *, resume: bool = False):
        data = cfg.data
        train, valid = read_splits(data, Path(run_dir), seed=cfg.train.seed, resume=resume)
        self.init_from = None if resume else data.init_from  # weights loaded by build_model, fresh runs only
        if resume:
            self.src_tok, self.tgt_tok = load_tokenizers(run_dir)
        elif data.init_from is not None:  # the source's architecture and tokenizers (qkv.tasks.init_from)
            cfg = start_from(cfg)
            self.src_tok, self.tgt_tok = load_tokenizers(Path(data.init_from), model=cfg.model)
        else:
            self.src_tok, self.tgt_tok = train_translation_tokenizers(
                train.pairs, data.vocab_size, joint=data.joint_vocab, min_frequency=data.min_frequency)
        if not resume:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.src_tok.save(RunDir(run_dir).file(SRC_TOKENIZER))
            self.tgt_tok.save(RunDir(run_dir).file(TGT_TOKENIZER))
        self.cfg = replace(cfg, model=model_config(cfg, self.src_tok, self.tgt_tok))
        self.train_ids = encode_corpus(train, self.src_tok, self.tgt_tok, data, split_files(data, "train"))
        self.valid_ids = encode_corpus(valid, self.src_tok, self.tgt_tok, data, split_files(data, "valid"))
        self.valid = valid
        log.info("translation data: %d training pairs, %d validation pairs, vocab %d/%d", len(self.train_ids),
                 len(self.valid_ids), self.src_tok.vocab_size, self.tgt_tok.vocab_size)

    def build_model(self) -> Transformer:
        """The run's model; a fresh run with ``data.init_from`` starts from the source run's weights."""
        model = Transformer(self.cfg.model)
        if self.init_from is not None:
            from qkv.tasks.init_from import load_source_weights

            load_source_weights(model, self.init_from)
        return model

    def _batches(self, pairs, *, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> list[dict]:
        lengths = [(len(s), len(t) + 1) for s, t in pairs]
        index_batches = token_batches(lengths, self.cfg.data.max_tokens, shuffle=shuffle, seed=self.cfg.train.seed,
                                      epoch=epoch, rank=rank, world_size=world_size)
        m = self.cfg.model
        return [collate_pairs([pairs[i] for i in idx], pad_id=m.pad_id, bos_id=m.bos_id, eos_id=m.eos_id)
                for idx in index_batches]

    def train_batches(self, epoch: int, *, rank: int, world_size: int) -> list[dict]:
        return self._batches(self.train_ids, epoch=epoch, shuffle=True, rank=rank, world_size=world_size)

    def loss(self, model, batch: dict, *, label_smoothing: float) -> tuple[torch.Tensor, int]:
        if type(model) is Transformer:  # bare: the fused chunked projection on the real targets, same value
            from qkv.models.transformer import teacher_forcing_loss

            return teacher_forcing_loss(model, batch["src"], batch["tgt_in"], batch["tgt_out"],
                                        label_smoothing=label_smoothing)
        # wrapped (DDP, FSDP2, torch.compile: their hooks run on forward only) or another family
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        return sequence_loss(logits, batch["tgt_out"], pad_id=self.cfg.model.pad_id,
                             label_smoothing=label_smoothing)

    def evaluate(self, model) -> dict[str, float]:
        from qkv.decode import translate
        from qkv.metrics import bleu

        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        for batch in self._batches(self.valid_ids, epoch=0, shuffle=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = self.loss(model, batch, label_smoothing=0.0)
            total, tokens = total + float(loss) * n, tokens + n
        n_bleu = self.cfg.data.bleu_sentences or len(self.valid)
        d = self.cfg.decode
        hyps = translate(model, self.src_tok, self.tgt_tok, self.valid.src[:n_bleu], beam_size=d.eval_beam_size,
                         length_penalty=d.length_penalty, batch_size=d.batch_size, device=device)
        score = bleu(hyps, self.valid.tgt[:n_bleu])
        return {"loss": total / max(tokens, 1), "bleu": score["score"]}


def start_from(cfg):
    """``cfg`` with the model section of the ``data.init_from`` run (ConfigError naming what differs)."""
    from qkv.tasks.init_from import model_from_source, read_source

    source = read_source(cfg.data.init_from, "translation")
    model = model_from_source(cfg, source, init_from=cfg.data.init_from, vocab_fields=("vocab_size", "joint_vocab"))
    return replace(cfg, model=model, data=replace(cfg.data, vocab_size=source.data.vocab_size,
                                                  joint_vocab=source.data.joint_vocab))


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, *, pad_id: int,
                  label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over non-pad targets. logits (B, T, V), targets (B, T) -> (loss, n_tokens).

    A batch whose targets are all padding gives loss 0 (not NaN) and n_tokens 0.
    """
    n_tokens = int((targets != pad_id).sum())
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=pad_id, label_smoothing=label_smoothing, reduction="sum")
    return loss_sum / max(n_tokens, 1), n_tokens


# -- a trained run at work (qkv.load) --------------------------------------------------------------
class TranslationRun(LoadedRun):
    """A trained translation run (Transformer or RNN): translate, BLEU/chrF on a file pair, attention."""

    kind = "translation"
    primary_metric = TranslationTask.primary_metric
    predicts = ("translate",)
    exporters = {"hf": "qkv.export.hf:encoder_decoder", "ctranslate2": "qkv.export.ct2:translation"}
    evaluate_options = ("src", "ref", "beam", "output")

    def translate(self, texts, *, beam: int | None = None, names=None) -> list[str]:
        """Translate each text (beam search, default the run's decode.beam_size; 1 = greedy); blank texts give "".

        ``names`` (one per text, e.g. "input.txt:3") name a text in errors.
        """
        texts = as_list(texts, name="texts")
        d = self.cfg.decode
        beam = d.beam_size if beam is None else beam
        if not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an int >= 1, got {beam!r}")
        keep = [i for i, text in enumerate(texts) if text.strip()]
        src_tok, tgt_tok = self.artifacts
        self._check_lengths(src_tok, texts, keep, names)
        from qkv.decode import translate

        hyps = translate(self.model, src_tok, tgt_tok, [texts[i] for i in keep], beam_size=beam,
                         length_penalty=d.length_penalty, batch_size=d.batch_size, device=self.device,
                         names=None if names is None else [names[i] for i in keep])
        out = [""] * len(texts)
        for i, hyp in zip(keep, hyps):
            out[i] = hyp
        return out

    def _check_lengths(self, src_tok, texts, keep, names) -> None:
        """A source far longer than any the model was trained on (LENGTH_FACTOR x data.max_len tokens) is
        an error naming its line: it would not translate well, and attention's cost grows with its square."""
        limit = LENGTH_FACTOR * self.cfg.data.max_len
        for i, ids in zip(keep, src_tok.encode_batch([texts[i] for i in keep])):
            if len(ids) > limit:
                where = names[i] if names is not None else f"text {i + 1}"
                raise DataError(f"{where}: {len(ids)} tokens, more than {LENGTH_FACTOR} x the {self.cfg.data.max_len} "
                                "the model was trained on (data.max_len): split it into sentences")

    def _evaluate(self, *, src=None, ref=None, beam=None, output=None) -> dict:
        """sacreBLEU and chrF of the translations of ``src`` against ``ref`` (aligned files); ``output``
        also receives the hypotheses, one per line."""
        from qkv.data.parallel import read_parallel
        from qkv.decode import translate
        from qkv.metrics import corpus_scores

        if not src or not ref:
            raise ConfigError(f"{self.run_dir} is a translation run: evaluate needs src and ref files "
                              "(--src FILE --ref FILE)")
        corpus = read_parallel(src, ref)
        d = self.cfg.decode
        beam = d.beam_size if beam is None else beam
        hyps = translate(self.model, *self.artifacts, corpus.src, beam_size=beam, length_penalty=d.length_penalty,
                         batch_size=d.batch_size, device=self.device)
        if output:
            from qkv.fileio import atomic_write_bytes

            atomic_write_bytes(Path(output), "".join(h + "\n" for h in hyps).encode("utf-8"))
        return {"sentences": len(hyps), "beam": beam, **corpus_scores(hyps, corpus.tgt)}

    def _attention(self, text: str, layers):
        """Translate (the run's beam), then teacher-force the hypothesis to read every weight."""
        from qkv.attention_maps import AttentionSet, groups_of, token_labels
        from qkv.decode import beam_search, greedy_decode
        from qkv.record import AttentionRecord

        src_tok, tgt_tok = self.artifacts
        src_ids = src_tok.encode(text) + [src_tok.eos_id]  # as qkv.decode.translate does
        src = torch.tensor([src_ids], device=self.device)  # (1, S)
        d = self.cfg.decode
        hyp = (greedy_decode(self.model, src) if d.beam_size == 1
               else beam_search(self.model, src, beam_size=d.beam_size, length_penalty=d.length_penalty))[0]
        tgt_in = [tgt_tok.bos_id, *hyp]  # the decoder's input; it produces hyp + [eos]
        record = AttentionRecord(layers)
        self.model(src, torch.tensor([tgt_in], device=self.device), record=record)
        src_labels = token_labels(src_tok, src_ids)
        labels = {"encoder": (src_labels, src_labels),
                  "decoder": (token_labels(tgt_tok, tgt_in), token_labels(tgt_tok, tgt_in)),
                  "cross": (token_labels(tgt_tok, [*hyp, tgt_tok.eos_id]), src_labels)}
        notes = ["cross-attention rows are labelled with the token being produced; decoder self-attention rows "
                 "with the decoder's input (it starts with <bos>)"]
        return AttentionSet(f"{text!r} -> {tgt_tok.decode(hyp)!r}", groups_of(record.weights, labels), notes=notes)


def _build_model(cfg) -> Transformer:
    return Transformer(cfg.model)


register(TaskSpec(
    name="translation",
    data_config=TranslationData,
    model_config=TransformerConfig,
    decode_config=TranslationDecode,
    make_task=TranslationTask,
    build_model=_build_model,
    load_artifacts=lambda cfg, run_dir: load_tokenizers(run_dir, model=cfg.model),
    inference=TranslationRun,
))
