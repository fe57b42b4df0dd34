"""Losses: metric learning for embeddings (triplet, InfoNCE), and the output projection + cross-entropy fused.

* FaceNet (Schroff et al. 2015, sec. 3, Eq. 1): a triplet (anchor a, positive p of a's class,
  negative n of another class) costs ``max(d(a, p) - d(a, n) + margin, 0)``.
* Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss for Person Re-Identification",
  sec. 2: form the triplets inside a batch. *Batch all* averages over every valid triplet whose
  loss is positive (their "BA, != 0" variant: averaging over all triplets would let the many
  easy ones wash the gradient out); *batch hard* takes, per anchor, its farthest positive and
  its nearest negative (Eq. 5). Like Hermans et al. (and unlike FaceNet) the euclidean distance
  is not squared.
* InfoNCE with in-batch negatives (van den Oord et al. 2018; SimCLR's NT-Xent; SimCSE, Gao et
  al. 2021, Eq. 1), generalised to labels as the supervised contrastive loss of Khosla et al.
  2020 (Eq. 2, "L_out"): see ``in_batch_contrastive_loss``.

Distances: ``"cosine"`` is ``1 - cos(a, b)`` (in [0, 2]), ``"euclidean"`` is ``||a - b||_2``.
Every loss is a mean over what is valid in the batch; a batch with nothing valid (no anchor
with both a positive and a negative) gives 0 that is still connected to the graph, so
``backward`` works and gradients are zero, never NaN. Half-precision inputs are computed in float32.

``chunked_projection_cross_entropy`` is the token-level loss of a sequence model, equal to
``F.linear`` then ``F.cross_entropy`` with label smoothing, computed a chunk of rows at a time so
that the (N, V) logits (and their gradient) never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCES = ("cosine", "euclidean")
_EPS = 1e-12  # under the square root: d ||a - b|| / da is undefined at a == b


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(embeddings: torch.Tensor, labels: torch.Tensor, distance: str | None = None) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (B, D), got {tuple(embeddings.shape)}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must have shape (B,) = ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if distance is not None and distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def paired_distance(a: torch.Tensor, b: torch.Tensor, *, distance: str) -> torch.Tensor:
    """Row-wise distances: a (B, D), b (B, D) -> (B,)."""
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1)
    if distance == "euclidean":
        return (a - b).pow(2).sum(-1).clamp_min(_EPS).sqrt()
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def pairwise_distances(x: torch.Tensor, *, distance: str) -> torch.Tensor:
    """All distances within a batch: x (B, D) -> (B, B); the diagonal is (about) 0."""
    if distance == "cosine":
        unit = F.normalize(x, dim=-1)  # (B, D)
        return 1.0 - unit @ unit.T  # (B, B)
    if distance == "euclidean":
        sq = x.pow(2).sum(-1)  # (B,)
        # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b; rounding can make it slightly negative, hence the clamp
        return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(_EPS).sqrt()  # (B, B)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def _label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) (B, B) bool masks: same label and not itself; different label."""
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *, margin: float,
                 distance: str = "cosine") -> torch.Tensor:
    """FaceNet, Eq. 1: mean over rows of max(d(a, p) - d(a, n) + margin, 0). Each input (B, D) -> scalar."""
    if not anchor.shape == positive.shape == negative.shape or anchor.dim() != 2:
        raise ValueError(f"anchor, positive and negative must have one (B, D) shape, got {tuple(anchor.shape)}, "
                         f"{tuple(positive.shape)}, {tuple(negative.shape)}")
    anchor, positive, negative = _upcast(anchor), _upcast(positive), _upcast(negative)
    d_ap = paired_distance(anchor, positive, distance=distance)  # (B,)
    d_an = paired_distance(anchor, negative, distance=distance)  # (B,)
    return F.relu(d_ap - d_an + margin).mean()


def batch_all_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float,
                           distance: str = "cosine") -> torch.Tensor:
    """Hermans et al. 2017, sec. 2, batch all (BA != 0): the mean over valid triplets with a positive loss.

    A triplet (a, p, n) is valid when labels[a] == labels[p], a != p and labels[n] != labels[a];
    its loss is max(d(a, p) - d(a, n) + margin, 0). embeddings (B, D), labels (B,) -> scalar.
    Memory is B^3: meant for batches of up to a few hundred.
    """
    _check(embeddings, labels, distance)
    d = pairwise_distances(_upcast(embeddings), distance=distance)  # (B, B)
    positive, negative = _label_masks(labels)
    valid = positive[:, :, None] & negative[:, None, :]  # (B_a, B_p, B_n)
    losses = F.relu(d[:, :, None] - d[:, None, :] + margin) * valid  # (B_a, B_p, B_n)
    active = int((losses > 0).sum())
    return losses.sum() / max(active, 1)


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float,
                            distance: str = "cosine") -> torch.Tensor:
    """Hermans et al. 2017, sec. 2, Eq. 5, batch hard: per anchor, max(hardest d(a, p) - hardest d(a, n) + margin, 0).

    The hardest positive is the farthest one of the anchor's class, the hardest negative the
    nearest one of another class; the mean runs over anchors that have both. (B, D), (B,) -> scalar.
    """
    _check(embeddings, labels, distance)
    d = pairwise_distances(_upcast(embeddings), distance=distance)  # (B, B)
    positive, negative = _label_masks(labels)
    valid = positive.any(1) & negative.any(1)  # (B,)
    # Fill values outside the mask that can never win: distances are >= 0; anything is nearer than max + 1.
    hardest_positive = d.masked_fill(~positive, 0.0).amax(1)  # (B,)
    hardest_negative = d.masked_fill(~negative, float(d.detach().max()) + 1.0).amin(1)  # (B,)
    losses = F.relu(hardest_positive - hardest_negative + margin)  # (B,)
    return (losses * valid).sum() / max(int(valid.sum()), 1)


def in_batch_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *,
                              temperature: float) -> torch.Tensor:
    """Supervised contrastive loss with in-batch negatives (Khosla et al. 2020, Eq. 2), of which InfoNCE is a case.

    With s_ij = cos(e_i, e_j) / temperature, P(i) the other examples with i's label and A(i)
    every example but i::

        loss = mean over anchors i with P(i) non-empty of
               -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )

    Pairs (SimCSE, Eq. 1; SimCLR's NT-Xent): put both views of N texts in one (2N, D) batch and
    give each pair its own label (``pair_labels(N)``); every anchor then has one positive and
    2N - 2 in-batch negatives, and this is exactly InfoNCE (SimCSE itself scores an anchor only
    against the other view's N texts). embeddings (B, D), labels (B,) -> scalar.
    """
    _check(embeddings, labels)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    unit = F.normalize(_upcast(embeddings), dim=-1)  # (B, D)
    logits = unit @ unit.T / temperature  # (B, B)
    positive, _ = _label_masks(labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    # a finite fill, not -inf: a batch of one would otherwise give inf - inf = NaN gradients
    others = logits.masked_fill(eye, torch.finfo(logits.dtype).min)  # (B, B), i never its own candidate
    log_prob = logits - others.logsumexp(1, keepdim=True)  # (B, B): log p(j | i)
    n_positive = positive.sum(1)  # (B,)
    valid = n_positive > 0
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(1) / n_positive.clamp_min(1)  # (B,)
    return (per_anchor * valid).sum() / max(int(valid.sum()), 1)


def pair_labels(n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Labels (2N,) for a batch of N first views followed by their N second views: [0..N-1, 0..N-1]."""
    return torch.arange(n, device=device).repeat(2)


# --- the output projection and label-smoothed cross-entropy, fused and chunked ----------------------

def chunked_projection_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                     ignore_index: int, label_smoothing: float, chunk_size: int = 512,
                                     recompute: bool = True) -> tuple[torch.Tensor, int]:
    """Mean label-smoothed cross-entropy of logits = hidden W^T, never holding the (N, V) logits.

    hidden (N, D), weight (V, D) (the output projection, no bias), targets (N,) -> (loss, n_tokens):
    the same value as ``F.cross_entropy(F.linear(hidden, weight).float(), targets,
    ignore_index=ignore_index, label_smoothing=eps, reduction="sum") / max(n_tokens, 1)``, i.e.
    qkv.tasks.translation.sequence_loss, with n_tokens the targets that are not ``ignore_index``.
    Logits are computed in hidden's dtype (autocast's under autocast) and reduced in float32, as
    there; float64 stays float64. Smoothing is F.cross_entropy's (Szegedy et al. 2016, sec. 7; sec. 5.4
    of the paper), per token::

        loss_i = (1 - eps) * (lse_i - z_iy) + eps * (lse_i - mean_j z_ij),  lse_i = log sum_j exp z_ij

    Rows whose target is ``ignore_index`` are dropped before the projection (they cost nothing).
    The rest go ``chunk_size`` rows at a time, so memory is O(chunk_size * V) instead of O(N * V).
    ``recompute=True``: the backward pass recomputes each chunk's logits (4 matmuls in all).
    ``recompute=False``: when a gradient will be wanted (grad mode on, hidden or weight requiring
    it), the forward pass computes it while each chunk's logits exist and keeps the (N, D) and
    (V, D) results for backward (3 matmuls, the plain path's count). A batch with no real target
    gives loss 0 (connected to the graph: gradients are zeros) and n_tokens 0.
    """
    _check_projection(hidden, weight, targets, label_smoothing, chunk_size)
    keep = (targets != ignore_index).nonzero().squeeze(1)  # (N_real,)
    n_tokens = int(keep.numel())
    eager = not recompute and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # cast here, as autocast would for F.linear, so that the
        dtype = torch.get_autocast_dtype(device)  # recomputed logits (autocast is off in backward) match
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        loss_sum = _ChunkedProjectionCE.apply(hidden, weight, targets, keep, float(label_smoothing),
                                              int(chunk_size), eager)
    return loss_sum / max(n_tokens, 1), n_tokens


def _check_projection(hidden, weight, targets, label_smoothing, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, D) and weight (V, D) with one D, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be integer ids of shape (N,) = ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, D), (V, D) -> logits (n, V) computed in hidden's dtype, then float32 (float64 stays), as the plain path."""
    logits = F.linear(hidden, weight)  # (n, V)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _add_chunk_grads(probs: torch.Tensor, labels: torch.Tensor, eps: float, hidden: torch.Tensor,
                     weight: torch.Tensor, grad_rows: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """One chunk's d loss / d z = softmax(z) - (1 - eps) [j = y] - eps / V, pushed through the projection.

    probs (n, V) = softmax(z), overwritten; hidden (n, D); writes grad_rows (n, D) = dz W and adds
    dz^T hidden to grad_weight (V, D), both before the upstream gradient's scale.
    """
    if eps:
        probs.sub_(eps / probs.shape[1])
    probs.scatter_add_(1, labels[:, None], probs.new_full((probs.shape[0], 1), eps - 1.0))  # - (1 - eps) at y
    dz = probs.to(hidden.dtype)  # (n, V)
    grad_rows.copy_(dz @ weight)  # (n, D)
    grad_weight.addmm_(dz.T.to(grad_weight.dtype), hidden.to(grad_weight.dtype))  # (V, D)


class _ChunkedProjectionCE(torch.autograd.Function):
    """Summed smoothed cross-entropy over rows ``keep`` of hidden, a chunk of rows at a time.

    d hidden_i = dz_i W and d W = sum_i dz_i^T hidden_i (``_add_chunk_grads``), computed in the
    backward pass from recomputed logits, or in the forward pass when ``eager``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, keep, eps: float, chunk_size: int, eager: bool):
        V = weight.shape[0]
        rows, labels = hidden.index_select(0, keep), targets.index_select(0, keep)  # (N_real, D), (N_real,)
        if eager:
            grad_rows, grad_weight = torch.empty_like(rows), _grad_buffer(weight)
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        lse_parts = []
        for start in range(0, rows.shape[0], chunk_size):
            h, y = rows[start:start + chunk_size], labels[start:start + chunk_size]  # (n, D), (n,)
            z = _chunk_logits(h, weight)  # (n, V)
            lse = z.logsumexp(dim=-1)  # (n,)
            picked = z.gather(1, y[:, None]).squeeze(1)  # (n,)
            loss = lse - (1.0 - eps) * picked - (eps / V) * z.sum(dim=-1) if eps else lse - picked  # (n,)
            total = total + loss.sum()
            if eager:
                probs = z.sub_(lse[:, None]).exp_()  # softmax, in z's memory
                _add_chunk_grads(probs, y, eps, h, weight, grad_rows[start:start + chunk_size], grad_weight)
            else:
                lse_parts.append(lse)
        if eager:
            ctx.save_for_backward(keep, grad_rows, grad_weight)
        else:
            lse = torch.cat(lse_parts) if lse_parts else total.new_zeros(0)  # (N_real,)
            ctx.save_for_backward(hidden, weight, labels, keep, lse)
        ctx.eps, ctx.chunk_size, ctx.eager, ctx.shape = eps, chunk_size, eager, hidden.shape
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.eager:
            keep, grad_rows, grad_weight = ctx.saved_tensors
        else:
            keep, grad_rows, grad_weight = _recompute_grads(ctx)
        hidden_dtype, weight_dtype = ctx.dtypes
        # the upstream gradient scales the (N, D) and (V, D) results, not every (n, V) chunk
        grad_hidden = (grad_rows.new_zeros(ctx.shape).index_copy_(0, keep, grad_rows * grad_total.to(hidden_dtype))
                       if ctx.needs_input_grad[0] else None)
        grad_weight = (grad_weight * grad_total).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """Zeros like weight, accumulated in float32 at least (many chunks add into it)."""
    return torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))


def _recompute_grads(ctx):
    """The backward pass of ``recompute=True``: each chunk's logits again, then its gradients."""
    hidden, weight, labels, keep, lse = ctx.saved_tensors
    rows = hidden.index_select(0, keep)  # (N_real, D)
    grad_rows, grad_weight = torch.empty_like(rows), _grad_buffer(weight)
    for start in range(0, rows.shape[0], ctx.chunk_size):
        part = slice(start, start + ctx.chunk_size)
        probs = _chunk_logits(rows[part], weight).sub_(lse[part, None]).exp_()  # softmax (n, V)
        _add_chunk_grads(probs, labels[part], ctx.eps, rows[part], weight, grad_rows[part], grad_weight)
    return keep, grad_rows, grad_weight
