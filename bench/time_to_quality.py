#!/usr/bin/env python
"""Time to quality: validation bits per byte of the default pretrain recipe after 5 and 10 minutes of wall time.

For each budget and dtype, the default recipe (`python train.py --mode pretrain`: small preset, batch 16,
shipped corpus, cosine schedule) runs for as many steps as fit in the budget, so its schedule ends when the
budget does: a short calibration run measures the loop's steps/s, then the budgeted run uses
--max_steps = budget x steps/s, minus the startup time. The final model is then scored on the held-out
dataset/pretrain_val.jsonl: bits per byte = summed next-token cross-entropy (nats) / ln 2 / UTF-8 bytes of
the text, over the whole held-out token stream (documents joined by <|endoftext|>, as in training), so
tokenizers of any vocabulary compare. --dtype auto (the default: bf16 on CPUs with native bf16) is compared
with float32 at equal wall time. Run it on a quiet machine: it is wall-time bound.

    python bench/time_to_quality.py                      # 5 and 10 minutes, auto and float32: ~35 minutes
    python bench/time_to_quality.py --budgets 5 --dtypes auto --record
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import HelpFormatter, ROOT, load_after, machine_line, report, train_py
from model import Transformer
from trainer.objectives import token_cross_entropy

VAL = ROOT / "dataset" / "pretrain_val.jsonl"


def train(out_dir: Path, dtype: str, steps: int, *extra: str) -> float:
    """One default-recipe run of `steps` steps with only a final export; returns its wall seconds."""
    return train_py(out_dir, "--mode", "pretrain", "--dtype", dtype, "--max_steps", str(steps), "--eval_interval",
                    "0", "--save_interval_steps", "0", "--log_interval", "5", *extra)[0]


def steps_per_second(out_dir: Path) -> float:
    """The loop's step rate over the logged windows after the first (from tokens/s and tokens per step)."""
    logs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "tokens_per_sec" in r]
    tokens_per_step = logs[0]["tokens_seen"] / logs[0]["step"]
    rates = sorted(r["tokens_per_sec"] for r in logs[1:])
    return rates[len(rates) // 2] / tokens_per_step


@torch.no_grad()
def bits_per_byte(model_dir: Path, seq_len: int = 256) -> float:
    """Bits per UTF-8 byte of the held-out text under the model (fp32, CPU)."""
    from data import iter_jsonl_texts, load_tokenizer, pretrain_bin, read_sidecar

    tok = load_tokenizer(model_dir)
    model = Transformer.from_pretrained(model_dir).eval()
    n_bytes = sum(len(text.encode("utf-8")) for _, text in iter_jsonl_texts(VAL))
    bin_path = pretrain_bin(VAL, tok)
    stream = torch.from_numpy(np.fromfile(bin_path, dtype=read_sidecar(bin_path)["dtype"]).astype(np.int64))
    nats = 0.0
    for start in range(0, len(stream) - 1, seq_len):  # every token after the first is predicted once
        chunk = stream[start:start + seq_len + 1][None]
        nats += float(token_cross_entropy(model(chunk[:, :-1]).logits, chunk[:, 1:]).sum())
    return nats / math.log(2) / n_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--budgets", default="5,10", help="comma-separated wall-time budgets in minutes")
    p.add_argument("--dtypes", default="auto,float32", help="comma-separated --dtype values to compare")
    p.add_argument("--calibration_steps", type=int, default=30, help="steps of the run that measures steps/s")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. \"--compile\"")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    from trainer.distributed import resolve_dtype

    budgets = [float(b) for b in args.budgets.split(",")]
    dtypes = args.dtypes.split(",")
    machine = machine_line(torch.device("cpu"))
    extra = shlex.split(args.train_args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dtype in dtypes:
            calib = tmp / f"calibrate-{dtype}"
            startup = train(calib, dtype, args.calibration_steps, *extra)
            rate = steps_per_second(calib)
            startup -= args.calibration_steps / rate  # what a run costs besides its steps (imports, data, export)
            for budget in budgets:
                steps = max(1, int((budget * 60 - startup) * rate))
                out = tmp / f"{dtype}-{budget:g}"
                wall = train(out, dtype, steps, *extra)
                name = f"auto ({str(resolve_dtype('auto', torch.device('cpu'))).removeprefix('torch.')})" \
                    if dtype == "auto" else dtype
                rows.append((budget, name, steps, wall, bits_per_byte(out / "final")))
    flags = f" {args.train_args}" if args.train_args else ""
    lines = [f"time to quality, default pretrain recipe{flags} (small preset, batch 16 x 256), held-out "
             f"{VAL.relative_to(ROOT)} — {machine} ({load_after()})",
             "", "| budget (min) | --dtype | steps | wall (min) | val bits/byte |", "|---|---|---|---|---|"]
    for budget, name, steps, wall, bpb in sorted(rows):
        lines.append(f"| {budget:g} | {name} | {steps:,} | {wall / 60:.1f} | {bpb:.3f} |")
    report(lines, args.record)


if __name__ == "__main__":
    main()
