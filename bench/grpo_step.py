#!/usr/bin/env python
"""Where a GRPO step's time goes: sampling the rollouts, scoring them, the reference's log-probs, and the
update (forward + backward + optimizer), timed around each phase over a short run of train.py --mode grpo.

    python bench/grpo_step.py                                    # the quick start's run (out/sft/final), 20 steps
    python bench/grpo_step.py --flags "--max_completion_length 32 --beta 0" --record

Every flag in --flags goes to train.py unchanged, so the run measured is the one those flags train; validation
and checkpoints are off (--eval_interval 0, --save_interval_steps 0) so that only steps are timed.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from collections import defaultdict

import torch

from common import HelpFormatter, load_after, machine_line, report

import train  # noqa: E402
from trainer import grpo, loop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--init_from", default="out/sft/final", help="the chat model GRPO starts from")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps timed")
    p.add_argument("--flags", default="", help="more train.py flags, as one string")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()

    spent: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    obj = grpo.GRPOObjective
    original_logps = grpo.token_logps

    def logps(model, batch, temperature=1.0):  # inside a rollout: the sampling policy's or the reference's
        return timed("old and reference log-probs", original_logps)(model, batch, temperature)

    obj.sample = timed("sampling (KV-cached decode)", obj.sample)
    obj.score = timed("scoring (reward functions)", obj.score)
    obj.rollout = timed("rollout", obj.rollout)
    obj.prepare = timed("prepare", obj.prepare)
    rollout = obj.rollout

    def rollout_with_logps(self, model, batch):
        grpo.token_logps = logps
        try:
            return rollout(self, model, batch)
        finally:
            grpo.token_logps = original_logps
    obj.rollout = rollout_with_logps
    loop.Trainer._train_step = timed("update (forward, backward, optimizer)", loop.Trainer._train_step)

    with tempfile.TemporaryDirectory() as out:
        argv = ["--mode", "grpo", "--init_from", args.init_from, "--out_dir", out, "--max_steps", str(args.steps),
                "--eval_interval", "0", "--save_interval_steps", "0", "--log_completions_interval", "0",
                *shlex.split(args.flags)]
        start = time.perf_counter()
        train.main(argv)
        total = time.perf_counter() - start
    update = spent.pop("update (forward, backward, optimizer)")
    inside = {k: v for k, v in spent.items() if k not in ("rollout", "prepare")}
    other_rollout = spent["prepare"] - sum(inside.values())  # advantages, padding, batch assembly
    rest = total - spent["prepare"] - update  # loading, tokenizing, logging, the export at the end
    rows = [*inside.items(), ("rest of prepare (advantages, batching)", other_rollout),
            ("update (forward, backward, optimizer)", update), ("start-up, logging and the final export", rest)]
    lines = [f"GRPO step time by phase: {args.steps} steps of train.py {' '.join(argv[:4])} {args.flags}".rstrip()
             + f" — {machine_line(torch.device('cpu'))}", "",
             "| phase | seconds | share |", "|---|---|---|",
             *(f"| {name} | {sec:.1f} | {sec / total:.0%} |" for name, sec in rows),
             f"| total | {total:.1f} | {total / args.steps:.2f} s/step |", "", load_after()]
    report(lines, args.record)


if __name__ == "__main__":
    main()
