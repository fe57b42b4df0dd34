"""Hugging Face export: a trained run -> a folder ``transformers`` (or sentence-transformers) loads.

Each exporter is ``fn(run, out) -> summary`` (qkv.export). What maps to what:

* ``encoder_decoder``: the Transformer -> ``MarianMTModel`` (post-norm, sinusoidal, biases, scaled
  embeddings, tied output; shared or separate vocabularies). Marian's sinusoids are not interleaved:
  its dimension ``m < D/2`` is sin at frequency m and ``D/2 + m`` is cos, where qkv (sec. 3.5) puts
  them at ``2m`` and ``2m + 1``. A Transformer is equivariant to a permutation of its residual
  dimensions (LayerNorm's mean and variance do not depend on the order; every matrix that reads
  or writes the residual stream is permuted with it), so the export permutes them by
  ``PERM = [0, 2, 4, ..., 1, 3, 5, ...]``: the same function, exactly. The decoder starts at qkv's
  BOS (``decoder_start_token_id``); ``final_logits_bias`` is zeros; generation suppresses pad and
  bos, as qkv's search does.
* ``decoder_only``: learned positions + LayerNorm + GELU/ReLU -> ``GPT2LMHeadModel`` (Conv1D
  weights are (in, out): transposed); RoPE (half-split, GPT-NeoX/Llama layout) + RMSNorm + SwiGLU
  -> ``LlamaForCausalLM`` (rope_theta = the scheme's base).
* ``text_encoder``: the encoder -> ``BertModel``; a classifier with ``pooling=cls`` ->
  ``BertForSequenceClassification`` (see ``_linear_pooler``); an embedding run -> a
  sentence-transformers folder (Transformer, Pooling, Normalize).
* ``vit``: ``ViTModel`` / ``ViTForImageClassification`` (qkv.convert.save_hf_vit's mapping).

Tokenizers are written as ``tokenizer.json`` (HF ``tokenizers``) + ``tokenizer_config.json``
naming ``PreTrainedTokenizerFast`` and the special tokens, which ``AutoTokenizer`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from qkv.errors import ConfigError
from qkv.export import prepare_out, summary

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
#: BertForSequenceClassification reads tanh(W h_[CLS] + b); qkv's head reads h_[CLS]. With W = EPS * I,
#: b = 0 and the classifier scaled by 1/EPS (a power of two: both products are exact), tanh(EPS h)
#: = EPS h (1 - (EPS h)^2 / 3 + ...) equals EPS h to float32 precision for |h| < 2^4.
EPS = 2.0 ** -16
MARIAN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "swish",
                      "swish": "swish"}  # qkv -> HF activation_function (Marian calls SiLU swish)
GPT2_ACTIVATIONS = MARIAN_ACTIVATIONS


# -- shared ----------------------------------------------------------------------------------------
def refuse(target: str, wrong: dict[str, object], wanted: str) -> None:
    """ConfigError naming the config keys (``wrong``: key -> value) that have no ``target`` counterpart."""
    if wrong:
        keys = ", ".join(f"model.{k}={v}" for k, v in wrong.items())
        raise ConfigError(f"{keys} has no {target} counterpart: {target} needs {wanted}")


def _write_json(path: Path, obj: dict) -> None:
    from qkv.fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _write_json_list(path: Path, items: list) -> None:
    from qkv.fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(items, indent=2) + "\n").encode())


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from qkv.fileio import atomic_write_bytes

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"format": "pt"}))


def hf_tokenizer(tokenizer, *, single: str | None = None, max_length: int | None = None):
    """A ``tokenizers.Tokenizer`` of a qkv tokenizer (TextTokenizer, CharTokenizer, WordPieceTokenizer,
    BpeSentenceTokenizer), with a post-processor template ``single`` (e.g. "$A </s>") and truncation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from qkv.data.tokenizer import CHAR_SPECIAL_TOKENS, CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        vocab = {t: i for i, t in enumerate(CHAR_SPECIAL_TOKENS)}
        vocab.update({c: i + len(CHAR_SPECIAL_TOKENS) for i, c in enumerate(tokenizer.chars)})
        tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
        tok.add_special_tokens(list(CHAR_SPECIAL_TOKENS))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        inner = getattr(tokenizer, "tokenizer", tokenizer)  # BpeSentenceTokenizer -> TextTokenizer
        tok = Tokenizer.from_str(getattr(inner, "tokenizer", inner).to_str())
    if single is not None:
        specials = [(t, tok.token_to_id(t)) for t in single.split() if t != "$A"]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    tok.no_padding()
    if max_length is not None:
        tok.enable_truncation(max_length)
    else:
        tok.no_truncation()
    return tok


def write_tokenizer(folder: Path, tokenizer, *, specials: dict[str, str], model_max_length: int,
                    single: str | None = None, truncate: bool = False, lowercase: bool | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast) into ``folder``.

    ``specials``: HF role ("pad_token", "bos_token", ...) -> token text.
    """
    from qkv.fileio import atomic_write_text

    tok = hf_tokenizer(tokenizer, single=single, max_length=model_max_length if truncate else None)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / TOKENIZER, tok.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **specials}
    if lowercase is not None:
        config["do_lower_case"] = lowercase
    _write_json(folder / "tokenizer_config.json", config)


def _qkv_specials(tok) -> dict[str, str]:
    """HF roles of a qkv tokenizer's pad/bos/eos(/unk) ids (ids 0..3 of TextTokenizer, 0..2 of CharTokenizer)."""
    names = {"pad_token": tok.pad_id, "bos_token": tok.bos_id, "eos_token": tok.eos_id}
    if getattr(tok, "unk_id", None) is not None:
        names["unk_token"] = tok.unk_id
    hf = hf_tokenizer(tok)
    return {role: hf.id_to_token(i) for role, i in names.items()}


# -- encoder-decoder -> Marian ---------------------------------------------------------------------
def marian_permutation(d_model: int) -> torch.Tensor:
    """PERM (D,): Marian's residual dimension m is qkv's dimension PERM[m] (sin halves, then cos halves)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def check_marian(cfg) -> None:
    """ConfigError naming every key of a TransformerConfig that Marian cannot hold."""
    wrong = {k: getattr(cfg, k) for k, ok in (("norm_first", False), ("norm", "layernorm"),
                                              ("positional", "sinusoidal")) if getattr(cfg, k) != ok}
    if cfg.activation not in MARIAN_ACTIVATIONS:
        wrong["activation"] = cfg.activation
    if cfg.n_kv_heads not in (None, cfg.n_heads):
        wrong["n_kv_heads"] = cfg.n_kv_heads
    if cfg.d_model % 2:
        wrong["d_model"] = cfg.d_model
    refuse("Marian", wrong, "norm_first=false, norm=layernorm, positional=sinusoidal, activation relu|gelu|"
                            "gelu_tanh|silu, n_kv_heads unset, even d_model, like configs/paper-base.yaml")


def marian_config(cfg) -> dict:
    """The HF MarianConfig dict of a TransformerConfig (already checked by ``check_marian``)."""
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "vocab_size": cfg.src_vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab_size, "share_encoder_decoder_embeddings": cfg.share_embeddings,
        "tie_word_embeddings": cfg.tie_output, "d_model": cfg.d_model, "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers, "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": MARIAN_ACTIVATIONS[cfg.activation], "max_position_embeddings": cfg.max_len,
        "scale_embedding": cfg.scale_embeddings, "dropout": cfg.dropout, "attention_dropout": cfg.attn_dropout,
        "activation_dropout": 0.0, "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.bos_id, "forced_eos_token_id": None,
        "is_encoder_decoder": True,
    }


def _attention_tensors(attn, prefix: str, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """q/k/v/out_proj of one qkv MHA in Marian names; inputs read the permuted residual (columns
    permuted), the output writes it (rows permuted)."""
    if attn.cross:
        (wq, bq), (wkv, bkv) = (attn.q_proj.weight, attn.q_proj.bias), (attn.kv_proj.weight, attn.kv_proj.bias)
        weights, biases = (wq, *wkv.chunk(2)), (bq, *bkv.chunk(2))
    else:
        weights, biases = attn.qkv_weights()
    out = {}
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
        out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w[:, perm], b
    out[f"{prefix}.out_proj.weight"] = attn.out_proj.weight[perm]
    out[f"{prefix}.out_proj.bias"] = attn.out_proj.bias[perm]
    return out


def _residual_tensors(layer, names: dict[str, str], prefix: str, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norms (permuted) and the feed-forward (w_1 columns, w_2 rows permuted) of one block."""
    out = {}
    for ours, theirs in names.items():
        norm = getattr(layer, ours).norm
        out[f"{prefix}.{theirs}.weight"], out[f"{prefix}.{theirs}.bias"] = norm.weight[perm], norm.bias[perm]
    out[f"{prefix}.fc1.weight"], out[f"{prefix}.fc1.bias"] = layer.ff.w_1.weight[:, perm], layer.ff.w_1.bias
    out[f"{prefix}.fc2.weight"], out[f"{prefix}.fc2.bias"] = layer.ff.w_2.weight[perm], layer.ff.w_2.bias[perm]
    return out


def marian_tensors(model) -> dict[str, torch.Tensor]:
    """MarianMTModel tensors of a qkv Transformer, the residual stream permuted by ``marian_permutation``."""
    cfg = model.cfg
    perm = marian_permutation(cfg.d_model)
    out = {}
    if cfg.share_embeddings:
        out["model.shared.weight"] = model.src_embed.weight[:, perm]
    else:
        out["model.encoder.embed_tokens.weight"] = model.src_embed.weight[:, perm]
        out["model.decoder.embed_tokens.weight"] = model.tgt_embed.weight[:, perm]
    for i, layer in enumerate(model.encoder):
        p = f"model.encoder.layers.{i}"
        out.update(_attention_tensors(layer.self_attn, f"{p}.self_attn", perm))
        out.update(_residual_tensors(layer, {"attn_residual": "self_attn_layer_norm",
                                             "ff_residual": "final_layer_norm"}, p, perm))
    for i, layer in enumerate(model.decoder):
        p = f"model.decoder.layers.{i}"
        out.update(_attention_tensors(layer.self_attn, f"{p}.self_attn", perm))
        out.update(_attention_tensors(layer.cross_attn, f"{p}.encoder_attn", perm))
        out.update(_residual_tensors(layer, {"self_residual": "self_attn_layer_norm",
                                             "cross_residual": "encoder_attn_layer_norm",
                                             "ff_residual": "final_layer_norm"}, p, perm))
    if not cfg.tie_output:
        out["lm_head.weight"] = model.output.weight[:, perm]
    out["final_logits_bias"] = torch.zeros(1, cfg.tgt_vocab_size)
    return out


def encoder_decoder(run, out: Path) -> dict:
    """A translation run -> a MarianMTModel folder (config, weights, generation config, tokenizers).

    The source tokenizer (it appends ``</s>``, as qkv's sources end with EOS) is the folder's
    tokenizer; with separate vocabularies the target's is in ``target_tokenizer/``.
    """
    model = run.model
    cfg = model.cfg
    if not hasattr(cfg, "n_heads"):  # the recurrent seq2seq of the same family: no attention heads
        raise ConfigError(f"{run.run_dir}: task {run.cfg.task!r} ({type(model).__name__}) has no Marian "
                          "counterpart: Marian holds the encoder-decoder Transformer")
    check_marian(cfg)
    src_tok, tgt_tok = run.artifacts
    out = prepare_out(out)
    _write_weights(out / WEIGHTS, marian_tensors(model))
    specials = _qkv_specials(src_tok)
    write_tokenizer(out, src_tok, specials=specials, model_max_length=cfg.max_len,
                    single=f"$A {specials['eos_token']}")
    if tgt_tok is not src_tok:
        write_tokenizer(out / "target_tokenizer", tgt_tok, specials=_qkv_specials(tgt_tok),
                        model_max_length=cfg.max_len)
    _write_json(out / "generation_config.json", {
        "decoder_start_token_id": cfg.bos_id, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id, "forced_eos_token_id": None, "suppress_tokens": [cfg.pad_id, cfg.bos_id],
        "num_beams": 1, "max_length": cfg.max_len})
    _write_json(out / CONFIG, marian_config(cfg))
    return summary("hf", out, architecture="MarianMTModel")


# -- decoder-only -> GPT-2 or Llama ----------------------------------------------------------------
def lm_layout(cfg) -> str:
    """"gpt2" or "llama" for a DecoderOnlyConfig; ConfigError naming the keys that fit neither."""
    common = {k: getattr(cfg, k) for k, ok in (("norm_first", True),) if getattr(cfg, k) != ok}
    if cfg.positional == "learned":
        wrong = {**common, **({"norm": cfg.norm} if cfg.norm != "layernorm" else {}),
                 **({"bias": cfg.bias} if not cfg.bias else {})}
        if cfg.activation not in GPT2_ACTIVATIONS:
            wrong["activation"] = cfg.activation
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            wrong["n_kv_heads"] = cfg.n_kv_heads
        refuse("GPT-2", wrong, "norm_first=true, norm=layernorm, activation gelu|gelu_tanh|relu|silu, bias=true, "
                               "n_kv_heads unset (with positional=learned), like configs/shakespeare-char.yaml")
        return "gpt2"
    if cfg.positional == "rope":
        wrong = {**common, **({"norm": cfg.norm} if cfg.norm != "rmsnorm" else {}),
                 **({"activation": cfg.activation} if cfg.activation != "swiglu" else {})}
        refuse("Llama", wrong, "norm_first=true, norm=rmsnorm, activation=swiglu (with positional=rope)")
        return "llama"
    raise ConfigError(f"model.positional={cfg.positional} has no Hugging Face counterpart: GPT-2 needs "
                      "positional=learned (with norm=layernorm, activation gelu), Llama positional=rope (with "
                      "norm=rmsnorm, activation=swiglu)")


def gpt2_tensors(model) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel tensors of a DecoderOnly: Conv1D weights are (in, out), so every Linear is transposed."""
    out = {"transformer.wte.weight": model.embed.weight, "transformer.wpe.weight": model.positions.embedding.weight,
           "transformer.ln_f.weight": model.final_norm.weight, "transformer.ln_f.bias": model.final_norm.bias}
    for i, layer in enumerate(model.layers):
        p = f"transformer.h.{i}"
        for ours, theirs in ((layer.self_attn.qkv_proj, "attn.c_attn"), (layer.self_attn.out_proj, "attn.c_proj"),
                             (layer.ff.w_1, "mlp.c_fc"), (layer.ff.w_2, "mlp.c_proj")):
            out[f"{p}.{theirs}.weight"], out[f"{p}.{theirs}.bias"] = ours.weight.t(), ours.bias
        for ours, theirs in ((layer.self_residual.norm, "ln_1"), (layer.ff_residual.norm, "ln_2")):
            out[f"{p}.{theirs}.weight"], out[f"{p}.{theirs}.bias"] = ours.weight, ours.bias
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.output.weight
    return out


def gpt2_config(model) -> dict:
    cfg = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff or 4 * cfg.d_model, "activation_function": GPT2_ACTIVATIONS[cfg.activation],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout,
        "layer_norm_epsilon": model.final_norm.eps, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "scale_attn_weights": True, "initializer_range": 0.02,
    }


def llama_tensors(model) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors of a DecoderOnly: q, k, v split; SwiGLU's fused gate/up split into halves."""
    bias = model.cfg.bias
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.final_norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        weights, biases = layer.self_attn.qkv_weights()
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            out[f"{p}.self_attn.{name}.weight"] = w
            if bias:
                out[f"{p}.self_attn.{name}.bias"] = b
        gate, up = layer.ff.w_gate_up.weight.chunk(2)
        linears = {"self_attn.o_proj": (layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias),
                   "mlp.down_proj": (layer.ff.w_2.weight, layer.ff.w_2.bias)}
        if bias:
            gate_b, up_b = layer.ff.w_gate_up.bias.chunk(2)
            linears.update({"mlp.gate_proj": (gate, gate_b), "mlp.up_proj": (up, up_b)})
        else:
            linears.update({"mlp.gate_proj": (gate, None), "mlp.up_proj": (up, None)})
        for name, (w, b) in linears.items():
            out[f"{p}.{name}.weight"] = w
            if bias:
                out[f"{p}.{name}.bias"] = b
        out[f"{p}.input_layernorm.weight"] = layer.self_residual.norm.weight
        out[f"{p}.post_attention_layernorm.weight"] = layer.ff_residual.norm.weight
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.output.weight
    return out


def llama_config(model) -> dict:
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff or 4 * cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": model.final_norm.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.position.base)},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.attn_dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id, "initializer_range": 0.02,
    }


def decoder_only(run, out: Path) -> dict:
    """A language-model run -> a GPT2LMHeadModel or LlamaForCausalLM folder with its tokenizer."""
    model = run.model
    cfg = model.cfg
    layout = lm_layout(cfg)
    out = prepare_out(out)
    tensors, config = (gpt2_tensors(model), gpt2_config(model)) if layout == "gpt2" else (
        llama_tensors(model), llama_config(model))
    _write_weights(out / WEIGHTS, tensors)
    write_tokenizer(out, run.artifacts, specials=_qkv_specials(run.artifacts), model_max_length=cfg.block_size)
    _write_json(out / "generation_config.json", {
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "suppress_tokens": [cfg.pad_id]})
    _write_json(out / CONFIG, config)
    return summary("hf", out, architecture=config["architectures"][0])


# -- text encoder -> BERT ----------------------------------------------------------------------------
def _bert_config(encoder) -> dict:
    from qkv.convert import config_to_hf

    try:
        return config_to_hf(encoder.cfg)
    except ValueError as err:  # "cannot save as HF BERT: norm_first=True (BERT has False)"
        raise ConfigError(f"model: {err}; BERT needs norm_first=false, norm=layernorm, positional=learned, "
                          "activation gelu|gelu_tanh|relu, like configs/sst2-scratch.yaml") from None


def _linear_pooler(head, d_model: int) -> dict[str, torch.Tensor]:
    """BertForSequenceClassification's pooler and classifier that compute qkv's head on h_[CLS] (see EPS)."""
    return {"bert.pooler.dense.weight": torch.eye(d_model) * EPS, "bert.pooler.dense.bias": torch.zeros(d_model),
            "classifier.weight": head.weight / EPS, "classifier.bias": head.bias}


def _text_tokenizer(folder: Path, run, max_length: int) -> None:
    """The run's tokenizer as HF files: WordPiece as it is ([CLS] A [SEP]); BPE with ``<s> A </s>``."""
    from qkv.data.wordpiece import SPECIALS, WordPieceTokenizer

    tok = run.artifacts.tokenizer
    if isinstance(tok, WordPieceTokenizer):
        roles = {"pad_token": SPECIALS["pad"], "unk_token": SPECIALS["unk"], "cls_token": SPECIALS["cls"],
                 "sep_token": SPECIALS["sep"]}
        write_tokenizer(folder, tok.tokenizer, specials=roles, model_max_length=max_length, truncate=True)
        return
    specials = _qkv_specials(tok.tokenizer)
    roles = {**specials, "cls_token": specials["bos_token"], "sep_token": specials["eos_token"]}
    write_tokenizer(folder, tok, specials=roles, model_max_length=max_length, truncate=True,
                    single=f"{specials['bos_token']} $A {specials['eos_token']}")


def text_encoder(run, out: Path) -> dict:
    """A text classifier -> BertForSequenceClassification (``pooling=cls`` only); an embedding run ->
    a sentence-transformers folder (BERT, mean or CLS pooling, Normalize)."""
    from qkv.convert import state_dict_to_hf

    model = run.model  # a SequenceClassifier (it has a head) or a SentenceEncoder
    encoder = model.encoder
    config = _bert_config(encoder)
    classifier = hasattr(model, "head")
    if classifier and model.pooling != "cls":
        raise ConfigError(f"model.pooling={model.pooling} has no BertForSequenceClassification counterpart: it "
                          "classifies the [CLS] token (through its pooler); train with model.pooling=cls")
    max_length = run.cfg.data.max_len
    tensors = state_dict_to_hf(encoder)
    out = prepare_out(out)
    if classifier:
        names = run.artifacts.label_names
        config.update(architectures=["BertForSequenceClassification"], id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)}, classifier_dropout=model.dropout.p)
        tensors = {"bert." + k: v for k, v in tensors.items()} | _linear_pooler(model.head, encoder.cfg.d_model)
    _write_weights(out / WEIGHTS, tensors)
    _text_tokenizer(out, run, max_length)
    _write_json(out / CONFIG, config)
    if classifier:
        return summary("hf", out, architecture="BertForSequenceClassification")
    _sentence_transformers(out, model, max_length)
    return summary("hf", out, architecture="BertModel", library="sentence-transformers")


def _sentence_transformers(out: Path, model, max_length: int) -> None:
    """modules.json (Transformer at the root, Pooling, Normalize when the run normalises) and their configs."""
    d = model.encoder.cfg.d_model
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if model.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json_list(out / "modules.json", modules)
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(out / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    (out / "1_Pooling").mkdir(exist_ok=True)
    _write_json(out / "1_Pooling" / CONFIG, {
        "word_embedding_dimension": d, "pooling_mode_cls_token": model.pooling == "cls",
        "pooling_mode_mean_tokens": model.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True})


# -- ViT ------------------------------------------------------------------------------------------------
def vit(run, out: Path) -> dict:
    """An image run -> ViTForImageClassification (a classifier) or ViTModel (an embedder: its unit-length
    embedding is the normalised ``last_hidden_state[:, 0]``), with a ViTImageProcessor config for RGB."""
    from qkv.convert import vit_config_to_hf, vit_state_dict_to_hf

    vit_model = getattr(run.model, "vit", run.model)  # an ImageEmbedder wraps its ViT
    try:
        config = vit_config_to_hf(vit_model.cfg)
    except ValueError as err:
        raise ConfigError(f"model: {err}; HF ViT needs pooling=cls, positional=learned, activation=gelu, "
                          "norm=layernorm, like configs/digits-vit.yaml") from None
    out = prepare_out(out)
    if vit_model.cfg.n_classes:
        names = run.artifacts.label_names
        config.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    _write_weights(out / WEIGHTS, vit_state_dict_to_hf(vit_model, legacy=True))
    a, size = run.artifacts, vit_model.cfg.image_size
    if vit_model.cfg.channels == 3:
        _write_json(out / "preprocessor_config.json", {
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": a.mean,
            "image_std": a.std})
    _write_json(out / CONFIG, config)
    return summary("hf", out, architecture=config["architectures"][0])
