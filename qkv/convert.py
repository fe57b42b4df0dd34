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
