#!/usr/bin/env python
"""When does --compile pay? Its one-off cost against what it saves per step, for training and for decoding.

Training: `train.py --mode pretrain` (default recipe, or --train_args) for --steps steps, three times: eager
(--compile off), then --compile on with an empty Inductor cache (a first run on a machine), then again with that cache
(every later run of the same shapes). Step time is the loop's own (median logged window after the first); the
one-off cost is what the compiled run spent beyond its steps, less what the eager run spent beyond its steps
(imports, data, export), and break-even is the number of steps whose saving repays it.

Decoding: eval_model's generation (model/generate.py) of --new_tokens tokens at batch 1, greedy, on a random
config-S model in the default dtype, in a fresh process each: eager, compiled with an empty cache, compiled
with that cache. The one-off cost is the compiled call's time beyond its tokens at their steady rate.

    python bench/compile_cost.py
    python bench/compile_cost.py --train_args "--preset 26m --batch_size 8 --max_seq_len 512" --record
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (HelpFormatter, load_after, machine_line, model_config, report, save_weights,
                    seconds_per_step, train_py)


def train_run(out_dir: Path, steps: int, flags: list[str]) -> tuple[float, float]:
    """(wall seconds, steady seconds per step) of one train.py run."""
    wall, logs = train_py(out_dir, "--mode", "pretrain", "--max_steps", str(steps), "--eval_interval", "0",
                          "--save_interval_steps", "0", "--log_interval", "5", "--no-save_last", *flags)
    return wall, seconds_per_step(logs)


def decode_child(folder: str, new_tokens: int, compile_: bool) -> None:
    """In a fresh process: time each generated token; print the per-token times as JSON."""
    from model import Transformer, generate
    from trainer.distributed import resolve_dtype

    dtype = resolve_dtype("auto", torch.device("cpu"))
    model = Transformer.from_pretrained(folder, dtype=dtype).eval().requires_grad_(False)  # as eval_model loads it
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    times, start = [], time.perf_counter()
    for _ in generate(model, prompt, new_tokens, temperature=0, compile=compile_):
        times.append(time.perf_counter() - start)
    print(json.dumps(times))


def decode_run(folder: Path, new_tokens: int, compile_: bool, cache: Path) -> tuple[float, float]:
    """(seconds for all tokens, steady seconds per token over the second half) in a fresh process."""
    cmd = [sys.executable, __file__, "--_decode_child", str(folder), "--new_tokens", str(new_tokens)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    proc = subprocess.run(cmd + (["--compile"] if compile_ else []), capture_output=True, text=True, env=env,
                          check=True)
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    half = len(times) // 2
    return times[-1], (times[-1] - times[half]) / (len(times) - 1 - half)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--train_args", default="", help="train.py flags of the recipe (default: the default recipe)")
    p.add_argument("--new_tokens", type=int, default=256, help="decoded tokens per run")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_decode_child", default="", help=argparse.SUPPRESS)
    p.add_argument("--record", action="store_true", help="append the result tables to bench/RESULTS.md")
    args = p.parse_args()
    if args._decode_child:
        return decode_child(args._decode_child, args.new_tokens, args.compile)

    machine = machine_line(torch.device("cpu"))
    flags = shlex.split(args.train_args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-train")  # train.py's children inherit it
        train = {name: train_run(tmp / name, args.steps, flags + extra) for name, extra in
                 (("eager", ["--compile", "off"]), ("compiled, empty cache", ["--compile", "on"]),
                                      ("compiled, warm cache", ["--compile", "on"]))}
        folder = tmp / "model"
        save_weights(model_config("S"), folder)
        decode = {name: decode_run(folder, args.new_tokens, compile_, tmp / "inductor-decode") for name, compile_ in
                  (("eager", False), ("compiled, empty cache", True), ("compiled, warm cache", True))}

    recipe = f"`{args.train_args}`" if args.train_args else "the default recipe (small preset, batch 16 x 256)"
    lines = [f"--compile's one-off cost against its gain, {args.steps} steps of train.py --mode pretrain, {recipe}, "
             f"default dtype — {machine} ({load_after()})", "",
             "| run | wall (s) | s/step | one-off cost (s) | break-even |", "|---|---|---|---|---|"]
    wall_e, step_e = train["eager"]
    for name, (wall, step) in train.items():
        cost = (wall - args.steps * step) - (wall_e - args.steps * step_e)
        even = "" if name == "eager" else (f"{cost / (step_e - step):,.0f} steps = {cost / (step_e - step) * step_e / 60:.1f} "
                                           f"min of eager training" if step < step_e else "never: no faster per step")
        lines.append(f"| {name} | {wall:.1f} | {step:.3f} | {'' if name == 'eager' else f'{cost:.1f}'} | {even} |")
    lines += ["", f"decode, config S, batch 1, greedy, {args.new_tokens} new tokens, default dtype, a fresh process each",
              "", "| run | all tokens (s) | ms/token, steady | one-off cost (s) | break-even |", "|---|---|---|---|---|"]
    total_e, tok_e = decode["eager"]
    for name, (total, tok) in decode.items():
        cost = (total - args.new_tokens * tok) - (total_e - args.new_tokens * tok_e)
        even = "" if name == "eager" else (f"{cost / (tok_e - tok):,.0f} tokens" if tok < tok_e
                                           else "never: no faster per token")
        lines.append(f"| {name} | {total:.2f} | {tok * 1e3:.2f} | {'' if name == 'eager' else f'{cost:.1f}'} | {even} |")
    report(lines, args.record)


if __name__ == "__main__":
    main()
