#!/usr/bin/env python
"""Attention alone: what one layer's attention of config S costs, forward + backward, per kernel.

Attention bounds the CPU train step (bench/RESULTS.md, bench/profile_step.py). Two tables per dtype:

1. The whole attention layer (model/model.py Attention: q/k/v/o projections, RoPE and the attention core) with
   each core the model has: the lower-triangle kernel (model/attention.py, the default for causal training on
   CPUs without AMX), SDPA's fused kernel (the default elsewhere), and the same computation written out with the
   T x T scores materialised (flash_attn=False); each eager and compiled. "vs SDPA" is the ratio of times
   measured in the same round (median over rounds; > 1 = faster than SDPA).
2. The core call alone: SDPA causal, SDPA with no mask, and the lower-triangle kernel, as ms and as GFLOP/s
   next to the measured matmul peak. FLOPs are counted as the MFU formula counts them (causal attention needs
   half of the T x T square: 2 x B x heads x T^2 x head_dim forward, twice that backward; the full square for
   the no-mask row), so a kernel that computes the masked half anyway shows half the rate of one that skips
   it. Then the largest ops of the tiled kernel's backward (torch.profiler), and its gradients against SDPA's.

    python bench/attention.py                          # bf16 and fp32, config S (batch 8 x 512)
    python bench/attention.py --dtype bfloat16 --record
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common import HelpFormatter, load_after, machine_line, model_config, ratio_rounds, report, timed
from model.attention import TILE, tiled_causal_attention
from model.model import Attention, RotaryEmbedding
from trainer.distributed import resolve_device
from trainer.flops import peak_flops

Inputs = tuple[torch.Tensor, ...]


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Inputs, device: torch.device) -> tuple[float, float]:
    """Seconds of one forward and of its backward."""
    out: list[torch.Tensor] = []
    forward = timed(lambda: out.append(fn(*inputs)), device)
    backward = timed(lambda: out[0].backward(torch.ones_like(out[0])), device)
    return forward, backward


def measure(fns: dict[str, Callable[..., torch.Tensor]], inputs: Inputs, args: argparse.Namespace,
            device: torch.device) -> dict[str, tuple[float, float, float]]:
    """name -> (median forward s, median backward s, median ratio of the first fn's fwd+bwd time to this one's)."""
    fwd: dict[str, list[float]] = {name: [] for name in fns}
    bwd: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            for _ in range(args.warmup):
                fwd_bwd(fn, inputs, device)
            runs = [fwd_bwd(fn, inputs, device) for _ in range(args.steps)]
            fwd[name].append(statistics.median(f for f, _ in runs))
            bwd[name].append(statistics.median(b for _, b in runs))
    total = {name: [f + b for f, b in zip(fwd[name], bwd[name])] for name in fns}
    ratios = ratio_rounds(total, next(iter(fns)))
    return {name: (statistics.median(fwd[name]), statistics.median(bwd[name]), ratios[name]) for name in fns}


def layer_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    config = model_config("S")
    B, T = args.batch_size, config.max_seq_len
    torch.manual_seed(0)
    x = torch.randn(B, T, config.dim, device=device, dtype=dtype, requires_grad=True)
    cos, sin = RotaryEmbedding(config)(torch.arange(T, device=device).expand(B, T), dtype)
    cores = {"SDPA fused kernel": (True, False), "written out (flash_attn=False)": (False, False)}
    if device.type == "cpu":
        cores = {f"lower triangle in tiles of {TILE} (model/attention.py)": (True, True), **cores}
    fns: dict[str, Callable[..., torch.Tensor]] = {}
    for label, (flash, tiled) in cores.items():
        layer = Attention(model_config("S", flash_attn=flash), layer_idx=0).to(device, dtype)
        layer.tiled = tiled
        eager = lambda x, layer=layer: layer(x, cos, sin, None, True, None)  # noqa: E731
        fns[label] = eager
        fns[f"{label}, compiled"] = torch.compile(eager)
    fns = {name: fns[name] for name in sorted(fns, key=lambda n: not n.startswith("SDPA"))}  # SDPA first: the 1.00x
    results = measure(fns, (x,), args, device)
    lines = ["", f"one attention layer of config S (projections, RoPE, attention), forward + backward, "
             f"batch {B} x {T}, {str(dtype)[6:]}", "",
             "| attention | forward (ms) | backward (ms) | vs SDPA |", "|---|---|---|---|"]
    for name, (f, b, ratio) in results.items():
        lines.append(f"| {name} | {f * 1e3:.1f} | {b * 1e3:.1f} | {ratio:.2f}x |")
    return lines


def kernel_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    config = model_config("S")
    B, T, H, KV, D = args.batch_size, config.max_seq_len, config.n_heads, config.n_kv_heads, config.head_dim
    torch.manual_seed(0)
    # The model's layout: [B, heads, T, D] views of [B, T, heads, D] memory (what the projections produce).
    q = torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, T, KV, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    fns = {f"SDPA, {'causal' if causal else 'no mask'}, {H} query / {KV} KV heads":
           lambda q, k, v, causal=causal: sdpa(q, k, v, causal) for causal in (True, False)}
    tiled = f"causal, lower triangle in tiles of {TILE} (model/attention.py)"
    if device.type == "cpu":
        fns[tiled] = tiled_causal_attention
        reference = torch.autograd.grad(sdpa(q, k, v).float().square().sum(), (q, k, v))
        mine = torch.autograd.grad(tiled_causal_attention(q, k, v).float().square().sum(), (q, k, v))
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(mine, reference))
    results = measure(fns, (q, k, v), args, device)
    causal_flops = 2 * B * H * T * T * D  # forward (Q K^T and P V over half the square); the backward does twice as much
    peak = peak_flops(device, dtype)
    lines = ["", f"the attention call alone, batch {B} x {T}, head_dim {D}, {str(dtype)[6:]}; "
             f"matmul peak measured: {peak / 1e9:,.0f} GFLOP/s; GFLOP/s count causal attention's work (half the "
             f"square), the no-mask row the whole square", "",
             "| call | forward (ms) | backward (ms) | forward GFLOP/s | backward GFLOP/s | vs SDPA causal |",
             "|---|---|---|---|---|---|"]
    for name, (f, b, ratio) in results.items():
        flops = causal_flops * (2 if "no mask" in name else 1)
        lines.append(f"| {name} | {f * 1e3:.1f} | {b * 1e3:.1f} | {flops / f / 1e9:,.0f} | "
                     f"{2 * flops / b / 1e9:,.0f} | {ratio:.2f}x |")
    if device.type == "cpu":
        lines += ["", f"the tiled kernel's gradients vs SDPA's: largest difference {error:.1e} of the largest "
                  f"gradient; its backward by op (torch.profiler, one pass):", "",
                  "| op | calls | ms | share |", "|---|---|---|---|"]
        out = tiled_causal_attention(q, k, v)
        with torch.profiler.profile() as prof:
            out.backward(torch.ones_like(out))
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        lines += [f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | {e.self_cpu_time_total / total:.0%} |"
                  for e in ops[:6]]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", type=int, default=8, help="rows of 512 tokens (config S's batch)")
    p.add_argument("--dtype", default="both", choices=("both", "bfloat16", "float32"), help="which dtypes to time")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--steps", type=int, default=3, help="timed forward + backward passes per kernel and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each times every kernel once")
    p.add_argument("--record", action="store_true", help="append the result tables to bench/RESULTS.md")
    args = p.parse_args()

    device = resolve_device(args.device)
    machine = machine_line(device)
    dtypes = (torch.bfloat16, torch.float32) if args.dtype == "both" else (getattr(torch, args.dtype),)
    lines = [f"attention alone, config S — {machine}"]
    for dtype in dtypes:
        lines += layer_table(args, device, dtype) + kernel_table(args, device, dtype)
    lines[0] += f" ({load_after()})"
    report(lines, args.record)


if __name__ == "__main__":
    main()
