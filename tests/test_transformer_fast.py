"""The encoder-decoder's fast training step (issue 19, item 1): the same maths as the plain path.

``teacher_forcing_loss`` (features at the real targets, the fused chunked projection + smoothed
cross-entropy) against ``sequence_loss`` over ``model(src, tgt_in)`` logits: values and gradients
of every parameter; the encoder's unpadded token-wise layers against the padded ones; padding
never leaks into the loss; and the task's loss takes the fused path on a bare model only.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv.models.transformer as transformer_module
from qkv.models.transformer import Transformer, TransformerConfig, teacher_forcing_loss
from qkv.record import AttentionRecord
from qkv.tasks.translation import TranslationTask, sequence_loss

V, PAD = 29, 0


def model(dtype=torch.float32, *, dropout=0.0, **changes) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(src_vocab_size=V, tgt_vocab_size=V, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
               n_decoder_layers=2, dropout=dropout, attn_dropout=dropout, pad_id=PAD, **changes)
    return Transformer(TransformerConfig(**cfg)).to(dtype)


def batch(seed: int = 1) -> dict:
    """Right-padded src (B, S) and tgt_in/tgt_out (B, T): BOS + y and y + EOS, with lengths 3..T."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (4, 9), generator=g)
    y = torch.randint(3, V, (4, 8), generator=g)
    tgt_in, tgt_out = torch.cat([torch.ones(4, 1, dtype=torch.long), y[:, :-1]], 1), y.clone()
    for row, (s, t) in enumerate([(9, 8), (5, 3), (7, 6), (2, 5)]):
        src[row, s:] = PAD
        tgt_in[row, t:], tgt_out[row, t:] = PAD, PAD
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def plain_loss(m: Transformer, b: dict, eps: float, *, reference_dtype: bool = False):
    """sequence_loss over the logits (float32), or the same sum in the logits' own dtype (float64 reference)."""
    logits = m(b["src"], b["tgt_in"])  # (B, T, V)
    if not reference_dtype:
        return sequence_loss(logits, b["tgt_out"], pad_id=PAD, label_smoothing=eps)
    n = int((b["tgt_out"] != PAD).sum())
    total = F.cross_entropy(logits.reshape(-1, V), b["tgt_out"].reshape(-1), ignore_index=PAD, label_smoothing=eps,
                            reduction="sum")
    return total / n, n


def fused_loss(m: Transformer, b: dict, eps: float, **kwargs):
    return teacher_forcing_loss(m, b["src"], b["tgt_in"], b["tgt_out"], label_smoothing=eps, **kwargs)


def value_and_grads(loss_fn, m: Transformer):
    loss, n = loss_fn()
    return loss.detach(), n, torch.autograd.grad(loss, list(m.parameters()))


def assert_same(a, b, m: Transformer, *, tol: float) -> None:
    (la, na, ga), (lb, nb, gb) = a, b
    assert na == nb
    torch.testing.assert_close(la, lb, atol=tol, rtol=tol)
    for (name, _), x, y in zip(m.named_parameters(), ga, gb):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("changes", [dict(), dict(norm_first=True, share_embeddings=True),
                                     dict(tie_output=False, positional="rope")],
                         ids=["post", "pre-shared", "untied-rope"])
def test_fused_loss_equals_sequence_loss_float32(eps, changes):
    m, b = model(**changes), batch()
    plain = value_and_grads(lambda: plain_loss(m, b, eps), m)
    fused = value_and_grads(lambda: fused_loss(m, b, eps), m)
    assert_same(plain, fused, m, tol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_fused_loss_equals_the_float64_reference(eps, chunk_size):
    m, b = model(torch.float64, norm_first=True), batch(2)
    plain = value_and_grads(lambda: plain_loss(m, b, eps, reference_dtype=True), m)
    fused = value_and_grads(lambda: fused_loss(m, b, eps, chunk_size=chunk_size), m)
    assert_same(plain, fused, m, tol=1e-10)


def test_fused_loss_equals_sequence_loss_with_dropout_on_the_same_seed():
    """In training mode both paths draw the same dropout masks: features runs the layers forward runs."""
    m, b = model(dropout=0.2).train(), batch(3)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        plain = value_and_grads(lambda: plain_loss(m, b, 0.1), m)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        fused = value_and_grads(lambda: fused_loss(m, b, 0.1), m)
    assert_same(plain, fused, m, tol=1e-5)


def test_padding_never_leaks_into_the_fused_loss():
    """Garbage ids at the decoder input's padded positions change neither the loss nor any gradient."""
    m, b = model(torch.float64), batch(4)
    noisy = dict(b, tgt_in=torch.where(b["tgt_in"] == PAD, torch.randint(3, V, b["tgt_in"].shape), b["tgt_in"]))
    assert not torch.equal(noisy["tgt_in"], b["tgt_in"])
    assert_same(value_and_grads(lambda: fused_loss(m, b, 0.1), m),
                value_and_grads(lambda: fused_loss(m, noisy, 0.1), m), m, tol=1e-12)


def test_features_then_the_output_projection_is_forward_exactly():
    m, b = model().eval(), batch()
    with torch.no_grad():
        logits = m(b["src"], b["tgt_in"])
        assert torch.equal(m.output(m.features(b["src"], b["tgt_in"])), logits)
        assert torch.equal(m.decode(b["tgt_in"], *m.encode(b["src"])), logits)
        torch.testing.assert_close(m.features(b["src"], b["tgt_in"]) @ m.output_weight.T, logits)


@pytest.mark.parametrize("tie, share", [(True, False), (True, True), (False, False)])
def test_output_weight_is_the_tied_or_untied_matrix(tie, share):
    m = model(tie_output=tie, share_embeddings=share)
    assert m.output_weight.shape == (V, 32)
    assert m.output_weight is m.output.weight
    assert (m.output_weight is m.tgt_embed.weight) == tie


@pytest.mark.parametrize("norm_first", [False, True])
def test_unpadded_encoder_equals_the_padded_path(norm_first, monkeypatch):
    """Memory and gradients at real source tokens equal; memory at padding is zeros."""
    m, b = model(torch.float64, norm_first=norm_first), batch(5)
    real = b["src"] != PAD
    assert transformer_module.worth_unpadding(real)  # the batch takes the unpadded path

    def run():
        memory, mask = m.encode(b["src"])
        weights = torch.randn(memory.shape, generator=torch.Generator().manual_seed(0), dtype=memory.dtype)
        loss = (memory * weights * real[..., None]).sum()
        return memory.detach(), mask, torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)

    unpadded = run()
    monkeypatch.setattr(transformer_module, "worth_unpadding", lambda mask, **_: False)
    padded = run()
    assert torch.equal(unpadded[1], padded[1])
    torch.testing.assert_close(unpadded[0][real], padded[0][real], atol=1e-12, rtol=1e-12)
    assert torch.equal(unpadded[0][~real], torch.zeros_like(unpadded[0][~real]))
    for x, y in zip(unpadded[2], padded[2]):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_recording_encoder_weights_keeps_the_padded_layout():
    """A record that asks for encoder weights runs the padded path (the weights need (B, H, S, S))."""
    m, b = model().eval(), batch()
    record = AttentionRecord(layers={"encoder": [0]})
    with torch.no_grad():
        logits = m(b["src"], b["tgt_in"], record=record)
        torch.testing.assert_close(logits, m(b["src"], b["tgt_in"]), atol=1e-5, rtol=1e-5)
    assert record.weights["encoder"][0].shape == (4, 4, 9, 9)


class Wrapper(nn.Module):
    """Stands for DDP / FSDP2 / torch.compile: hooks on forward, no ``features``."""

    def __init__(self, inner: Transformer):
        super().__init__()
        self.module = inner
        self.calls = 0

    def forward(self, src, tgt):
        self.calls += 1
        return self.module(src, tgt)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_task_loss_is_fused_on_a_bare_model_and_goes_through_forward_when_wrapped(eps, monkeypatch):
    task = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(pad_id=PAD)))
    m, b = model(), batch()
    wrapped = Wrapper(m)
    through_forward = value_and_grads(lambda: TranslationTask.loss(task, wrapped, b, label_smoothing=eps), m)
    assert wrapped.calls == 1  # a wrapper's hooks (DDP's gradient sync) run on forward only
    monkeypatch.setattr(m.output, "forward", lambda x: pytest.fail("the bare model's loss built (B, T, V) logits"))
    fused = value_and_grads(lambda: TranslationTask.loss(task, m, b, label_smoothing=eps), m)
    assert_same(through_forward, fused, m, tol=1e-5)
