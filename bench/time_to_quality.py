#!/usr/bin/env python
"""Time to quality: validation bits per byte of pretraining recipes after the same minutes of wall time.

The default recipe (`python train.py --mode pretrain`: small preset, batch 16, shipped corpus, cosine schedule;
--default_args adds flags to it, to compare against another baseline) runs for as many steps as fit in each
budget, so its schedule ends when the budget does: a short calibration run measures the loop's steps/s, then the
budgeted run uses --max_steps = budget x steps/s, minus the startup time. Other recipes (--recipes) are train.py flags run as they are, normally with `--time_budget {budget}m`,
which ends the run on time with its warmup-stable-decay schedule complete. Every final model is then scored on
the held-out dataset/pretrain_val.jsonl: bits per byte = summed next-token cross-entropy (nats) / ln 2 / UTF-8
bytes of the text, over the whole held-out token stream (documents joined by <|endoftext|>, as in training),
so tokenizers of any vocabulary compare. Each recipe is compared with the default at the same budget and
dtype ("vs default": the difference in bits per byte; negative is better). Run it on a quiet machine: it is
wall-time bound.

    python bench/time_to_quality.py                      # 5 and 10 minutes, auto and float32: ~35 minutes
    python bench/time_to_quality.py --budgets 10 --dtypes auto --recipes "default;budget=--time_budget {budget}m" \
        --default_args "--optimizer adamw --learning_rate 1e-3" --record     # Muon on time vs AdamW (the old default)
"""
from __future__ import annotations

import argparse
import math
import shlex
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import HelpFormatter, ROOT, load_after, machine_line, report, seconds_per_step, train_py
from model import Transformer
from trainer.objectives import token_cross_entropy

VAL = ROOT / "dataset" / "pretrain_val.jsonl"


def train(out_dir: Path, dtype: str, *flags: str) -> tuple[float, list[dict]]:
    """One pretraining run with only a final export: (wall seconds, its metrics.jsonl records)."""
    return train_py(out_dir, "--mode", "pretrain", "--dtype", dtype, "--eval_interval", "0", "--save_interval_steps",
                    "0", "--log_interval", "5", *flags)


@torch.no_grad()
def bits_per_byte(model_dir: Path, seq_len: int = 256) -> float:
    """Bits per UTF-8 byte of the held-out text under the model (fp32, CPU)."""
    from data import iter_record_texts, load_tokenizer, pretrain_bin, read_sidecar

    tok = load_tokenizer(model_dir)
    model = Transformer.from_pretrained(model_dir).eval()
    n_bytes = sum(len(text.encode("utf-8")) for _, text in iter_record_texts(VAL))
    bin_path = pretrain_bin(VAL, tok)
    stream = torch.from_numpy(np.fromfile(bin_path, dtype=read_sidecar(bin_path)["dtype"]).astype(np.int64))
    nats = 0.0
    for start in range(0, len(stream) - 1, seq_len):  # every token after the first is predicted once
        chunk = stream[start:start + seq_len + 1][None]
        nats += float(token_cross_entropy(model(chunk[:, :-1]).logits, chunk[:, 1:]).sum())
    return nats / math.log(2) / n_bytes


def parse_recipes(text: str) -> list[tuple[str, str]]:
    """'default;name=flags;...' -> [(name, flags)]; "default" (no flags) is the calibrated default recipe."""
    recipes = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, flags = entry.partition("=")
        if name != "default" and not flags:
            raise SystemExit(f"--recipes: {entry!r} needs its flags, as name=--time_budget {{budget}}m ...")
        recipes.append((name.strip(), flags.strip()))
    return recipes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--budgets", default="5,10", help="comma-separated wall-time budgets in minutes")
    p.add_argument("--dtypes", default="auto,float32", help="comma-separated --dtype values to compare")
    p.add_argument("--recipes", default="default", help="semicolon-separated recipes: `default` (the default recipe, "
                   "calibrated to the budget) and name=train.py flags, in which {budget} is the budget in minutes")
    p.add_argument("--default_args", default="", help="train.py flags of the `default` recipe (empty: train.py's "
                   "defaults), e.g. \"--optimizer adamw --learning_rate 1e-3\", the recipe before Muon was the default")
    p.add_argument("--calibration_steps", type=int, default=30, help="steps of the run that measures steps/s")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. \"--compile\"")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    from trainer.distributed import resolve_dtype

    budgets = [float(b) for b in args.budgets.split(",")]
    dtypes = args.dtypes.split(",")
    recipes = parse_recipes(args.recipes)
    machine = machine_line(torch.device("cpu"))
    extra = shlex.split(args.train_args)
    baseline = shlex.split(args.default_args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dtype in dtypes:
            name = f"auto ({str(resolve_dtype('auto', torch.device('cpu'))).removeprefix('torch.')})" \
                if dtype == "auto" else dtype
            if any(r == "default" for r, _ in recipes):
                calib = tmp / f"calibrate-{dtype}"
                startup, logs = train(calib, dtype, "--max_steps", str(args.calibration_steps), *baseline, *extra)
                rate = 1 / seconds_per_step(logs)
                startup -= args.calibration_steps / rate  # what a run costs besides its steps (imports, data, export)
            for budget in budgets:
                for recipe, flags in recipes:
                    out = tmp / f"{dtype}-{budget:g}-{len(rows)}"
                    if recipe == "default":
                        steps = max(1, int((budget * 60 - startup) * rate))
                        wall, logs = train(out, dtype, "--max_steps", str(steps), *baseline, *extra)
                    else:
                        wall, logs = train(out, dtype, *shlex.split(flags.replace("{budget}", f"{budget:g}")), *extra)
                    steps = max(r.get("step", 0) for r in logs)
                    rows.append((budget, name, recipe, steps, wall, bits_per_byte(out / "final")))
    flags = f" {args.train_args}" if args.train_args else ""
    described = f"the default recipe with `{args.default_args}`" if args.default_args else "the default recipe"
    lines = [f"time to quality, pretraining{flags} on the shipped corpus, held-out {VAL.relative_to(ROOT)}; default = "
             f"{described} (small preset, batch 16 x 256, cosine) for as many steps as fit — {machine} "
             f"({load_after()})", ""]
    lines += [f"- {recipe}: `{flags_}`" for recipe, flags_ in recipes if flags_]
    lines += ["", "| budget (min) | --dtype | recipe | steps | wall (min) | val bits/byte | vs default |",
              "|---|---|---|---|---|---|---|"]
    default = {(b, n): bpb for b, n, r, _, _, bpb in rows if r == "default"}
    for budget, name, recipe, steps, wall, bpb in rows:
        vs = f"{bpb - default[(budget, name)]:+.3f}" if (budget, name) in default else ""
        lines.append(f"| {budget:g} | {name} | {recipe} | {steps:,} | {wall / 60:.1f} | {bpb:.3f} | {vs} |")
    report(lines, args.record)


if __name__ == "__main__":
    main()
