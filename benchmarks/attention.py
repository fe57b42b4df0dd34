"""Attention speed and memory (issue 3): forward + backward, qkv against what a user would write.

Two like-for-like comparisons, each for (B, T, D, H) in CONFIGS, causal and not:

    kind=core   q, k, v (B, H, T, Dh) -> out: qkv.attention.scaled_dot_product_attention (fused
                path) against naive_attention below (q @ k^T, masked_fill, softmax, @ v).
    kind=layer  x (B, T, D) -> (B, T, D): qkv.layers.MultiHeadAttention(D, H) against
                torch.nn.MultiheadAttention(D, H, batch_first=True) called as a user who wants
                speed would: need_weights=False, and for causal a bool attn_mask with is_causal=True.

Then the extra peak memory of one forward + backward at the longest T (core, ours vs naive), and
the fraction of this machine's matmul peak our attention core reaches at the largest config.
Dropout 0, modules in eval mode, gradients on. Run: python benchmarks/attention.py [--quick]
"""

from __future__ import annotations

import math

import torch
from _common import emit, emit_info, fraction_of_peak, parser, peak_memory_bytes, run_isolated, time_fns
from torch import nn

from qkv.attention import scaled_dot_product_attention
from qkv.layers import MultiHeadAttention

CONFIGS = [(32, 128, 256, 4), (8, 512, 512, 8), (2, 2048, 512, 8)]  # (B, T, D, H)
QUICK_CONFIGS = [(32, 128, 256, 4), (8, 512, 512, 8), (2, 1024, 512, 8)]  # largest T halved
NN_MHA_CALL = "need_weights=False, attn_mask=bool triu (causal only), is_causal=causal"


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V written out by hand: every (T, S) intermediate is materialised."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if causal:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)  # True = hidden
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)


def core_steps(B: int, T: int, D: int, H: int, causal: bool) -> dict:
    """One forward + backward of each attention core, as zero-argument callables."""
    q, k, v = (torch.randn(B, H, T, D // H, requires_grad=True) for _ in range(3))  # (B, H, T, Dh)
    grad_out = torch.randn(B, H, T, D // H)

    def step(attend):
        return lambda: torch.autograd.grad(attend(), (q, k, v), grad_out)

    return {
        "ours": step(lambda: scaled_dot_product_attention(q, k, v, causal=causal)),
        "naive": step(lambda: naive_attention(q, k, v, causal)),
    }


def layer_steps(B: int, T: int, D: int, H: int, causal: bool) -> dict:
    """One forward + backward of each multi-head attention layer, with the same weights."""
    ours = MultiHeadAttention(D, H).eval()
    theirs = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        ours.qkv_proj.weight.copy_(theirs.in_proj_weight)  # both stack q, k, v rows in that order
        ours.qkv_proj.bias.copy_(theirs.in_proj_bias)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)
    x = torch.randn(B, T, D, requires_grad=True)
    grad_out = torch.randn(B, T, D)
    future = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None  # torch's convention: True = hidden

    def run_ours():
        return ours(x, causal=causal)

    def run_theirs():
        return theirs(x, x, x, attn_mask=future, is_causal=causal, need_weights=False)[0]

    with torch.no_grad():  # a like-for-like comparison must compute the same function
        torch.testing.assert_close(run_ours(), run_theirs(), atol=1e-4, rtol=1e-4)

    def step(module, run):
        inputs = (x, *module.parameters())
        return lambda: torch.autograd.grad(run(), inputs, grad_out)

    return {"ours": step(ours, run_ours), "nn.MultiheadAttention": step(theirs, run_theirs)}


def attention_flops(B: int, T: int, D: int, H: int, causal: bool) -> float:
    """Matmul FLOPs of attention forward + backward: forward 4 B H T S Dh (Q K^T and P V), backward 2x.

    Causal counts only the unmasked half (T S / 2 score entries): the work that is needed.
    """
    forward = 4 * B * H * T * T * (D // H)
    return 3 * forward / (2 if causal else 1)


def measure_core_memory(config: tuple[int, int, int, int], causal: bool, name: str) -> int:
    """Extra peak bytes of one forward + backward of ``name``; meant to run in a fresh process."""
    torch.manual_seed(0)
    core_steps(1, 64, 64, 1, causal)[name]()  # load kernels and thread pools on a tiny input first
    return peak_memory_bytes(core_steps(*config, causal)[name])


def bench_speed(configs: list, warmup: int, repeats: int) -> None:
    for B, T, D, H in configs:
        for causal in (False, True):
            for kind, make, baseline in (("core", core_steps, "naive"),
                                         ("layer", layer_steps, "nn.MultiheadAttention")):
                steps = make(B, T, D, H, causal)
                ours_s, baseline_s = time_fns(steps["ours"], steps[baseline], warmup=warmup, repeats=repeats)
                extra = {"baseline_call": NN_MHA_CALL} if kind == "layer" else {}
                emit("attention_fwd_bwd", ours_s, baseline, baseline_s, kind=kind, B=B, T=T, D=D, H=H, causal=causal,
                     **extra)


def bench_memory(config: tuple[int, int, int, int], causals: tuple[bool, ...]) -> None:
    B, T, D, H = config
    for causal in causals:
        ours_b = run_isolated(measure_core_memory, config, causal, "ours")
        naive_b = run_isolated(measure_core_memory, config, causal, "naive")
        emit_info("attention_peak_memory", ours_mb=round(ours_b / 2**20, 1), baseline="naive",
                  baseline_mb=round(naive_b / 2**20, 1), ratio=round(naive_b / ours_b, 2), kind="core", B=B, T=T, D=D,
                  H=H, causal=causal, scores_mb=round(B * H * T * T * 4 / 2**20, 1),
                  measures="peak RSS growth during one fwd+bwd, fresh process (scores_mb: one fp32 (B,H,T,T))")


def bench_fraction_of_peak(config: tuple[int, int, int, int], causals: tuple[bool, ...], repeats: int) -> None:
    B, T, D, H = config
    for causal in causals:
        step = core_steps(*config, causal)["ours"]
        measured = fraction_of_peak(step, attention_flops(*config, causal), repeats=repeats)
        emit_info("attention_fraction_of_peak", **measured, kind="core", B=B, T=T, D=D, H=H, causal=causal,
                  flops_counted="fwd 4*B*H*T*S*Dh + bwd 2x fwd" + (", halved for causal" if causal else ""),
                  peak="best square fp32 matmul (512..2048), timed in turns with the attention")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    warmup, repeats = (1, 3) if args.quick else (2, 7)
    torch.manual_seed(0)
    causals = (False,) if args.quick else (False, True)
    if args.quick:
        emit_info("attention_note", note=f"--quick: largest config shrunk to {configs[-1]} (B, T, D, H), "
                                         f"{repeats} repeats, memory and fraction of peak non-causal only")
    bench_speed(configs, warmup, repeats)
    bench_memory(configs[-1], causals)
    bench_fraction_of_peak(configs[-1], causals, repeats)


if __name__ == "__main__":
    main()
