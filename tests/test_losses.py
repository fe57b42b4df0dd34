"""qkv.losses: metric-learning losses against brute-force loops over triplets and anchors, in float64; the
fused chunked projection + cross-entropy against F.linear + F.cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.losses import (
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    chunked_projection_cross_entropy,
    in_batch_contrastive_loss,
    pair_labels,
    pairwise_distances,
    triplet_loss,
)

DISTANCES = ["cosine", "euclidean"]


def dist(a: torch.Tensor, b: torch.Tensor, distance: str) -> float:
    if distance == "cosine":
        return 1.0 - float(a @ b) / (float(a.norm()) * float(b.norm()))
    return float((a - b).norm())


def batch(n: int = 9, d: int = 5, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[:classes] = torch.arange(classes)  # every class present
    labels[classes] = 0  # and class 0 twice: some positive exists
    return x, labels


def brute_batch_all(x, labels, margin, distance) -> float:
    total, active = 0.0, 0
    n = len(x)
    for a in range(n):
        for p in range(n):
            for neg in range(n):
                if a == p or labels[a] != labels[p] or labels[neg] == labels[a]:
                    continue
                loss = max(dist(x[a], x[p], distance) - dist(x[a], x[neg], distance) + margin, 0.0)
                if loss > 0:
                    total, active = total + loss, active + 1
    return total / max(active, 1)


def brute_batch_hard(x, labels, margin, distance) -> float:
    losses = []
    for a in range(len(x)):
        pos = [dist(x[a], x[p], distance) for p in range(len(x)) if p != a and labels[p] == labels[a]]
        neg = [dist(x[a], x[n], distance) for n in range(len(x)) if labels[n] != labels[a]]
        if pos and neg:
            losses.append(max(max(pos) - min(neg) + margin, 0.0))
    return sum(losses) / max(len(losses), 1)


def brute_contrastive(x, labels, temperature) -> float:
    n = len(x)
    s = [[float(F.cosine_similarity(x[i], x[j], dim=0)) / temperature for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(s[i][a]) for a in range(n) if a != i))
        losses.append(-sum(s[i][p] - log_denominator for p in positives) / len(positives))
    return sum(losses) / max(len(losses), 1)


@pytest.mark.parametrize("distance", DISTANCES)
def test_pairwise_distances(distance):
    x, _ = batch()
    d = pairwise_distances(x, distance=distance)
    for i in range(len(x)):
        for j in range(len(x)):
            # the diagonal is sqrt(1e-12) for euclidean: the clamp that keeps gradients finite
            assert abs(float(d[i, j]) - (0.0 if i == j else dist(x[i], x[j], distance))) < 2e-6


@pytest.mark.parametrize("distance", DISTANCES)
def test_triplet_loss_matches_loop(distance):
    x, _ = batch(n=12)
    a, p, n = x[:4], x[4:8], x[8:]
    expected = sum(max(dist(a[i], p[i], distance) - dist(a[i], n[i], distance) + 0.5, 0.0) for i in range(4)) / 4
    assert float(triplet_loss(a, p, n, margin=0.5, distance=distance)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_all_matches_loop(distance, seed):
    x, labels = batch(seed=seed)
    for margin in (0.1, 1.0):
        got = float(batch_all_triplet_loss(x, labels, margin=margin, distance=distance))
        assert got == pytest.approx(brute_batch_all(x, labels, margin, distance), abs=1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_loop(distance, seed):
    x, labels = batch(seed=seed)
    for margin in (0.1, 1.0):
        got = float(batch_hard_triplet_loss(x, labels, margin=margin, distance=distance))
        assert got == pytest.approx(brute_batch_hard(x, labels, margin, distance), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_matches_loop(seed):
    x, labels = batch(seed=seed)
    for temperature in (0.05, 1.0):
        got = float(in_batch_contrastive_loss(x, labels, temperature=temperature))
        assert got == pytest.approx(brute_contrastive(x, labels, temperature), abs=1e-9)


def test_contrastive_with_pair_labels_is_infonce():
    """Two views of N texts, one label per pair: cross-entropy over the 2N - 1 other texts, target the twin."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    unit = F.normalize(x, dim=-1)
    logits = (unit @ unit.T / 0.1).masked_fill(torch.eye(10, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(5, 10), torch.arange(5)])
    expected = F.cross_entropy(logits, targets)
    assert float(in_batch_contrastive_loss(x, pair_labels(5), temperature=0.1)) == pytest.approx(float(expected))


def test_well_separated_classes():
    """Triplet losses are 0 once the classes sit farther apart than the margin; SupCon reaches its
    minimum, the mean over anchors of log |P(i)| (all positives equally likely, negatives never)."""
    _, labels = batch(n=12, classes=2)
    separated = torch.stack([torch.tensor([1.0, 0.0]) if c == 0 else torch.tensor([0.0, 1.0]) for c in labels])
    separated = separated.double() + 1e-3 * torch.randn(12, 2, dtype=torch.float64)
    for loss in (batch_hard_triplet_loss, batch_all_triplet_loss):
        assert float(loss(separated, labels, margin=0.2, distance="cosine")) == 0.0
    counts = torch.bincount(labels)[labels] - 1  # |P(i)|
    floor = float(counts.double().log().mean())
    assert float(in_batch_contrastive_loss(separated, labels, temperature=0.01)) == pytest.approx(floor, abs=1e-3)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3], [5]], ids=["one-class", "all-distinct", "single"])
def test_no_valid_triplet_gives_zero_with_grad(distance, labels):
    x = torch.randn(len(labels), 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    losses = [batch_all_triplet_loss(x, y, margin=0.3, distance=distance),
              batch_hard_triplet_loss(x, y, margin=0.3, distance=distance)]
    if len(set(labels)) == len(labels):  # no positive pair: the contrastive loss has nothing either
        losses.append(in_batch_contrastive_loss(x, y, temperature=0.1))
    for loss in losses:
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_are_finite_with_duplicates(distance):
    """Identical embeddings (distance 0) must not give NaN gradients through the square root."""
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    for loss in (batch_all_triplet_loss(x, y, margin=1.0, distance=distance),
                 batch_hard_triplet_loss(x, y, margin=1.0, distance=distance),
                 in_batch_contrastive_loss(x, y, temperature=0.1)):
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["batch_all", "batch_hard", "contrastive"])
def test_gradcheck(name):
    x, labels = batch(n=6, d=3, classes=2, seed=4)
    x.requires_grad_(True)
    fn = {"batch_all": lambda e: batch_all_triplet_loss(e, labels, margin=2.0, distance="euclidean"),
          "batch_hard": lambda e: batch_hard_triplet_loss(e, labels, margin=2.0, distance="cosine"),
          "contrastive": lambda e: in_batch_contrastive_loss(e, labels, temperature=0.5)}[name]
    assert torch.autograd.gradcheck(fn, (x,))


def test_half_precision_is_computed_in_float32():
    x, labels = batch()
    got = batch_hard_triplet_loss(x.bfloat16(), labels, margin=0.5)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(batch_hard_triplet_loss(x, labels, margin=0.5)), abs=0.05)


def test_bad_arguments():
    x, labels = batch()
    with pytest.raises(ValueError, match="distance"):
        batch_hard_triplet_loss(x, labels, margin=0.1, distance="manhattan")
    with pytest.raises(ValueError, match="labels must have shape"):
        batch_all_triplet_loss(x, labels[:-1], margin=0.1)
    with pytest.raises(ValueError, match="temperature"):
        in_batch_contrastive_loss(x, labels, temperature=0.0)
    with pytest.raises(ValueError, match="one \\(B, D\\) shape"):
        triplet_loss(x, x[:2], x, margin=0.1)


# --- the fused, chunked output projection + label-smoothed cross-entropy ---------------------------


def projection_batch(n: int, d: int, v: int, dtype: torch.dtype, *, pad_every: int = 4, seed: int = 0):
    """hidden (n, d), weight (v, d), targets (n,) with every pad_every-th target = PAD (0)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(1, v, (n,), generator=g)
    targets[::pad_every] = 0
    return hidden, weight, targets


def plain_projection_loss(hidden, weight, targets, *, pad_id, label_smoothing):
    """The unfused path, qkv.tasks.translation.sequence_loss's arithmetic (float64 kept): (mean loss, n_tokens)."""
    n_tokens = int((targets != pad_id).sum())
    logits = F.linear(hidden, weight)  # (N, V)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(wide, targets, ignore_index=pad_id, label_smoothing=label_smoothing, reduction="sum")
    return loss_sum / max(n_tokens, 1), n_tokens


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [7, 10, 64])  # 7 does not divide the 30 real rows, 10 does; 64 > N
def test_chunked_projection_ce_equals_plain_loss_and_gradients(dtype, tol, label_smoothing, chunk_size, recompute):
    hidden, weight, targets = projection_batch(40, 8, 23, dtype)
    loss, n = chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0,
                                               label_smoothing=label_smoothing, chunk_size=chunk_size,
                                               recompute=recompute)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref, ref_n = plain_projection_loss(hidden, weight, targets, pad_id=0, label_smoothing=label_smoothing)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert n == ref_n == 30
    assert loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert float(grads[0][targets == 0].abs().max()) == 0.0  # padding rows get no gradient


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_projection_ce_equals_sequence_loss_with_a_scaled_upstream_gradient(recompute):
    from qkv.tasks.translation import sequence_loss

    hidden, weight, targets = projection_batch(3 * 11, 6, 17, torch.float32, pad_every=5, seed=1)
    loss, n = chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.1,
                                               chunk_size=4, recompute=recompute)
    ref, ref_n = sequence_loss(F.linear(hidden, weight).view(3, 11, 17), targets.view(3, 11), pad_id=0,
                               label_smoothing=0.1)
    assert n == ref_n
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(2.5 * loss, (hidden, weight))
    want = torch.autograd.grad(2.5 * ref, (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_projection_ce_with_tied_weights_accumulates_both_uses(recompute):
    """A tied output projection (sec. 3.4) is also the embedding: its gradient sums both uses."""
    g = torch.Generator().manual_seed(2)
    table = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(1, 13, (9,), generator=g)
    targets = torch.randint(1, 13, (9,), generator=g)
    fused, _ = chunked_projection_cross_entropy(table[ids].tanh(), table, targets, ignore_index=0,
                                                label_smoothing=0.1, chunk_size=2, recompute=recompute)
    plain, _ = plain_projection_loss(table[ids].tanh(), table, targets, pad_id=0, label_smoothing=0.1)
    torch.testing.assert_close(torch.autograd.grad(fused, table)[0], torch.autograd.grad(plain, table)[0])


def test_chunked_projection_ce_eager_gradients_only_when_wanted():
    """recompute=False computes gradients in the forward pass only under grad mode; the loss is the same."""
    hidden, weight, targets = projection_batch(20, 4, 9, torch.float64)
    with torch.no_grad():
        loss, _ = chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.1,
                                                   recompute=False)
    assert loss.grad_fn is None
    ref, _ = chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.1)
    assert float(loss) == pytest.approx(float(ref.detach()), abs=1e-12)
    frozen, _ = chunked_projection_cross_entropy(hidden, weight.detach(), targets, ignore_index=0,
                                                 label_smoothing=0.1, recompute=False)
    torch.testing.assert_close(torch.autograd.grad(frozen, hidden)[0], torch.autograd.grad(ref, hidden)[0])


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_projection_ce_all_padding_gives_zero_and_zero_gradients(recompute):
    hidden, weight, _ = projection_batch(6, 4, 9, torch.float32)
    loss, n = chunked_projection_cross_entropy(hidden, weight, torch.zeros(6, dtype=torch.long), ignore_index=0,
                                               label_smoothing=0.1, recompute=recompute)
    loss.backward()
    assert n == 0 and float(loss.detach()) == 0.0
    assert float(hidden.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0


def test_chunked_projection_ce_rejects_bad_arguments():
    hidden, weight, targets = projection_batch(6, 4, 9, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        chunked_projection_cross_entropy(hidden, weight[:, :3], targets, ignore_index=0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="targets"):
        chunked_projection_cross_entropy(hidden, weight, targets[:5], ignore_index=0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.0, chunk_size=0)


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_projection_ce_in_bfloat16_matches_the_plain_path_to_its_rounding(recompute):
    hidden, weight, targets = projection_batch(64, 16, 40, torch.bfloat16, seed=3)
    loss, _ = chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.1,
                                               chunk_size=24, recompute=recompute)
    ref, _ = plain_projection_loss(hidden, weight, targets, pad_id=0, label_smoothing=0.1)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits, reduced in float32
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


def test_chunked_projection_ce_under_autocast_matches_the_plain_path():
    """bf16 autocast (train.precision: bf16) casts the projection; the backward's recomputed logits must be
    the forward's bf16 ones (autocast is off in backward), so both modes give the same gradients."""
    hidden, weight, targets = projection_batch(48, 16, 40, torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [chunked_projection_cross_entropy(hidden, weight, targets, ignore_index=0, label_smoothing=0.1,
                                                   chunk_size=20, recompute=recompute)[0]
                  for recompute in (True, False)]
        ref, _ = plain_projection_loss(hidden, weight, targets, pad_id=0, label_smoothing=0.1)
    recomputed, eager = (torch.autograd.grad(loss, (hidden, weight)) for loss in losses)
    for a, b, want in zip(recomputed, eager, torch.autograd.grad(ref, (hidden, weight))):
        assert a.dtype == b.dtype == want.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, want, rtol=2e-2, atol=2e-3)
    for loss in losses:
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
