#!/usr/bin/env python
"""Whole-pipeline training throughput on the shipped data: real (non-padding) tokens/s of train.py itself.

Runs `python train.py --mode pretrain` (the default recipe: small preset, shipped corpus, batch 16) and then
`--mode sft` from that run's final model, each for --steps optimizer steps, with --dtype auto (the default)
and --dtype float32, alternating round after round. Tokens/s is what the loop logs (real tokens: padding of
SFT batches is not counted; data loading included, evaluation and checkpointing excluded), as the median of
the logged windows after the first; "vs float32" is the ratio measured in the same round (median over
rounds). MFU is the loop's own (trainer/flops.py).

    python bench/pipeline.py
    python bench/pipeline.py --record
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
from pathlib import Path

import torch

from common import HelpFormatter, load_after, machine_line, report, train_py


def train(mode: str, dtype: str, out_dir: Path, steps: int, *extra: str) -> dict:
    """One train.py run; its logged tokens/s and MFU (median over windows after the first) and wall time."""
    wall, logs = train_py(out_dir, "--mode", mode, "--dtype", dtype, "--max_steps", str(steps), "--log_interval",
                          "5", "--eval_interval", "0", "--save_interval_steps", "0", *extra)
    logs = [r for r in logs if "tokens_per_sec" in r][1:]
    return {"tokens_per_s": statistics.median(r["tokens_per_sec"] for r in logs),
            "mfu": statistics.median(r["mfu"] for r in logs), "tokens": logs[-1]["tokens_seen"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every (mode, dtype) once")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. \"--compile\"")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    machine = machine_line(torch.device("cpu"))
    runs = [(mode, dtype) for mode in ("pretrain", "sft") for dtype in ("float32", "auto")]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            for mode, dtype in runs:
                out = tmp / f"{mode}-{dtype}-{r}"
                # SFT fine-tunes the first round's pretrained model (its final/ folder is only written for that).
                extra = (["--init_from", str(tmp / "pretrain-auto-0" / "final")] if mode == "sft"
                         else [] if (dtype, r) == ("auto", 0) else ["--no-save_last"])
                extra += shlex.split(args.train_args)
                results[(mode, dtype)].append(train(mode, dtype, out, args.steps, *extra))
    from trainer.distributed import resolve_dtype

    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    lines = [f"whole pipeline, train.py defaults (small preset, batch 16, shipped data), {args.steps} steps per run, "
             f"{args.rounds} rounds{', ' + args.train_args if args.train_args else ''}, cpu — {machine} "
             f"({load_after()})",
             "", "| mode | --dtype | real tokens/s | vs float32 | MFU | wall s per run (incl. startup) |",
             "|---|---|---|---|---|---|"]
    for mode, dtype in runs:
        rs, base = results[(mode, dtype)], results[(mode, "float32")]
        ratio = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rs, base))
        name = f"auto ({auto})" if dtype == "auto" else dtype
        tokens_s, mfu, wall = (statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "mfu", "wall_s"))
        lines.append(f"| {mode} | {name} | {tokens_s:,.0f} | {ratio:.2f}x | {mfu:.1%} | {wall:.0f} |")
    report(lines, args.record)


if __name__ == "__main__":
    main()
