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

HF ViT (``model_type: vit``: ViTForImageClassification, ViTModel) <-> ``ViT``. The same folder
layout (config.json, model.safetensors). Per layer N, in transformers-5 names (``layers.N.``) and
the transformers-4 names that Hub checkpoints such as google/vit-base-patch16-224 carry
(``encoder.layer.N.``)::

    attention.{q,k,v}_proj    | attention.attention.{query,key,value}  ->  layers.N.self_attn.qkv_proj
    attention.o_proj          | attention.output.dense                 ->  layers.N.self_attn.out_proj
    layernorm_before          | layernorm_before                       ->  layers.N.attn_residual.norm
    mlp.fc1                   | intermediate.dense                     ->  layers.N.ff.w_1
    mlp.fc2                   | output.dense                           ->  layers.N.ff.w_2
    layernorm_after           | layernorm_after                        ->  layers.N.ff_residual.norm

and ``embeddings.cls_token`` (1, 1, D), ``embeddings.position_embeddings`` (1, 1 + N, D),
``embeddings.patch_embeddings.projection`` (a (D, C, P, P) convolution), ``layernorm`` ->
``class_token``, ``positions`` (1 + N, D), ``patch_embed.proj`` ((D, C*P*P): the same numbers,
flattened channel-first), ``final_norm``; ``classifier`` (outside the ``vit.`` prefix) -> ``head``.
Keys may carry the ``vit.`` prefix (ViTForImageClassification) or not (a bare ViTModel); ViTModel's
``pooler.*`` is skipped (classification reads the class token after ``layernorm``).
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
from qkv.models.vit import ViT, ViTConfig

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


# -- HF ViT <-> ViT ---------------------------------------------------------------------------------
VIT_PREFIX, VIT_HEAD = "vit.", "classifier."
VIT_SIZES = {  # ViTConfig field: (HF ViTConfig field, default when absent; None = required)
    "d_model": ("hidden_size", None), "n_layers": ("num_hidden_layers", None),
    "n_heads": ("num_attention_heads", None), "d_ff": ("intermediate_size", None),
    "image_size": ("image_size", 224), "patch_size": ("patch_size", 16), "channels": ("num_channels", 3),
}
VIT_NUMBERS = {"dropout": ("hidden_dropout_prob", 0.0), "attn_dropout": ("attention_probs_dropout_prob", 0.0),
               "norm_eps": ("layer_norm_eps", 1e-12)}
VIT_LAYER_NAMES = {  # qkv per-layer module: (transformers-5 names, transformers-4 / Hub names)
    "self_attn.qkv_proj": (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                           ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
    "self_attn.out_proj": (("attention.o_proj",), ("attention.output.dense",)),
    "attn_residual.norm": (("layernorm_before",), ("layernorm_before",)),
    "ff.w_1": (("mlp.fc1",), ("intermediate.dense",)),
    "ff.w_2": (("mlp.fc2",), ("output.dense",)),
    "ff_residual.norm": (("layernorm_after",), ("layernorm_after",)),
}


def hf_vit_names(n_layers: int, *, head: bool, legacy: bool = False) -> dict[str, tuple[str, ...]]:
    """qkv ViT key -> the HF ViT keys that make it (three for the fused q, k, v projection).

    HF keys are given without the ``vit.`` prefix (``classifier.*`` lives outside it);
    ``legacy`` picks the transformers-4 names (``encoder.layer.N.attention.attention.query``).
    """
    names = {
        "class_token": ("embeddings.cls_token",),
        "positions": ("embeddings.position_embeddings",),
        "patch_embed.proj.weight": ("embeddings.patch_embeddings.projection.weight",),
        "patch_embed.proj.bias": ("embeddings.patch_embeddings.projection.bias",),
    }
    layer = "encoder.layer" if legacy else "layers"
    for i in range(n_layers):
        for ours, theirs in VIT_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = tuple(f"{layer}.{i}.{t}.{kind}" for t in theirs[legacy])
    names.update({"final_norm.weight": ("layernorm.weight",), "final_norm.bias": ("layernorm.bias",)})
    if head:
        names.update({"head.weight": (VIT_HEAD + "weight",), "head.bias": (VIT_HEAD + "bias",)})
    return names


def _vit_hf_shapes(model: ViT) -> dict[str, tuple[int, ...]]:
    """qkv key -> the shape of each HF tensor that makes it: rows split over the parts; HF's
    position table has a batch axis (1, 1 + N, D) and its patch projection is a (D, C, P, P) kernel."""
    cfg, state = model.cfg, model.state_dict()
    shapes = {}
    for ours, parts in hf_vit_names(cfg.n_layers, head=model.head is not None).items():
        shape = tuple(state[ours].shape)
        shapes[ours] = (shape[0] // len(parts), *shape[1:])
    shapes["positions"] = (1, *shapes["positions"])
    shapes["patch_embed.proj.weight"] = (cfg.d_model, cfg.channels, cfg.patch_size, cfg.patch_size)
    return shapes


def _vit_labels(hf: dict, path: Path) -> int:
    """Classes of the head: 0 for a ViTModel (no head), else len(id2label) or num_labels."""
    architectures = hf.get("architectures")
    if isinstance(architectures, list) and architectures and not any(
            isinstance(a, str) and a.endswith("ForImageClassification") for a in architectures):
        return 0  # e.g. ["ViTModel"]: the config's default labels describe no weights
    if hf.get("id2label") is not None:
        if not isinstance(hf["id2label"], dict):
            raise CheckpointError(f"{path}: field 'id2label' must be an object, got {hf['id2label']!r}")
        return len(hf["id2label"])
    return _field(hf, path, "num_labels", int, 0, minimum=0)


def vit_config_from_hf(hf: dict, path: Path) -> ViTConfig:
    """ViTConfig of an HF ViTConfig dict; anything qkv's ViT cannot express is a CheckpointError naming the field.

    The head has len(id2label) (else num_labels) classes when ``architectures`` names an
    ``*ForImageClassification`` (or is absent), none for a ViTModel.
    """
    model_type = hf.get("model_type")
    if model_type != "vit":
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported; "
                              "load_hf_vit reads ViT checkpoints (model_type 'vit')")
    act = _field(hf, path, "hidden_act", str, "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: hidden_act={act!r} is not supported (only 'gelu')")
    qkv_bias = hf.get("qkv_bias", True)
    if qkv_bias is not True:
        raise CheckpointError(f"{path}: qkv_bias={qkv_bias!r} is not supported (qkv's ViT has q, k, v biases)")
    fields = {name: _field(hf, path, theirs, int, default, minimum=1) for name, (theirs, default) in VIT_SIZES.items()}
    for name, (theirs, default) in VIT_NUMBERS.items():
        fields[name] = float(_field(hf, path, theirs, (int, float), default, minimum=0))
    try:
        return ViTConfig(**fields, n_classes=_vit_labels(hf, path), activation="gelu", norm="layernorm",
                         positional="learned", pooling="cls")
    except ValueError as err:  # e.g. image_size not divisible by patch_size
        raise CheckpointError(f"{path}: {err}") from None


def vit_config_to_hf(cfg: ViTConfig) -> dict:
    """The HF ViTConfig dict of ``cfg``; ValueError if the model is not expressible as HF ViT.

    No head: ``architectures: ["ViTModel"]`` and no labels (ViTForImageClassification then
    builds an identity classifier, so its logits are the pooled features, as in qkv).
    """
    wanted = {"pooling": "cls", "positional": "learned", "activation": "gelu", "norm": "layernorm"}
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"cannot save as HF ViT: {name}={getattr(cfg, name)!r} (HF ViT has {value!r})")
    id2label = {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)}
    return {
        "architectures": ["ViTForImageClassification" if cfg.n_classes else "ViTModel"], "model_type": "vit",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout, "layer_norm_eps": cfg.norm_eps,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels,
        "qkv_bias": True, "encoder_stride": cfg.patch_size, "initializer_range": 0.02,
        "id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()},
    }


def _vit_keys(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """HF key without the ``vit.`` prefix -> the key in the file; ViTModel's ``pooler.*`` dropped."""
    keys: dict[str, str] = {}
    for key in tensors:
        bare = key[len(VIT_PREFIX):] if key.startswith(VIT_PREFIX) else key
        if bare.startswith("pooler."):
            continue
        if bare in keys:
            raise CheckpointError(f"{path}: both {keys[bare]} and {key} are in the file")
        keys[bare] = key
    return keys


def vit_state_dict_from_hf(tensors: dict[str, torch.Tensor], model: ViT, path: Path) -> dict[str, torch.Tensor]:
    """qkv state dict of HF ViT tensors (transformers-5 or -4 names, with or without ``vit.``).

    A missing, unexpected or misshapen key is a CheckpointError naming it and the file.
    """
    keys = _vit_keys(tensors, path)
    legacy = any(k.startswith("encoder.layer.") for k in keys)
    head = model.head is not None
    names = hf_vit_names(model.cfg.n_layers, head=head, legacy=legacy)
    wanted = {hf for parts in names.values() for hf in parts}
    prefix = VIT_PREFIX if any(k.startswith(VIT_PREFIX) for k in tensors) else ""
    missing = sorted(k if k.startswith(VIT_HEAD) else prefix + k for k in wanted - set(keys))
    unexpected = sorted(keys[k] for k in set(keys) - wanted)
    if missing or unexpected:
        described = f"num_hidden_layers={model.cfg.n_layers}, {model.cfg.n_classes if head else 'no'} classes"
        raise CheckpointError(f"{path}: does not match its config ({described}): missing keys {missing[:4]}"
                              f"{' ...' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
                              f"{' ...' if len(unexpected) > 4 else ''}")
    shapes, expected = _vit_hf_shapes(model), model.state_dict()
    out = {}
    for ours, parts in names.items():
        for hf in parts:
            if tuple(tensors[keys[hf]].shape) != shapes[ours]:
                raise CheckpointError(f"{path}: {keys[hf]} has shape {tuple(tensors[keys[hf]].shape)}, "
                                      f"the config implies {shapes[ours]}")
        out[ours] = torch.cat([tensors[keys[hf]] for hf in parts]).reshape(expected[ours].shape)
    return out


def vit_state_dict_to_hf(model: ViT, *, legacy: bool = False) -> dict[str, torch.Tensor]:
    """HF ViTForImageClassification tensors (transformers-5 names, or with ``legacy`` the
    transformers-4 / Hub names; ``vit.`` prefix, ``classifier.*`` when the model has a head; no
    pooler) of a ViT: the fused q, k, v split into rows."""
    state, shapes = model.state_dict(), _vit_hf_shapes(model)
    out = {}
    for ours, parts in hf_vit_names(model.cfg.n_layers, head=model.head is not None, legacy=legacy).items():
        for hf, tensor in zip(parts, state[ours].chunk(len(parts))):
            key = hf if hf.startswith(VIT_HEAD) else VIT_PREFIX + hf
            out[key] = tensor.detach().to("cpu", copy=True).reshape(shapes[ours]).contiguous()
    return out


def load_hf_vit(folder: str | os.PathLike) -> tuple[ViTConfig, ViT]:
    """(config, model in eval mode) of an HF ViT folder (config.json + model.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: folder not found")
    cfg = vit_config_from_hf(_read_json(folder / CONFIG), folder / CONFIG)
    model = ViT(cfg)
    model.load_state_dict(vit_state_dict_from_hf(read_weights(folder / WEIGHTS), model, folder / WEIGHTS))
    return cfg, model.eval()


def save_hf_vit(model: ViT, cfg: ViTConfig, folder: str | os.PathLike) -> Path:
    """Write ``folder`` as HF files that ``transformers.ViTForImageClassification.from_pretrained`` loads.

    Atomic per file, config.json last, as ``save_hf_bert``. Weights carry the Hub's transformers-4
    names (``vit.encoder.layer.i.attention.attention.query``), which transformers 4 and 5 both load.
    """
    if not isinstance(model, ViT):
        raise ValueError(f"model must be a ViT, got {type(model).__name__}")
    if model.cfg != cfg:
        raise ValueError(f"cfg does not describe this model: {cfg} != {model.cfg}")
    hf_config = vit_config_to_hf(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = vit_state_dict_to_hf(model, legacy=True)
    atomic_write_bytes(folder / WEIGHTS, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(folder / CONFIG, (json.dumps(hf_config, indent=2) + "\n").encode())
    return folder


# -- HF GPT-2 / Marian -> a qkv run directory ------------------------------------------------------------
# GPT2LMHeadModel (``transformer.`` prefix; a bare GPT2Model has none) -> DecoderOnly. Conv1D weights
# are (in, out): transposed. Per layer N (``h.N.``)::
#
#     ln_1, attn.c_attn, attn.c_proj   ->  layers.N.self_residual.norm, self_attn.qkv_proj, self_attn.out_proj
#     ln_2, mlp.c_fc, mlp.c_proj       ->  layers.N.ff_residual.norm, ff.w_1, ff.w_2
#
# and wte, wpe, ln_f, lm_head -> embed, positions.embedding, final_norm, output.
# MarianMTModel -> Transformer: the inverse of qkv.export.hf's mapping (the residual dimensions
# permuted back from Marian's sin-then-cos layout to qkv's interleaved one).
GPT2_LAYER = {"ln_1": "self_residual.norm", "attn.c_attn": "self_attn.qkv_proj", "attn.c_proj": "self_attn.out_proj",
              "ln_2": "ff_residual.norm", "mlp.c_fc": "ff.w_1", "mlp.c_proj": "ff.w_2"}
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
             "silu": "silu", "swish": "silu"}
MARIAN_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "swish": "silu", "silu": "silu"}  # HF activation_function -> qkv's (opus-mt: swish)
QKV_EPS = 1e-5  # the LayerNorm eps of qkv's DecoderOnly and Transformer blocks


def resolve_hf(source: str | os.PathLike) -> Path:
    """A folder, or a hub-style id ("owner/name") found in the local Hugging Face cache (never downloaded)."""
    folder = Path(source)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises several kinds; all mean "not here"
        raise CheckpointError(f"{source}: not a folder, and not in the local Hugging Face cache "
                              f"({type(err).__name__}); download it first (huggingface-cli download {source}) "
                              "or pass the folder") from None


#: HF config field -> qkv tokenizer role, per model type; absent fields fall back as noted in _special_ids.
SPECIAL_FIELDS = {"gpt2": {"pad": "pad_token_id", "bos": "bos_token_id", "eos": "eos_token_id"},
                  "marian": {"pad": "pad_token_id", "bos": "decoder_start_token_id", "eos": "eos_token_id"}}


def _special_ids(hf: dict, path: Path, kind: str) -> dict[str, int]:
    """pad/bos/eos ids from the HF config: GPT-2's pad is its eos when unset (GPT-2 has no pad; qkv
    masks padding, so any id serves); Marian's decoder starts at ``decoder_start_token_id`` (opus-mt: pad),
    which is qkv's bos, the decoder's first input."""
    fields = SPECIAL_FIELDS[kind]
    ids = {}
    for role in ("eos", "bos", "pad"):
        name = fields[role]
        fallback = {"pad": ids.get("eos") if kind == "gpt2" else None,
                    "bos": ids.get("pad", hf.get("pad_token_id")) if kind == "marian" else None}.get(role)
        ids[role] = _field(hf, path, name, int, fallback, minimum=0)
    return ids


def _unk_token(obj: dict) -> str | None:
    """The tokenizers model's unknown token (BPE/WordPiece/WordLevel ``unk_token``, Unigram ``unk_id``)."""
    model = obj.get("model") or {}
    if model.get("unk_token") is not None:
        return model["unk_token"]
    if model.get("type") == "Unigram" and isinstance(model.get("unk_id"), int):
        return model["vocab"][model["unk_id"]][0]
    return None


def _qkv_tokenizer(folder: Path, hf: dict, kind: str, name: str = TOKENIZER):
    """The folder's tokenizer.json as a qkv TextTokenizer with the special ids of ``hf`` (the HF config),
    padding and truncation off. unk is the tokenizer model's unknown token, or none (byte-level BPE)."""
    from tokenizers import Tokenizer

    from qkv.data.tokenizer import TextTokenizer

    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; qkv needs the tokenizer as a tokenizers JSON file (an opus-mt "
                              "folder's SentencePiece files must be converted first: see docs/export.md)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception
        raise CheckpointError(f"{path}: not a valid tokenizers JSON file: {err}") from None
    tok.no_padding()
    tok.no_truncation()
    ids = _special_ids(hf, _config_of(folder), kind)
    unk = _unk_token(json.loads(path.read_text(encoding="utf-8")))
    unk_id = tok.token_to_id(unk) if unk is not None else None
    try:
        return TextTokenizer(tok, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"], unk_id=unk_id)
    except DataError as err:
        role = str(err).split(" must be the special ", 1)[-1].split(" ", 1)[0]
        field = SPECIAL_FIELDS[kind].get(role, "the model's unk_token")
        raise CheckpointError(f"{path}: {err}; it comes from {_config_of(folder)}'s {field}") from None


def _config_of(folder: Path) -> Path:
    """The config.json that describes a tokenizer folder (a Marian target_tokenizer/ is inside the model's)."""
    return (folder.parent if folder.name == "target_tokenizer" else folder) / CONFIG


def _check_ids(hf: dict, path: Path, tok, pairs: dict[str, str]) -> None:
    """Each HF config id (``pairs``: HF field -> tokenizer role) equals the tokenizer's."""
    for field, role in pairs.items():
        if hf.get(field) is not None and hf[field] != getattr(tok, role):
            raise CheckpointError(f"{path}: {field}={hf[field]}, but the tokenizer's {role} is {getattr(tok, role)}")


def gpt2_config_from_hf(hf: dict, path: Path, tok):
    """DecoderOnlyConfig of an HF GPT2Config dict; what qkv cannot compute is a CheckpointError naming the field."""
    from qkv.models.decoder_only import DecoderOnlyConfig

    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{path}: model_type={hf.get('model_type')!r} is not 'gpt2'")
    act = _field(hf, path, "activation_function", str, "gelu_new")
    if act not in GPT2_ACTS:
        raise CheckpointError(f"{path}: activation_function={act!r} is not supported (one of {sorted(GPT2_ACTS)})")
    for name, wanted in (("layer_norm_epsilon", QKV_EPS), ("scale_attn_weights", True),
                         ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if hf.get(name, wanted) != wanted:
            raise CheckpointError(f"{path}: {name}={hf[name]!r} is not supported (qkv computes {wanted!r})")
    _check_ids(hf, path, tok, {"pad_token_id": "pad_id"})
    sizes = {ours: _field(hf, path, theirs, int, None, minimum=1) for ours, theirs in (
        ("vocab_size", "vocab_size"), ("block_size", "n_positions"), ("d_model", "n_embd"),
        ("n_heads", "n_head"), ("n_layers", "n_layer"))}
    try:
        return DecoderOnlyConfig(**sizes, d_ff=hf.get("n_inner") or 0, activation=GPT2_ACTS[act],
                                 dropout=float(hf.get("resid_pdrop", 0.1)),
                                 attn_dropout=float(hf.get("attn_pdrop", 0.1)),
                                 tie_embeddings=bool(hf.get("tie_word_embeddings", True)), pad_id=tok.pad_id,
                                 bos_id=tok.bos_id, eos_id=tok.eos_id)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def gpt2_state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg, path: Path) -> dict[str, torch.Tensor]:
    """qkv DecoderOnly state dict of GPT-2 tensors (with or without ``transformer.``); mask buffers skipped."""
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    names = {"wte.weight": "embed.weight", "wpe.weight": "positions.embedding.weight",
             "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias"}
    for i in range(cfg.n_layers):
        for theirs, ours in GPT2_LAYER.items():
            for kind in ("weight", "bias"):
                names[f"h.{i}.{theirs}.{kind}"] = f"layers.{i}.{ours}.{kind}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    extra = set(bare) - set(names) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing = sorted(set(names) - set(bare))
    if missing or extra:
        raise CheckpointError(f"{path}: does not match its config (n_layer={cfg.n_layers}): missing keys "
                              f"{missing[:4]}, unexpected keys {sorted(extra)[:4]}")
    conv1d = tuple(f".{t}.weight" for t in GPT2_LAYER if not t.startswith("ln"))
    out = {ours: bare[theirs].t() if theirs.endswith(conv1d) else bare[theirs] for theirs, ours in names.items()}
    if cfg.tie_embeddings:
        out["output.weight"] = out["embed.weight"]  # the same tensor (tied), as the module holds it
    return out


def _marian_qkv_config(hf: dict, path: Path, src_tok, tgt_tok):
    """TransformerConfig of an HF MarianConfig dict; what qkv cannot compute is a CheckpointError naming the field."""
    from qkv.models.transformer import TransformerConfig

    if hf.get("model_type") != "marian":
        raise CheckpointError(f"{path}: model_type={hf.get('model_type')!r} is not 'marian'")
    acts = MARIAN_ACTS
    act = _field(hf, path, "activation_function", str, "gelu")
    if act not in acts:
        raise CheckpointError(f"{path}: activation_function={act!r} is not supported (qkv's feed-forward has "
                              f"{sorted(acts)})")
    for ours, pair in (("n_heads", ("encoder_attention_heads", "decoder_attention_heads")),
                       ("d_ff", ("encoder_ffn_dim", "decoder_ffn_dim"))):
        if hf.get(pair[0]) != hf.get(pair[1]):
            raise CheckpointError(f"{path}: {pair[0]}={hf.get(pair[0])} != {pair[1]}={hf.get(pair[1])} "
                                  f"(qkv's Transformer has one {ours})")
    _check_ids(hf, path, tgt_tok, {"pad_token_id": "pad_id", "eos_token_id": "eos_id",
                                   "decoder_start_token_id": "bos_id"})
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    vocab = _field(hf, path, "vocab_size", int, None, minimum=1)
    try:
        return TransformerConfig(
            src_vocab_size=vocab,
            tgt_vocab_size=vocab if shared else _field(hf, path, "decoder_vocab_size", int, vocab),
            d_model=_field(hf, path, "d_model", int, None, minimum=2), n_heads=hf["encoder_attention_heads"],
            d_ff=hf["encoder_ffn_dim"], n_encoder_layers=_field(hf, path, "encoder_layers", int, None, minimum=1),
            n_decoder_layers=_field(hf, path, "decoder_layers", int, None, minimum=1), activation=acts[act],
            dropout=float(hf.get("dropout", 0.1)), attn_dropout=float(hf.get("attention_dropout", 0.0)),
            max_len=_field(hf, path, "max_position_embeddings", int, 1024), share_embeddings=shared,
            scale_embeddings=bool(hf.get("scale_embedding", False)),
            tie_output=bool(hf.get("tie_word_embeddings", True)), pad_id=tgt_tok.pad_id, bos_id=tgt_tok.bos_id,
            eos_id=tgt_tok.eos_id)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def marian_state_dict_from_hf(tensors: dict[str, torch.Tensor], model, path: Path) -> dict[str, torch.Tensor]:
    """qkv Transformer state dict of MarianMTModel tensors: qkv.export.hf.marian_tensors inverted."""
    from qkv.export.hf import marian_permutation, marian_tensors

    bias = tensors.get("final_logits_bias")
    if bias is not None and bool(bias.ne(0).any()):
        raise CheckpointError(f"{path}: final_logits_bias is not zero (qkv's output projection has no bias)")
    inverse = torch.argsort(marian_permutation(model.cfg.d_model))
    wanted = marian_tensors(model)  # the keys and which axis of each is the residual stream
    skipped = {"final_logits_bias", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    shared = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    extra = sorted(set(tensors) - set(wanted) - skipped - shared)
    missing = sorted(set(wanted) - set(tensors) - skipped)
    if missing or extra:
        raise CheckpointError(f"{path}: does not match its config: missing keys {missing[:4]}, unexpected keys "
                              f"{extra[:4]}")
    theirs = {}
    for key in wanted:
        if key == "final_logits_bias":
            continue
        t = tensors[key]
        if tuple(t.shape) != tuple(wanted[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(wanted[key].shape)}")
        theirs[key] = t
    return _marian_to_qkv(theirs, model, inverse)


def _marian_to_qkv(t: dict[str, torch.Tensor], model, inverse: torch.Tensor) -> dict[str, torch.Tensor]:
    """Marian names -> qkv names; residual columns (inputs) and rows/vectors (outputs, norms) un-permuted."""
    cols = lambda w: w[:, inverse]  # noqa: E731 - reads the residual stream
    rows = lambda w: w[inverse]  # noqa: E731 - writes it (or a norm over it)
    cfg, out = model.cfg, {}
    if cfg.share_embeddings:
        out["src_embed.weight"] = cols(t["model.shared.weight"])
    else:
        out["src_embed.weight"] = cols(t["model.encoder.embed_tokens.weight"])
        out["tgt_embed.weight"] = cols(t["model.decoder.embed_tokens.weight"])
    if cfg.share_embeddings:
        out["tgt_embed.weight"] = out["src_embed.weight"]
    out["output.weight"] = cols(t["lm_head.weight"]) if not cfg.tie_output else out["tgt_embed.weight"]

    def attention(ours: str, theirs: str, cross: bool) -> None:
        q, k, v = (t[f"{theirs}.{n}_proj.weight"] for n in "qkv")
        bq, bk, bv = (t[f"{theirs}.{n}_proj.bias"] for n in "qkv")
        if cross:
            out[f"{ours}.q_proj.weight"], out[f"{ours}.q_proj.bias"] = cols(q), bq
            out[f"{ours}.kv_proj.weight"], out[f"{ours}.kv_proj.bias"] = cols(torch.cat([k, v])), torch.cat([bk, bv])
        else:
            out[f"{ours}.qkv_proj.weight"] = cols(torch.cat([q, k, v]))
            out[f"{ours}.qkv_proj.bias"] = torch.cat([bq, bk, bv])
        out[f"{ours}.out_proj.weight"] = rows(t[f"{theirs}.out_proj.weight"])
        out[f"{ours}.out_proj.bias"] = rows(t[f"{theirs}.out_proj.bias"])

    def block(ours: str, theirs: str, norms: dict[str, str]) -> None:
        for o, h in norms.items():
            out[f"{ours}.{o}.norm.weight"] = rows(t[f"{theirs}.{h}.weight"])
            out[f"{ours}.{o}.norm.bias"] = rows(t[f"{theirs}.{h}.bias"])
        fc1, fc2 = f"{theirs}.fc1", f"{theirs}.fc2"
        out[f"{ours}.ff.w_1.weight"], out[f"{ours}.ff.w_1.bias"] = cols(t[f"{fc1}.weight"]), t[f"{fc1}.bias"]
        out[f"{ours}.ff.w_2.weight"], out[f"{ours}.ff.w_2.bias"] = rows(t[f"{fc2}.weight"]), rows(t[f"{fc2}.bias"])

    for i in range(cfg.n_encoder_layers):
        attention(f"encoder.{i}.self_attn", f"model.encoder.layers.{i}.self_attn", False)
        block(f"encoder.{i}", f"model.encoder.layers.{i}", {"attn_residual": "self_attn_layer_norm",
                                                            "ff_residual": "final_layer_norm"})
    for i in range(cfg.n_decoder_layers):
        attention(f"decoder.{i}.self_attn", f"model.decoder.layers.{i}.self_attn", False)
        attention(f"decoder.{i}.cross_attn", f"model.decoder.layers.{i}.encoder_attn", True)
        block(f"decoder.{i}", f"model.decoder.layers.{i}", {"self_residual": "self_attn_layer_norm",
                                                            "cross_residual": "encoder_attn_layer_norm",
                                                            "ff_residual": "final_layer_norm"})
    return out


def import_hf(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a qkv run directory from an HF GPT-2 (``model_type: gpt2``, task lm) or Marian
    (``model_type: marian``, task translation) folder or locally cached hub id.

    The run holds config.json (the task's config classes, training sections at their defaults),
    model.safetensors and the tokenizer files, so ``qkv.load``, ``qkv generate`` and ``qkv translate``
    work on it. Everything is read and checked before the first byte is written; ``out`` must be
    new or empty (qkv.rundir). The tokenizers must be ``tokenizer.json`` files (a Marian with
    separate vocabularies keeps the target's in ``target_tokenizer/``, as ``qkv export --format hf``
    writes it); their special ids come from the HF config (``_special_ids``: GPT-2's one
    ``<|endoftext|>`` is bos, eos and pad; opus-mt's decoder starts at pad, which becomes qkv's bos)
    and are saved beside the tokenizer when they are not qkv's 0..3 (qkv.data.tokenizer.specials_path).
    """
    from qkv.rundir import RunDir

    folder = resolve_hf(source)
    hf = _read_json(folder / CONFIG)
    kind = hf.get("model_type")
    if kind not in ("gpt2", "marian"):
        raise CheckpointError(f"{folder / CONFIG}: model_type={kind!r}: import_hf reads 'gpt2' and 'marian' folders "
                              "(load_hf_bert and load_hf_vit read BERT and ViT)")
    model, cfg, tokenizers = (_import_gpt2 if kind == "gpt2" else _import_marian)(folder, hf)
    run = RunDir(Path(out))
    run.prepare_new()
    run.create()
    from qkv.checkpoint import save_weights
    from qkv.run import save_config

    for name, tok in tokenizers.items():
        tok.save(run.file(name))
    save_weights(model, run.weights)
    save_config(run.path, cfg)
    return run.path


def _run_config(model_cfg, **data):
    """The RunConfig of the task that trains this model config (found by its config class, not by name)."""
    from qkv.config import TrainConfig
    from qkv.run import RunConfig
    from qkv.tasks import TASKS

    task, spec = next((n, s) for n, s in TASKS.items() if s.model_config is type(model_cfg))
    return RunConfig(task=task, data=spec.data_config(**data), model=model_cfg, train=TrainConfig(),
                     decode=spec.decode_config())


def _import_gpt2(folder: Path, hf: dict):
    from qkv.models.decoder_only import DecoderOnly
    from qkv.tasks.lm import TOKENIZER as LM_TOKENIZER

    tok = _qkv_tokenizer(folder, hf, "gpt2")
    cfg = gpt2_config_from_hf(hf, folder / CONFIG, tok)
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{folder / TOKENIZER}: {tok.vocab_size} tokens, but vocab_size={cfg.vocab_size}")
    model = DecoderOnly(cfg)
    model.load_state_dict(gpt2_state_dict_from_hf(read_weights(folder / WEIGHTS), cfg, folder / WEIGHTS))
    return model, _run_config(cfg, tokenizer="bpe", vocab_size=tok.vocab_size), {LM_TOKENIZER: tok}


def _import_marian(folder: Path, hf: dict):
    from qkv.models.transformer import Transformer
    from qkv.tasks.translation import SRC_TOKENIZER, TGT_TOKENIZER

    src_tok = _qkv_tokenizer(folder, hf, "marian")
    separate = (folder / "target_tokenizer" / TOKENIZER).is_file()
    tgt_tok = _qkv_tokenizer(folder / "target_tokenizer", hf, "marian") if separate else src_tok
    cfg = _marian_qkv_config(hf, folder / CONFIG, src_tok, tgt_tok)
    for name, tok, size in ((TOKENIZER, src_tok, cfg.src_vocab_size), (TOKENIZER, tgt_tok, cfg.tgt_vocab_size)):
        if tok.vocab_size != size:
            raise CheckpointError(f"{folder / name}: {tok.vocab_size} tokens, but the config has {size}")
    model = Transformer(cfg)
    model.load_state_dict(marian_state_dict_from_hf(read_weights(folder / WEIGHTS), model, folder / WEIGHTS))
    data = dict(joint_vocab=not separate, vocab_size=tgt_tok.vocab_size)
    return model, _run_config(cfg, **data), {SRC_TOKENIZER: src_tok, TGT_TOKENIZER: tgt_tok}
