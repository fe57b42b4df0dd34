"""Model FLOPs utilisation (MFU, PaLM, Chowdhery et al. 2022, appendix B) for the training log.

    MFU = model FLOPs per token x tokens per second / (peak FLOP/s x devices)

*Model FLOPs per token* are counted, not derived from a family's formula, so every family gets
the figure: one forward pass over a real training batch runs under a counter with PyTorch's
FLOP formulas (torch.utils.flop_counter: matmuls, convolutions, SDPA), and training costs three
forward passes (the backward pass is two: gradients of the activations and of the weights;
Kaplan et al. 2020's 6N = 2N + 4N). For a GPT this is nanoGPT's ``estimate_mfu``
(6N + 12 L H Q T per token) up to the embedding lookup. A "token" is what the task's loss counts
(target tokens, or examples for classification), the same unit as ``tokens_per_s`` in the log;
padding FLOPs count as spent, so padded batches lower MFU.

*Peak FLOP/s* per device: ``train.peak_tflops``, else ``$QKV_PEAK_TFLOPS``, else on CUDA the
measured throughput of a large matmul in the training precision (which is below the data
sheet's figure: quote the data sheet's number via the config to compare with published MFUs).
On CPU without a configured peak there is no MFU figure.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

log = logging.getLogger(__name__)


class _CountFlops(TorchDispatchMode):
    """Adds up the FLOPs of every op PyTorch's flop counter has a formula for (matmuls, convs, SDPA).

    FlopCounterMode itself also tracks modules, which fails under no_grad; this counts only."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        elif func._overloadpacket is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            self.total += sdpa_flops(args[0].shape, args[1].shape, args[2].shape)
        return out


def sdpa_flops(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    """Q K^T and (weights) V: 2 B H T S Dh + 2 B H T S Dv, as torch.utils.flop_counter counts the GPU kernels
    (full T x S, causal or not). q (B, H, T, Dh), k (B, H, S, Dh), v (B, H, S, Dv)."""
    *batch, t, d_head = q
    s, d_value = k[-2], v[-1]
    n = math.prod(batch)
    return 2 * n * t * s * d_head + 2 * n * t * s * d_value


def forward_flops(run: Callable[[], object]) -> int:
    """FLOPs that ``run()`` performs (no gradients are recorded)."""
    with torch.no_grad(), _CountFlops() as counter:
        run()
    return counter.total


def training_flops_per_token(forward: int, tokens: int) -> float:
    """Forward + backward FLOPs per token: 3 x the forward pass."""
    return 3.0 * forward / max(tokens, 1)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul on ``device``: 2 n^3 per product, best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 2):  # two warm-up products
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(configured_tflops: float, device: torch.device, dtype: torch.dtype | None,
               environ=os.environ) -> float | None:
    """Peak FLOP/s of one device: the config's, the environment's, a measured one on CUDA, or None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    raw = environ.get("QKV_PEAK_TFLOPS")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if value > 0:
            return value * 1e12
        log.warning("QKV_PEAK_TFLOPS=%r is not a positive number; ignored", raw)
    if device.type != "cuda":
        return None
    peak = measured_matmul_peak(device, dtype or torch.float32)
    log.info("peak for MFU: measured %.1f TFLOP/s (%s matmul); set train.peak_tflops to use the data sheet's",
             peak / 1e12, dtype or torch.float32)
    return peak


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, devices: int) -> float:
    """PaLM's model FLOPs utilisation, a fraction of the devices' peak."""
    return flops_per_token * tokens_per_s / (peak * devices)
