#!/usr/bin/env python
"""Where a train step's time goes: torch.profiler's self time of one step, grouped by kind of work.

Runs one implementation of bench/train_throughput.py (same model, data and step) in this process: after
--warmup untimed steps, one profiled step. The table groups the self time of every profiled event into
weight products, attention (SDPA's fused kernels, or the CPU's lower-triangle kernel of model/attention.py: its
batched products, softmax and softmax gradient, forward and backward), the optimizer, and everything else
(elementwise, casts, copies, reductions, and with --compile the fused kernels Inductor generated); the
largest single events follow. Read it next to train_throughput's MFU:
what is not a matmul or attention is where fusion (--compile) or a better kernel can still win.

    python bench/profile_step.py --impl recipe             # the default recipe (bf16 autocast on this CPU)
    python bench/profile_step.py --impl compiled --record  # the same with --compile
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from common import HelpFormatter, CONFIGS, machine_line, model_config, report, save_weights
from train_throughput import IMPLS, LABELS, make_step

GROUPS = {  # kind of work -> substrings of aten operator names (the model's only batched products are attention's)
    "attention (SDPA, or the lower-triangle kernel)": ("scaled_dot_product", "aten::bmm", "aten::_softmax",
                                                       "TiledCausalAttention"),
    "weight products": ("aten::mm", "aten::addmm", "aten::_grouped_mm"),
    "optimizer (fused AdamW)": ("aten::_fused_adamw",),
}


def group_of(name: str) -> str:
    return next((group for group, keys in GROUPS.items() if any(k in name for k in keys)),
                "other (elementwise, casts, copies, reductions, --compile's fused kernels)")


def label(name: str) -> str:
    """Inductor names each compiled graph by a hash; say what it is instead."""
    return "Inductor-compiled graph (fused elementwise)" if name.startswith("## Call CompiledFxGraph") else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--impl", default="recipe", choices=IMPLS, help="which step (bench/train_throughput.py)")
    p.add_argument("--config", default="S", choices=CONFIGS, help="model dimensions (bench/common.py CONFIGS)")
    p.add_argument("--batch_size", type=int, default=8, help="rows of max_seq_len tokens per step")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the hf, hf_fused, ours and ours_compiled steps (the others use the default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the profiled one")
    p.add_argument("--top", type=int, default=8, help="how many of the largest operators to list")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()
    args.run_dtype = "auto" if args.impl in ("recipe", "compiled", "hf_recipe") else args.dtype

    with tempfile.TemporaryDirectory() as folder:
        save_weights(model_config(args.config), Path(folder))
        args.weights = folder
        step, device, dtype = make_step(args)
        for _ in range(args.warmup):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
    ops = list(prof.key_averages())  # every event's self time: kernels, compiled graphs, autograd overhead
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in ops)
    groups: dict[str, float] = {}
    for e in ops:
        group = group_of(e.key)
        groups[group] = groups.get(group, 0.0) + getattr(e, attr)
    lines = [f"where the step's time goes: {LABELS[args.impl]}, {str(dtype)[6:]}, config {args.config}, batch "
             f"{args.batch_size}, one profiled step after {args.warmup} — {machine_line(device)}", "",
             "| kind of work | ms | share |", "|---|---|---|"]
    lines += [f"| {g} | {t / 1e3:,.0f} | {t / total:.0%} |" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["", "| largest events | calls | ms | share |", "|---|---|---|---|"]
    for e in sorted(ops, key=lambda e: -getattr(e, attr))[:args.top]:
        lines.append(f"| {label(e.key)} | {e.count} | {getattr(e, attr) / 1e3:,.0f} | {getattr(e, attr) / total:.0%} |")
    report(lines, args.record)


if __name__ == "__main__":
    main()
