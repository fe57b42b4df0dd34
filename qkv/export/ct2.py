"""Export to CTranslate2: translation Transformers and decoder-only language models.

Built with CTranslate2's model-spec API (``ctranslate2.specs``), which holds qkv's architectures
exactly: pre- or post-norm, LayerNorm or RMSNorm (with the run's epsilon), ReLU / GELU (erf or
tanh) / SwiGLU, biases or none, grouped-query attention, RoPE (half-split, GPT-NeoX layout:
``rotary_interleave=False``), ALiBi in a decoder-only model, and qkv's own position table for
sinusoidal or learned positions (its interleaved sin/cos layout, written out as the table, not
CTranslate2's concatenated default). Embeddings are scaled by sqrt(d_model) where qkv scales
them; shared and tied embeddings are the same matrix.

The source gets ``</s>`` appended by CTranslate2 (``add_source_eos``), as qkv's ``translate``
does; decoding starts from ``<s>``. qkv sets the log-probs of pad and BOS to -inf after the
softmax (it never predicts them); the export keeps the logits as they are (a -inf bias would
change the softmax's normaliser, so every score), so the log-probs CTranslate2 computes are qkv's.

What CTranslate2 cannot hold is refused with a ConfigError naming the keys: ALiBi in an
encoder-decoder (CTranslate2's encoder has no ALiBi), T5 relative bias buckets (qkv scales the
scores by 1/sqrt(d_k), T5 does not, and the bucket options are not in the spec), and models that
are not Transformers (an RNN translation run).

Length penalty: CTranslate2 divides a hypothesis' log-probability by |Y|^alpha, qkv by GNMT's
((5 + |Y|) / 6)^alpha; they agree at alpha = 0 (raw sums), where the tests compare beam search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qkv.errors import ConfigError

MIN_POSITIONS = 1024  # rows of a sinusoidal table (qkv computes any position; CTranslate2 needs a table)
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")


# -- what maps -------------------------------------------------------------------------------------
def refuse(wrong: dict[str, object], wanted: str) -> None:
    """ConfigError naming the config keys (key -> value) that CTranslate2 cannot hold."""
    if wrong:
        keys = ", ".join(f"model.{k}={v}" for k, v in wrong.items())
        raise ConfigError(f"{keys} has no CTranslate2 counterpart: CTranslate2 needs {wanted}")


def check_transformer(cfg, *, encoder_decoder: bool) -> None:
    """Refuse what the spec cannot hold (see the module docstring), naming the keys."""
    missing = [k for k in ("n_heads", "d_ff", "positional", "norm", "activation") if not hasattr(cfg, k)]
    if missing:
        raise ConfigError(f"the model ({type(cfg).__name__}) is not a Transformer: it has no model.{missing[0]}; "
                          "CTranslate2 holds attention encoder-decoders and decoder-only models, like "
                          "configs/paper-base.yaml")
    wrong: dict[str, object] = {}
    if cfg.positional == "t5" or (encoder_decoder and cfg.positional == "alibi"):
        wrong["positional"] = cfg.positional
    if cfg.activation not in ACTIVATIONS:
        wrong["activation"] = cfg.activation
    supported = "sinusoidal, learned, rope or none" + ("" if encoder_decoder else " or alibi")
    refuse(wrong, f"model.positional={supported} and model.activation={'|'.join(ACTIVATIONS)}")


def _activation(name: str):
    from ctranslate2.specs import common_spec

    act = common_spec.Activation
    return {"relu": act.RELU, "gelu": act.GELU, "gelu_tanh": act.GELUTanh, "swiglu": act.SWISH}[name]


def stack_options(cfg) -> dict:
    """The keyword arguments a CTranslate2 encoder or decoder spec takes for this config."""
    options = dict(pre_norm=cfg.norm_first, activation=_activation(cfg.activation),
                   ffn_glu=cfg.activation == "swiglu", rms_norm=cfg.norm == "rmsnorm",
                   num_heads_kv=cfg.n_kv_heads if cfg.n_kv_heads not in (None, cfg.n_heads) else None)
    if cfg.positional == "rope":
        options.update(rotary_dim=0, rotary_interleave=False, rotary_base=10000.0)
    return options


# -- tensors ---------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def set_linear(spec, linear: torch.nn.Linear | None = None, *, weight=None, bias=None) -> None:
    """A LinearSpec from an nn.Linear, or from a weight (out, in) and bias."""
    if linear is not None:
        weight, bias = linear.weight, linear.bias
    spec.weight = _np(weight)
    if bias is not None:
        spec.bias = _np(bias)


def set_norm(spec, norm: torch.nn.Module) -> None:
    spec.gamma = _np(norm.weight)
    if getattr(norm, "bias", None) is not None:
        spec.beta = _np(norm.bias)


def norm_eps(model: torch.nn.Module) -> float:
    """The epsilon of the model's norms: CTranslate2 takes one for the whole model."""
    found = {m.eps for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))}
    if len(found) != 1 or None in found:
        raise ConfigError(f"the model's norms use the epsilons {sorted(map(str, found))}; CTranslate2 takes one")
    return float(found.pop())


def set_attention(spec, attn) -> None:
    """Self-attention: linear[0] = [W^Q; W^K; W^V] (fused, as qkv's); cross: linear[0] = W^Q, linear[1] = [W^K; W^V]."""
    if attn.cross:
        set_linear(spec.linear[0], attn.q_proj)
        set_linear(spec.linear[1], attn.kv_proj)
    else:
        weights, biases = attn.qkv_weights()
        set_linear(spec.linear[0], weight=torch.cat(weights),
                   bias=torch.cat(biases) if biases[0] is not None else None)
    set_linear(spec.linear[-1], attn.out_proj)


def set_ffn(spec, ff) -> None:
    """FFN: linear_0 (activated), linear_1 (W_2); SwiGLU's up projection is linear_0_noact."""
    if hasattr(spec, "linear_0_noact"):
        w_gate, w_up = ff.w_gate_up.weight.chunk(2, dim=0)  # (F, D) each
        b = ff.w_gate_up.bias
        b_gate, b_up = b.chunk(2) if b is not None else (None, None)
        set_linear(spec.linear_0, weight=w_gate, bias=b_gate)
        set_linear(spec.linear_0_noact, weight=w_up, bias=b_up)
    else:
        set_linear(spec.linear_0, ff.w_1)
    set_linear(spec.linear_1, ff.w_2)


def set_encoder_layer(spec, block) -> None:
    set_attention(spec.self_attention, block.self_attn)
    set_norm(spec.self_attention.layer_norm, block.attn_residual.norm)
    set_ffn(spec.ffn, block.ff)
    set_norm(spec.ffn.layer_norm, block.ff_residual.norm)


def set_decoder_layer(spec, block) -> None:
    set_attention(spec.self_attention, block.self_attn)
    set_norm(spec.self_attention.layer_norm, block.self_residual.norm)
    if block.cross_attn is not None:
        set_attention(spec.attention, block.cross_attn)
        set_norm(spec.attention.layer_norm, block.cross_residual.norm)
    set_ffn(spec.ffn, block.ff)
    set_norm(spec.ffn.layer_norm, block.ff_residual.norm)


def position_table(positions: torch.nn.Module | None, *, d_model: int, rows: int) -> np.ndarray:
    """qkv's absolute position vectors for positions 0 .. rows-1 (rows, D); zeros when there are none
    (RoPE, ALiBi or no positions: CTranslate2's encoder would otherwise add its own sinusoids)."""
    if positions is None:
        return np.zeros((rows, d_model), dtype=np.float32)
    with torch.no_grad():
        return _np(positions(rows))  # (rows, D)


def set_stack_inputs(spec, embedding, positions, *, d_model: int, rows: int) -> None:
    """Embeddings (scaled by sqrt(D) where qkv scales them) and the position table of one stack."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings  # encoder: a list
    embeddings.weight = _np(embedding.weight)
    spec.scale_embeddings = embedding.scale != 1.0
    if hasattr(spec, "position_encodings"):
        spec.position_encodings.encodings = position_table(positions, d_model=d_model, rows=rows)


# -- vocabularies ----------------------------------------------------------------------------------
def vocabulary(tokenizer) -> list[str]:
    """The token string of every id, in id order (CTranslate2 maps tokens to ids with it)."""
    if hasattr(tokenizer, "chars"):  # a CharTokenizer: its specials, then one token per character
        from qkv.data.tokenizer import CHAR_SPECIAL_TOKENS

        tokens = [*CHAR_SPECIAL_TOKENS, *tokenizer.chars]
    else:
        tokens = [tokenizer.tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    if len(set(tokens)) != len(tokens) or any(t is None for t in tokens):
        raise ConfigError("the tokenizer's tokens are not distinct strings; CTranslate2 needs one string per id")
    return tokens


def special_tokens(tokens: list[str], model_cfg) -> dict[str, str]:
    return {"bos_token": tokens[model_cfg.bos_id], "eos_token": tokens[model_cfg.eos_id]}


# -- the exporters ---------------------------------------------------------------------------------
def translation(run, out: Path) -> dict:
    """An encoder-decoder Transformer as a CTranslate2 ``TransformerSpec`` model folder (model.bin,
    config.json, source/target or shared vocabulary) plus qkv's tokenizers (``source_tokenizer.json``,
    ``target_tokenizer.json``); use it with ``ctranslate2.Translator(out).translate_batch(tokens)``."""
    cfg, model = run.cfg.model, run.model
    check_transformer(cfg, encoder_decoder=True)
    _requires_ctranslate2()
    from ctranslate2.specs import transformer_spec

    options = stack_options(cfg)
    encoder = transformer_spec.TransformerEncoderSpec(cfg.n_encoder_layers, cfg.n_heads, **options)
    decoder = transformer_spec.TransformerDecoderSpec(cfg.n_decoder_layers, cfg.n_heads, **options)
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    rows = cfg.max_len if cfg.positional == "learned" else max(cfg.max_len, MIN_POSITIONS)
    set_stack_inputs(encoder, model.src_embed, model.positions, d_model=cfg.d_model, rows=rows)
    set_stack_inputs(decoder, model.tgt_embed, model.positions, d_model=cfg.d_model, rows=rows)
    for layer_spec, block in zip(encoder.layer, model.encoder):
        set_encoder_layer(layer_spec, block)
    for layer_spec, block in zip(decoder.layer, model.decoder):
        set_decoder_layer(layer_spec, block)
    if cfg.norm_first:
        set_norm(encoder.layer_norm, model.encoder_norm)
        set_norm(decoder.layer_norm, model.decoder_norm)
    set_linear(decoder.projection, model.output)
    src_tok, tgt_tok = run.artifacts
    source, target = vocabulary(src_tok), vocabulary(tgt_tok)
    spec.register_source_vocabulary(source)
    spec.register_target_vocabulary(target)
    specials = special_tokens(target, cfg)
    spec.config.bos_token, spec.config.eos_token = specials["bos_token"], specials["eos_token"]
    spec.config.decoder_start_token = specials["bos_token"]
    spec.config.unk_token = _unk(target)
    spec.config.add_source_eos = True
    spec.config.layer_norm_epsilon = norm_eps(model)
    tokenizers = {"source_tokenizer.json": src_tok, "target_tokenizer.json": tgt_tok}
    return _save(run, out, spec, tokenizers, max_positions=rows)


def language_model(run, out: Path) -> dict:
    """A decoder-only Transformer as a CTranslate2 ``TransformerDecoderModelSpec`` folder (model.bin,
    config.json, vocabulary.json) plus qkv's ``tokenizer.json``; use it with
    ``ctranslate2.Generator(out).generate_batch(start_tokens)``."""
    cfg, model = run.cfg.model, run.model
    check_transformer(cfg, encoder_decoder=False)
    _requires_ctranslate2()
    from ctranslate2.specs import transformer_spec

    options = stack_options(cfg)
    if cfg.positional == "alibi":
        options["alibi"] = True
    decoder = transformer_spec.TransformerDecoderSpec(cfg.n_layers, cfg.n_heads, with_encoder_attention=False,
                                                      **options)
    spec = transformer_spec.TransformerDecoderModelSpec(decoder)
    rows = cfg.block_size
    set_stack_inputs(decoder, model.embed, model.positions, d_model=cfg.d_model, rows=rows)
    for layer_spec, block in zip(decoder.layer, model.layers):
        set_decoder_layer(layer_spec, block)
    if cfg.norm_first:
        set_norm(decoder.layer_norm, model.final_norm)
    set_linear(decoder.projection, model.output)
    tokens = vocabulary(run.artifacts)
    spec.register_vocabulary(tokens)
    specials = special_tokens(tokens, cfg)
    spec.config.bos_token, spec.config.eos_token = specials["bos_token"], specials["eos_token"]
    spec.config.unk_token = _unk(tokens)
    spec.config.layer_norm_epsilon = norm_eps(model)
    return _save(run, out, spec, {"tokenizer.json": run.artifacts}, max_positions=rows)


def _unk(tokens: list[str]) -> str:
    """The unknown token: "<unk>" when the vocabulary has it; else a token CTranslate2 never emits for
    text the tokenizer made (a CharTokenizer has no unk; its pad stands in, so no id is added)."""
    return "<unk>" if "<unk>" in tokens else tokens[0]


def _save(run, out: Path, spec, tokenizers: dict, *, max_positions: int) -> dict:
    from qkv.export import prepare_out, summary

    out = prepare_out(out)
    spec.validate()
    spec.optimize(quantization=None)
    spec.save(str(out))
    for name, tokenizer in tokenizers.items():
        tokenizer.save(out / name)
    return summary("ctranslate2", out, kind=run.kind, spec=spec.name, max_positions=max_positions,
                   length_penalty="CTranslate2 divides by |Y|^alpha, qkv by ((5 + |Y|) / 6)^alpha: equal at alpha=0")


def _requires_ctranslate2() -> None:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        raise ConfigError("exporting to CTranslate2 needs ctranslate2: pip install 'qkv[export]'") from None
