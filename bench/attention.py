#!/usr/bin/env python
"""Attention alone: what one layer's attention of config S costs, forward + backward, per kind of kernel.

On CPU the fused attention kernels bound the train step's MFU (bench/RESULTS.md, bench/profile_step.py).
This script shows why, in two tables per dtype:

1. The whole attention layer (model/model.py Attention: q/k/v/o projections, RoPE and the attention core),
   with SDPA's fused kernel (flash_attn, the default) against the same computation written out with the
   T x T scores materialised (flash_attn=False), each eager and compiled. "vs SDPA" is the ratio of times
   measured in the same round (median over rounds; > 1 = faster than the default).
2. The SDPA call alone (causal with grouped KV heads, as the model calls it, then without the causal mask),
   as GFLOP/s next to the measured matmul peak. FLOPs: 4 x B x heads x T^2 x head_dim forward (Q K^T and
   P V) and twice that backward, the full square with no discount for the mask, as in the MFU formula
   (trainer/flops.py). When causal and non-causal cost the same, the kernel does not skip masked blocks.
   On CPU a third row is the causal attention computed over the lower triangle only: SDPA's forward, and a
   backward written in torch ops over tiles of --tile query positions that touches only the keys each tile
   may see (TriangleAttention below); then the profile of that backward, by op.

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
from model.model import Attention, RotaryEmbedding
from trainer.distributed import resolve_device
from trainer.flops import peak_flops

Inputs = tuple[torch.Tensor, ...]


def triangle_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, scale: float, tile: int) -> tuple[torch.Tensor, ...]:
    """The flash-attention backward over the lower triangle: for each tile of query positions, only the keys up
    to its last position (about half of the T x T square at small tiles). Rows are ordered (position, query head
    of the KV group), so a tile is one contiguous block and dK/dV sum over the group inside the matmul.
    Scores and their gradient are kept in fp32, the matmuls run in the input dtype."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    rep, dt = H // KV, q.dtype

    def grouped(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, ...] -> [B, KV, T, rep, ...]
        return x.view(B, KV, rep, T, *x.shape[3:]).transpose(2, 3).contiguous()

    qg, dog, lse_g = grouped(q * scale), grouped(dout), grouped(lse)
    delta_g = grouped((dout.float() * out.float()).sum(-1))  # rowsum(dO * O), the softmax backward's correction
    dq = torch.empty(B, KV, T, rep, D, dtype=dt, device=q.device)
    dk, dv = (torch.zeros(B, KV, T, D, device=q.device) for _ in range(2))
    for start in range(0, T, tile):
        end = min(start + tile, T)
        n = end - start
        qi, doi = qg[:, :, start:end].reshape(B, KV, n * rep, D), dog[:, :, start:end].reshape(B, KV, n * rep, D)
        p = (qi @ k[:, :, :end].transpose(-1, -2)).float()
        p.sub_(lse_g[:, :, start:end].reshape(B, KV, n * rep, 1)).exp_()  # the forward's probabilities
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        p[..., start:end].masked_fill_(causal[:, None].expand(n, rep, n).reshape(n * rep, n), 0.0)
        dv[:, :, :end] += p.to(dt).transpose(-1, -2) @ doi
        ds = (doi @ v[:, :, :end].transpose(-1, -2)).float()
        ds = ds.sub_(delta_g[:, :, start:end].reshape(B, KV, n * rep, 1)).mul_(p).to(dt)
        dq[:, :, start:end] = (ds @ k[:, :, :end]).view(B, KV, n, rep, D)
        dk[:, :, :end] += ds.transpose(-1, -2) @ qi
    return (dq * scale).transpose(2, 3).reshape(B, H, T, D), dk.to(dt), dv.to(dt)


class TriangleAttention(torch.autograd.Function):
    """Causal grouped-query attention: SDPA's fused CPU forward (which returns the logsumexp the backward
    needs), and triangle_backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int) -> torch.Tensor:
        ctx.scale, ctx.tile = q.shape[-1] ** -0.5, tile
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=ctx.scale)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        return *triangle_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale, ctx.tile), None


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
    fns: dict[str, Callable[..., torch.Tensor]] = {}
    for flash, label in ((True, "SDPA fused kernel (flash_attn, default)"), (False, "written out (flash_attn=False)")):
        layer = Attention(model_config("S", flash_attn=flash), layer_idx=0).to(device, dtype)
        eager = lambda x, layer=layer: layer(x, cos, sin, None, True, None)  # noqa: E731
        fns[label] = eager
        fns[f"{label}, compiled"] = torch.compile(eager)
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
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, KV, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    fns = {f"SDPA, {'causal' if causal else 'no mask'}, {H} query / {KV} KV heads":
           lambda q, k, v, causal=causal: sdpa(q, k, v, causal) for causal in (True, False)}
    triangle = f"causal, lower triangle only (SDPA forward, backward in torch ops over tiles of {args.tile})"
    if device.type == "cpu":
        fns[triangle] = lambda q, k, v: TriangleAttention.apply(q, k, v, args.tile)
        reference = torch.autograd.grad(sdpa(q, k, v).float().square().sum(), (q, k, v))
        mine = torch.autograd.grad(fns[triangle](q, k, v).float().square().sum(), (q, k, v))
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(mine, reference))
    results = measure(fns, (q, k, v), args, device)
    flops = 4 * B * H * T * T * D  # forward; the backward does twice as much
    peak = peak_flops(device, dtype)
    lines = ["", f"the SDPA call alone, batch {B} x {T}, head_dim {D}, {str(dtype)[6:]}; "
             f"matmul peak measured: {peak / 1e9:,.0f} GFLOP/s", "",
             "| call | forward (ms) | backward (ms) | forward GFLOP/s | backward GFLOP/s | vs causal |",
             "|---|---|---|---|---|---|"]
    for name, (f, b, ratio) in results.items():
        lines.append(f"| {name} | {f * 1e3:.1f} | {b * 1e3:.1f} | {flops / f / 1e9:,.0f} | "
                     f"{2 * flops / b / 1e9:,.0f} | {ratio:.2f}x |")
    if device.type == "cpu":
        lines += ["", f"the lower-triangle backward's gradients vs SDPA's: largest difference {error:.1e} of the "
                  f"largest gradient; its backward by op (torch.profiler, one pass):", "",
                  "| op | calls | ms | share |", "|---|---|---|---|"]
        out = fns[triangle](q, k, v)
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
    p.add_argument("--tile", type=int, default=32, help="query positions per tile of the lower-triangle backward")
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
