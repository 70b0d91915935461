#!/usr/bin/env python
"""MoE step time: the moe preset against the dense model with the same ACTIVE parameters, same run.

The dense model is the moe preset with one SwiGLU of width top_k x expert width per layer (bench/common.py
"moe_dense"): a token passes through the same matmul FLOPs in both (Transformer.estimate_flops_per_token
agrees to 0.1%). Both run the trainer's step (CausalLMObjective, fused AdamW) in the trainer's default dtype,
each in its own subprocess, alternating round after round; "vs dense" is the ratio of step times measured in
the same round (median over rounds). The MoE also pays for what its extra experts weigh (the optimizer and
the weight casts touch all 118M parameters, the dense model's 65M).

    python bench/moe_step.py                  # CPU: experts one after the other on padded token slices
    python bench/moe_step.py --record
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import load_after, machine_line, model_config, ratio_rounds, report, save_weights
from model import Transformer
from train_throughput import measure
from trainer.distributed import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=8, help="rows of 512 tokens per step (config S's batch)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="trainer dtype of both")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
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
    report(lines, args.record)


if __name__ == "__main__":
    main()
