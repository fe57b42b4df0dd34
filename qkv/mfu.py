"""Model FLOPs utilisation (MFU, PaLM, Chowdhery et al. 2022, appendix B) for the training log.

    MFU = model FLOPs per token x tokens per second / (peak FLOP/s x devices)

*Model FLOPs per token* are counted, not derived from a family's formula, so every family gets
the figure: one forward pass over a real training batch runs under ``FlopCounterMode`` (matmuls,
convolutions, SDPA), and training costs three forward passes (the backward pass is two:
gradients of the activations and of the weights; Kaplan et al. 2020's 6N = 2N + 4N). For a GPT
this is nanoGPT's ``estimate_mfu`` (6N + 12 L H Q T per token) up to the embedding lookup.
A "token" is what the task's loss counts (target tokens, or examples for classification), the
same unit as ``tokens_per_s`` in the log; padding FLOPs count as spent, so padded batches lower MFU.

*Peak FLOP/s* per device: ``train.peak_tflops``, else ``$QKV_PEAK_TFLOPS``, else on CUDA the
measured throughput of a large matmul in the training precision (which is below the data
sheet's figure: quote the data sheet's number via the config to compare with published MFUs).
On CPU without a configured peak there is no MFU figure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def forward_flops(run: Callable[[], object]) -> int:
    """FLOPs that ``run()`` performs (no gradients are recorded)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


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
