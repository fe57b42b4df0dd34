"""Converters between foreign checkpoints and qkv models: the one place foreign key names live.

HF BERT family (``model_type: bert``: BERT, MiniLM, all-MiniLM-L6-v2, ...) <-> ``EncoderOnly``.
A folder holds config.json, model.safetensors and tokenizer.json (HF's layout); weights are
read with safetensors only, never pickle. The mapping, per layer N (HF ``encoder.layer.N.``)::

    attention.self.{query,key,value}  ->  layers.N.self_attn.qkv_proj   (rows q, k, v stacked)
    attention.output.dense            ->  layers.N.self_attn.out_proj
    attention.output.LayerNorm        ->  layers.N.attn_residual.norm
    intermediate.dense                ->  layers.N.ff.w_1
    output.dense                      ->  layers.N.ff.w_2
    output.LayerNorm                  ->  layers.N.ff_residual.norm

and ``embeddings.{word,position,token_type}_embeddings``, ``embeddings.LayerNorm`` ->
``embed``, ``positions.embedding``, ``segment_embed``, ``embed_norm``.

Keys may carry a ``bert.`` prefix (checkpoints of BertFor* models); the task heads outside it
(``cls.*``, ``classifier.*``) are then skipped. BERT's pooler (``pooler.dense``) and the
``embeddings.position_ids`` buffer are skipped too (see qkv.models.encoder_only). Any other
missing or unexpected key is an error that names it; so is a tensor of the wrong shape.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from qkv.checkpoint import read_weights
from qkv.data.wordpiece import WordPieceTokenizer
from qkv.errors import CheckpointError, DataError
from qkv.fileio import atomic_write_bytes
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig

logger = logging.getLogger(__name__)

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
HF_SIZES = {  # EncoderOnlyConfig field: (BertConfig field, default when absent; None = required)
    "vocab_size": ("vocab_size", None), "max_len": ("max_position_embeddings", None),
    "type_vocab_size": ("type_vocab_size", 2), "d_model": ("hidden_size", None),
    "n_heads": ("num_attention_heads", None), "d_ff": ("intermediate_size", None),
    "n_layers": ("num_hidden_layers", None),
}
HF_NUMBERS = {"dropout": ("hidden_dropout_prob", 0.1), "attn_dropout": ("attention_probs_dropout_prob", 0.1),
              "norm_eps": ("layer_norm_eps", 1e-12)}
SKIPPED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
PREFIX = "bert."


def hf_bert_names(n_layers: int) -> dict[str, tuple[str, ...]]:
    """qkv key -> the HF BertModel keys that make it (three for the fused q, k, v projection)."""
    names = {
        "embed.weight": ("embeddings.word_embeddings.weight",),
        "positions.embedding.weight": ("embeddings.position_embeddings.weight",),
        "segment_embed.weight": ("embeddings.token_type_embeddings.weight",),
        "embed_norm.weight": ("embeddings.LayerNorm.weight",),
        "embed_norm.bias": ("embeddings.LayerNorm.bias",),
    }
    per_layer = {
        "self_attn.qkv_proj": tuple(f"attention.self.{p}" for p in ("query", "key", "value")),
        "self_attn.out_proj": ("attention.output.dense",),
        "attn_residual.norm": ("attention.output.LayerNorm",),
        "ff.w_1": ("intermediate.dense",),
        "ff.w_2": ("output.dense",),
        "ff_residual.norm": ("output.LayerNorm",),
    }
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = tuple(f"encoder.layer.{i}.{t}.{kind}" for t in theirs)
    return names


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(hf: dict, path: Path, name: str, kind: type | tuple[type, ...], default=None, *, minimum=None):
    """hf[name] (or ``default``), checked: a missing or ill-typed field is a CheckpointError naming it."""
    value = default if hf.get(name) is None else hf[name]
    if value is None:
        raise CheckpointError(f"{path}: missing field {name!r}")
    if not isinstance(value, kind) or isinstance(value, bool):
        wanted = "a number" if isinstance(kind, tuple) else f"an {kind.__name__}"
        raise CheckpointError(f"{path}: field {name!r} must be {wanted}, got {value!r}")
    if minimum is not None and value < minimum:
        raise CheckpointError(f"{path}: field {name!r} must be >= {minimum}, got {value!r}")
    return value


def config_from_hf(hf: dict, path: Path, *, pooling: str = "mean") -> EncoderOnlyConfig:
    """EncoderOnlyConfig of an HF BertConfig dict; anything BERT-incompatible is a CheckpointError naming the field."""
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported; "
                              "load_hf_bert reads BERT-family checkpoints (model_type 'bert')")
    act = _field(hf, path, "hidden_act", str, "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act={act!r} is not supported (one of {sorted(HF_ACTIVATIONS)})")
    positions = _field(hf, path, "position_embedding_type", str, "absolute")
    if positions != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type={positions!r} is not supported (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported (an encoder-only BERT has neither)")
    fields = {name: _field(hf, path, theirs, int, default, minimum=1) for name, (theirs, default) in HF_SIZES.items()}
    for name, (theirs, default) in HF_NUMBERS.items():
        fields[name] = float(_field(hf, path, theirs, (int, float), default, minimum=0))
    fields["pad_id"] = _field(hf, path, "pad_token_id", int, 0, minimum=0)
    try:
        return EncoderOnlyConfig(**fields, activation=HF_ACTIVATIONS[act], pooling=pooling)
    except ValueError as err:  # e.g. hidden_size not divisible by num_attention_heads
        raise CheckpointError(f"{path}: {err}") from None


def config_to_hf(cfg: EncoderOnlyConfig) -> dict:
    """The HF BertConfig dict of ``cfg``; ValueError if the model is not expressible as BERT."""
    unsupported = {"positional": "learned", "norm": "layernorm", "norm_first": False}
    for name, wanted in unsupported.items():
        if getattr(cfg, name) != wanted:
            raise ValueError(f"cannot save as HF BERT: {name}={getattr(cfg, name)!r} (BERT has {wanted!r})")
    acts = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items() if theirs != "gelu_new"}
    if cfg.activation not in acts:
        raise ValueError(f"cannot save as HF BERT: activation={cfg.activation!r} (one of {sorted(acts)})")
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": acts[cfg.activation], "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout, "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_id,
        "position_embedding_type": "absolute", "initializer_range": 0.02,
    }


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertModel keys: ``bert.`` removed when present; heads outside it and known extras dropped."""
    if any(k.startswith(PREFIX) for k in tensors):
        heads = sorted(k for k in tensors if not k.startswith(PREFIX))
        if heads:
            logger.info("skipping %d task-head tensors outside %r, e.g. %s", len(heads), PREFIX, heads[0])
        tensors = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return {k: v for k, v in tensors.items() if k not in SKIPPED}


def state_dict_from_hf(tensors: dict[str, torch.Tensor], model: EncoderOnly, path: Path) -> dict[str, torch.Tensor]:
    """qkv state dict of HF BERT tensors; a missing, unexpected or misshapen key is a CheckpointError naming it."""
    tensors = _strip_prefix(tensors)
    names = hf_bert_names(model.cfg.n_layers)
    wanted = {hf for parts in names.values() for hf in parts}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        layers = f"num_hidden_layers={model.cfg.n_layers}"
        raise CheckpointError(f"{path}: does not match its config ({layers}): missing keys {missing[:4]}"
                              f"{' ...' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
                              f"{' ...' if len(unexpected) > 4 else ''}")
    expected = model.state_dict()
    out = {}
    for ours, parts in names.items():
        shape = (expected[ours].shape[0] // len(parts), *expected[ours].shape[1:])
        for hf in parts:
            if tuple(tensors[hf].shape) != shape:
                raise CheckpointError(f"{path}: {hf} has shape {tuple(tensors[hf].shape)}, "
                                      f"the config implies {shape}")
        out[ours] = torch.cat([tensors[hf] for hf in parts]) if len(parts) > 1 else tensors[parts[0]]
    return out


def state_dict_to_hf(model: EncoderOnly) -> dict[str, torch.Tensor]:
    """HF BertModel tensors (no prefix, no pooler) of an EncoderOnly: the fused q, k, v split into rows."""
    state = model.state_dict()
    out = {}
    for ours, parts in hf_bert_names(model.cfg.n_layers).items():
        for hf, tensor in zip(parts, state[ours].chunk(len(parts))):
            out[hf] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def _pooling(folder: Path) -> str:
    """The pooling of a sentence-transformers folder (1_Pooling/config.json), else 'mean'."""
    path = folder / "1_Pooling" / CONFIG
    if not path.is_file():
        return "mean"
    modes = {k for k, v in _read_json(path).items() if k.startswith("pooling_mode_") and v is True}
    known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or not modes <= set(known):
        raise CheckpointError(f"{path}: pooling modes {sorted(modes)} are not supported (one of {sorted(known)})")
    return known[modes.pop()]


def _max_length(folder: Path, cfg: EncoderOnlyConfig) -> int:
    """Truncation length: sentence-transformers' max_seq_length (sentence_bert_config.json), else max_len."""
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return cfg.max_len
    value = _read_json(path).get("max_seq_length", cfg.max_len)
    if not isinstance(value, int) or isinstance(value, bool) or not 3 <= value <= cfg.max_len:
        raise CheckpointError(f"{path}: max_seq_length must be an int in [3, {cfg.max_len}], got {value!r}")
    return value


def load_hf_bert(folder: str | os.PathLike) -> tuple[EncoderOnlyConfig, EncoderOnly, WordPieceTokenizer | None]:
    """(config, model in eval mode, tokenizer or None when the folder has no tokenizer.json) of an HF BERT folder.

    The tokenizer truncates at sentence-transformers' max_seq_length when the folder has one, else
    at the model's position table; ``cfg.pooling`` comes from 1_Pooling/config.json when present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: folder not found")
    cfg = config_from_hf(_read_json(folder / CONFIG), folder / CONFIG, pooling=_pooling(folder))
    model = EncoderOnly(cfg)
    model.load_state_dict(state_dict_from_hf(read_weights(folder / WEIGHTS), model, folder / WEIGHTS))
    model.eval()
    tokenizer = None
    if (folder / TOKENIZER).is_file():
        try:
            tokenizer = WordPieceTokenizer.load(folder / TOKENIZER, max_length=_max_length(folder, cfg))
        except DataError as err:
            raise CheckpointError(str(err)) from None
        if tokenizer.pad_id != cfg.pad_id:
            raise CheckpointError(f"{folder / TOKENIZER}: [PAD] has id {tokenizer.pad_id}, but {folder / CONFIG} "
                                  f"has pad_token_id={cfg.pad_id}")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"{folder / TOKENIZER}: {tokenizer.vocab_size} tokens, but {folder / CONFIG} "
                                  f"has vocab_size={cfg.vocab_size}")
    return cfg, model, tokenizer


def save_hf_bert(model: EncoderOnly, cfg: EncoderOnlyConfig, tokenizer: WordPieceTokenizer | None,
                 folder: str | os.PathLike) -> Path:
    """Write ``folder`` as HF BertModel files that ``transformers.AutoModel.from_pretrained`` loads.

    Each file is written atomically (temp file, fsync, rename): a crash never leaves half a file.
    config.json comes last, so a fresh folder that has one is complete. No pooler weights are
    written: HF initialises its pooler afresh (and says so in its load report);
    ``last_hidden_state`` is exactly this model's output.
    """
    if not isinstance(model, EncoderOnly):
        raise ValueError(f"model must be an EncoderOnly, got {type(model).__name__}")
    if model.cfg != cfg:
        raise ValueError(f"cfg does not describe this model: {cfg} != {model.cfg}")
    hf_config = config_to_hf(cfg)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, more than vocab_size={cfg.vocab_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, safetensors_bytes(state_dict_to_hf(model), metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER)
    atomic_write_bytes(folder / CONFIG, (json.dumps(hf_config, indent=2) + "\n").encode())
    return folder
