#!/usr/bin/env python
"""bf16 autocast vs fp32: does the default recipe's loss curve stay within run-to-run noise?

Three runs of `python train.py --mode pretrain` (the default recipe) for --steps steps: fp32 (seed 1337),
bf16 autocast (seed 1337: same init, same data order), and fp32 with another seed, whose distance from the
first fp32 run is the noise a different initialisation and data order alone produce. Per window of
--window steps: the mean training loss of each run, bf16 - fp32, and seed - fp32; then the final validation
loss of each. bf16 is "within noise" when |bf16 - fp32|, averaged over the windows, is not larger than
|seed - fp32| (one window's seed difference can be near zero by chance, so windows are not compared alone).

    python bench/bf16_loss.py                    # 300 steps, windows of 50
    python bench/bf16_loss.py --record
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
from pathlib import Path

import torch

from common import HelpFormatter, load_after, machine_line, report, train_py


def run(out_dir: Path, dtype: str, seed: int, steps: int, *extra: str) -> tuple[dict[int, float], float]:
    """(step -> training loss, final validation loss) of one default-recipe run."""
    _, logs = train_py(out_dir, "--mode", "pretrain", "--dtype", dtype, "--seed", str(seed), "--max_steps", str(steps),
                       "--log_interval", "1", "--eval_interval", "0", "--save_interval_steps", "0", "--no-save_last",
                       *extra)
    return {r["step"]: r["loss"] for r in logs if "loss" in r}, [r["val_loss"] for r in logs if "val_loss" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--window", type=int, default=50, help="steps per averaged window")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. \"--compile\"")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    machine = machine_line(torch.device("cpu"))
    extra = shlex.split(args.train_args)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp32_val = run(Path(tmp) / "fp32", "float32", 1337, args.steps, *extra)
        bf16, bf16_val = run(Path(tmp) / "bf16", "bfloat16", 1337, args.steps, *extra)
        seed, seed_val = run(Path(tmp) / "seed", "float32", 1338, args.steps, *extra)
    flags = f" {args.train_args}" if args.train_args else ""
    lines = [f"bf16 autocast vs fp32, default pretrain recipe{flags} (small preset, batch 16 x 256), {args.steps} "
             f"steps, mean training loss per window of {args.window} steps — {machine} ({load_after()})", "",
             "| steps | fp32 | bf16 | bf16 - fp32 | fp32, seed 1338 | seed - fp32 (noise) |",
             "|---|---|---|---|---|---|"]
    deltas, noise = [], []
    for start in range(1, args.steps + 1, args.window):
        window = range(start, min(start + args.window, args.steps + 1))
        a, b, c = (statistics.mean(run_[s] for s in window) for run_ in (fp32, bf16, seed))
        deltas.append(abs(b - a))
        noise.append(abs(c - a))
        lines.append(f"| {window[0]}-{window[-1]} | {a:.4f} | {b:.4f} | {b - a:+.4f} | {c:.4f} | {c - a:+.4f} |")
    lines.append(f"| final validation loss | {fp32_val:.4f} | {bf16_val:.4f} | {bf16_val - fp32_val:+.4f} "
                 f"| {seed_val:.4f} | {seed_val - fp32_val:+.4f} |")
    lines += ["", f"Mean over the windows of |bf16 - fp32|: {statistics.mean(deltas):.4f}; of |seed - fp32|, the noise: "
                  f"{statistics.mean(noise):.4f} (bf16 is within noise when the first is not larger)."]
    report(lines, args.record)


if __name__ == "__main__":
    main()
