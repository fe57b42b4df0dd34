"""Helpers shared by the benchmark scripts: arguments, timing, peak memory, matmul peak, JSON output.

Every script prints one JSON object per line. A comparison line has the keys
``bench, ours_s, baseline, baseline_s, ratio`` with ratio = baseline_s / ours_s, so ratio > 1
means qkv is faster; other lines (memory, fraction of peak) say what they hold in their keys.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import time
from collections.abc import Callable

import torch


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--quick`` (fewer repeats, smaller shapes; under a minute on 2 CPU cores)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller shapes, for CI and smoke tests")
    return p


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so a timer read after this measures finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fns(*fns: Callable[[], object], warmup: int = 2, repeats: int = 5,
             device: torch.device | str = "cpu") -> list[float]:
    """Median wall-clock seconds of each ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The functions take turns (a b a b ...), so a slow spell of a shared machine hits all alike.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5,
            device: torch.device | str = "cpu") -> float:
    """Median wall-clock seconds of ``fn()``; see ``time_fns``."""
    return time_fns(fn, warmup=warmup, repeats=repeats, device=device)[0]


def emit_info(bench: str, **fields) -> None:
    """Print one JSON object on one line: {"bench": ..., **fields}."""
    print(json.dumps({"bench": bench, **fields}), flush=True)


def emit(bench: str, ours_s: float, baseline: str, baseline_s: float, **extra) -> None:
    """Print one comparison line; ratio = baseline_s / ours_s (> 1: qkv is faster)."""
    emit_info(bench, ours_s=round(ours_s, 6), baseline=baseline, baseline_s=round(baseline_s, 6),
              ratio=round(baseline_s / ours_s, 3), **extra)


def _square_matmuls(dtype: torch.dtype, device: torch.device | str, sizes: tuple[int, ...]):
    """One zero-argument n x n matmul per size, and the FLOPs (2 n^3) of each."""
    fns, flops = [], []
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        fns.append(lambda a=a, b=b: a @ b)
        flops.append(2 * n**3)
    return fns, flops


def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      sizes: tuple[int, ...] = (512, 1024, 2048)) -> float:
    """Achievable matmul FLOP/s on this machine: the best 2 n^3 / t over square n x n matmuls.

    A measured ceiling, not the datasheet's; a kernel's fraction of peak is its FLOP/s over this.
    """
    fns, flops = _square_matmuls(dtype, device, sizes)
    times = time_fns(*fns, warmup=1, repeats=3, device=device)
    return max(f / t for f, t in zip(flops, times))


def fraction_of_peak(fn: Callable[[], object], flops: float, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", sizes: tuple[int, ...] = (512, 1024, 2048),
                     repeats: int = 3) -> dict:
    """``fn``'s FLOP/s as a fraction of ``matmul_peak_flops``, the two timed in turns.

    Timing the kernel and the matmuls alternately keeps a busy spell of a shared machine from
    landing on one side of the fraction only.
    """
    mm_fns, mm_flops = _square_matmuls(dtype, device, sizes)
    fn_s, *mm_s = time_fns(fn, *mm_fns, warmup=1, repeats=repeats, device=device)
    peak = max(f / t for f, t in zip(mm_flops, mm_s))
    return {"fraction": round(flops / fn_s / peak, 3), "gflops": round(flops / fn_s / 1e9, 1),
            "peak_gflops": round(peak / 1e9, 1)}


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Extra memory at the peak of one ``fn()`` call, above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call (tensors
    only, not the caching allocator's reserve). CPU (Linux): the process's peak resident set size
    (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus its resident size before the call;
    that counts every page the call touched, torch's tensors and library buffers alike. Freed
    memory that malloc keeps for reuse hides from this count, so call it in a fresh process
    (``run_isolated``) after warming up on a small input.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - before) * 1024


def run_isolated(fn: Callable, *args):
    """``fn(*args)`` in a fresh Python process (spawned, so no memory is inherited); returns its result.

    ``fn`` must be a module-level function of the calling script, and the script must guard its
    entry point with ``if __name__ == "__main__":``.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
