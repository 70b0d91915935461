#!/usr/bin/env python
"""MoE step time: the moe preset against the dense model with the same ACTIVE parameters, same run.

The dense model is the moe preset with one SwiGLU of width top_k x expert width per layer (bench/common.py
"moe_dense"): a token passes through the same matmul FLOPs in both (Transformer.estimate_flops_per_token
agrees to 0.1%). Both run the trainer's step (CausalLMObjective, fused AdamW) in the trainer's default dtype,
each in its own subprocess, alternating round after round; "vs dense" is the ratio of step times measured in
the same round (median over rounds). The MoE also pays for what its extra experts weigh (the optimizer and
the weight casts touch all 118M parameters, the dense model's 65M). The warm-up is longer than the other
benches': each new padded expert-slice size makes oneDNN build its matmul kernels once (model/model.py
CPU_EXPERT_ROWS), so the first steps of an MoE are slower than the steady state that training runs in.
A second table times the feed-forward layer alone (MoE vs the dense SwiGLU, forward + backward, in this
process): the cost of routing and dispatch without the per-parameter costs of the whole step.

    python bench/moe_step.py                  # CPU: experts one after the other on padded token slices
    python bench/moe_step.py --record
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from common import HelpFormatter, load_after, machine_line, model_config, ratio_rounds, report, save_weights, timed
from model import Transformer
from model.model import MLP, MoE
from train_throughput import measure
from trainer.distributed import resolve_device, resolve_dtype


def layer_table(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Forward + backward of one MoE feed-forward layer vs the dense SwiGLU with its active width."""
    config = model_config("moe")
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    layers = {"moe_dense": MLP(config.dim, config.num_experts_per_tok * config.moe_hidden_dim).to(device),
              "moe": MoE(config).to(device)}
    x = torch.randn(args.batch_size, config.max_seq_len, config.dim, device=device, requires_grad=True)

    def run(layer: torch.nn.Module) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x)
            out = out[0] + out[1] if isinstance(out, tuple) else out  # the MoE adds its balance loss
        out.float().sum().backward()

    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            for _ in range(args.warmup):
                run(layer)
            times[name].append(statistics.median(timed(lambda: run(layer), device) for _ in range(args.steps * 3)))
    ratios = ratio_rounds(times, "moe_dense")
    lines = ["", f"the feed-forward layer alone, forward + backward, {args.batch_size} x {config.max_seq_len} tokens, "
             f"{str(dtype)[6:]}", "", "| layer | ms | time vs dense |", "|---|---|---|"]
    for name in layers:
        label = "MoE (4 experts, top-2)" if name == "moe" else "dense SwiGLU"
        lines.append(f"| {label} | {statistics.median(times[name]) * 1e3:.0f} | {1 / ratios[name]:.2f}x |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", type=int, default=8, help="rows of 512 tokens per step (config S's batch)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="trainer dtype of both")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (see above)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs both models once")
    p.add_argument("--compile", action="store_true", help="both models with the trainer's --compile")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    device = resolve_device(args.device)
    machine = machine_line(device)
    names = ("moe_dense", "moe")
    configs = {name: model_config(name) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    peak_mb: dict[str, float] = {}
    dtype = ""
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            save_weights(configs[name], Path(folder) / name)
        for _ in range(args.rounds):
            for name in names:
                out = measure("compiled" if args.compile else "ours", str(Path(folder) / name), args.dtype, args)
                times[name].append(out["step_s"])
                peak_mb[name], dtype = max(out["peak_mb"], peak_mb.get(name, 0)), out["dtype"]
    ratios = ratio_rounds(times, "moe_dense")
    tokens = args.batch_size * configs["moe"].max_seq_len
    lines = [f"MoE step vs dense with equal active parameters, batch {args.batch_size} x "
             f"{configs['moe'].max_seq_len}, {dtype}{', --compile' if args.compile else ''}, {device.type}, "
             f"{args.rounds} rounds x {args.steps} steps — {machine} ({load_after()})",
             "", "| model | parameters | MFLOP/token | step (s) | tokens/s | step time vs dense | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        model = Transformer(configs[name])
        step = statistics.median(times[name])
        label = ("moe preset (4 experts, top-2)" if name == "moe"
                 else f"dense, SwiGLU {configs[name].hidden_dim} (= 2 x {configs['moe'].moe_hidden_dim})")
        lines.append(f"| {label} | {model.num_params() / 1e6:.1f}M | {model.estimate_flops_per_token() / 1e6:.0f} "
                     f"| {step:.2f} | {tokens / step:,.0f} | {1 / ratios[name]:.2f}x | {peak_mb[name]:,.0f} |")
    report(lines + layer_table(args, device), args.record)


if __name__ == "__main__":
    main()
