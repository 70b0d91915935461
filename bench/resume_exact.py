#!/usr/bin/env python
"""Is a resume exact? One checkpoint resumed again and again, each time in a fresh process, against the run that
was never interrupted: the losses of the steps after the resume must be equal, bit for bit.

    python bench/resume_exact.py                        # the default recipe (bf16 where the CPU has it), 20 resumes
    python bench/resume_exact.py --flags "--dropout 0.1"   # with dropout, so the restored RNG matters too
    python bench/resume_exact.py --reruns 20            # also: is a run that is never interrupted repeatable?
    python bench/resume_exact.py --record               # append the result to bench/RESULTS.md

--reruns separates a resume's own error from run-to-run non-determinism: the uninterrupted run is repeated in
fresh processes and its losses at the compared steps checked against the first.

Every run is `python train.py --mode pretrain` on the shipped corpus as a user starts it (--max_steps added).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import tempfile
from pathlib import Path

import torch

from common import HelpFormatter, load_after, machine_line, report, train_py


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--resumes", type=int, default=20, help="fresh processes resuming the same checkpoint")
    p.add_argument("--at", type=int, default=10, help="the step whose checkpoint is resumed")
    p.add_argument("--after", type=int, default=3, help="steps compared after the resume")
    p.add_argument("--reruns", type=int, default=0, help="repeats of the uninterrupted run, compared with the first")
    p.add_argument("--flags", default="", help="more train.py flags, e.g. \"--dtype float32\"")
    p.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = p.parse_args()

    end = args.at + args.after
    flags = ["--mode", "pretrain", "--eval_interval", "0", "--eval_iters", "1", "--log_interval", "1",
             "--lr_decay_iters", str(end), "--no-save_last", *shlex.split(args.flags)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, straight = train_py(tmp / "straight", *flags, "--max_steps", str(end), "--save_interval_steps", "0")
        reference = losses(straight)
        train_py(tmp / "base", *flags, "--max_steps", str(args.at), "--save_interval_steps", str(args.at))
        exact, worst = 0, 0.0
        for i in range(args.resumes):
            run = tmp / f"resume_{i}"
            shutil.copytree(tmp / "base" / "checkpoints", run / "checkpoints")
            _, records = train_py(run, *flags, "--max_steps", str(end), "--resume")
            resumed = losses(records)
            diffs = [abs(resumed[s] - reference[s]) for s in range(args.at + 1, end + 1)]
            exact += max(diffs) == 0.0
            worst = max(worst, *diffs)
        repeats, repeat_worst = 0, 0.0
        for i in range(args.reruns):
            again = losses(train_py(tmp / f"rerun_{i}", *flags, "--max_steps", str(end), "--save_interval_steps",
                                    "0")[1])
            diffs = [abs(again[s] - reference[s]) for s in range(args.at + 1, end + 1)]
            repeats += max(diffs) == 0.0
            repeat_worst = max(repeat_worst, *diffs)
    lines = [f"resume exactness, train.py --mode pretrain {args.flags}".rstrip() + f" — {machine_line(torch.device('cpu'))}",
             f"checkpoint of step {args.at} resumed {args.resumes} times, each in a fresh process; steps "
             f"{args.at + 1}-{end} against the uninterrupted run",
             "",
             "| resumes with every loss equal | largest loss difference |",
             "|---|---|",
             f"| {exact} of {args.resumes} | {worst:.3g} |"]
    if args.reruns:
        lines += ["", f"the uninterrupted run repeated {args.reruns} times, each in a fresh process; the same steps "
                  f"against the first", "", "| repeats with every loss equal | largest loss difference |", "|---|---|",
                  f"| {repeats} of {args.reruns} | {repeat_worst:.3g} |"]
    lines += ["", load_after()]
    report(lines, args.record)


if __name__ == "__main__":
    main()
