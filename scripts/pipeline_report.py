#!/usr/bin/env python
"""The quick start, measured: every stage at default flags over several seeds, and the README's table of it.

For each --seeds value, runs the quick start's training commands (`train.py --mode pretrain`, `sft`,
`lora --merge`, `dpo`, `grpo`: default flags, each stage starting from the one before it as in the quick
start) as one pipeline in its own folder under --work_dir, and measures each stage as a user sees it:

  minutes     wall time of the train.py process: start-up, tokenizing and the final export included
  pretrain    validation loss on dataset/pretrain_val.jsonl (the run's final evaluation); before: ln(vocab),
              the loss of a uniform guess
  sft, lora   scripts/pipeline_check.py's held-out chats (dataset/sft_val.jsonl), before and after: stops at
              <|im_end|>, exact answers, arithmetic correct
  dpo         held-out DPO loss and reward accuracy (dataset/dpo_val.jsonl, the run's final evaluation);
              before DPO they are ln 2 and 0 by definition (the policy is its reference)
  grpo        scripts/pipeline_check.py --task grpo (dataset/grpo_val.jsonl): accuracy before and after, its
              verdict, and the logged training reward over the first 20 steps against the last 20

Writes every figure of every seed with the machine, date and commit to --report (JSON), and prints the table:
mean over seeds with the lowest and highest in brackets. --update_readme replaces README.md's table (between
its `pipeline-report` markers) with it; tests/test_pipeline_report.py fails when README.md shows anything
but what the report holds, so the README's figures are never typed by hand.

    python scripts/pipeline_report.py --update_readme      # 3 seeds of all five stages: ~70 min on 2 CPU cores
    python scripts/pipeline_report.py --seeds 1337 --stages pretrain,sft --work_dir /tmp/report
    python scripts/pipeline_report.py --seeds 1337 --stage_args "pretrain=--preset mini" --work_dir /tmp/mini
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.pipeline_check import (TASK_DEFAULTS, evaluate, evaluate_grpo, grpo_verdict,  # noqa: E402
                                    parse_args as check_args, prompts_and_references, sft_verdict)

README = ROOT / "README.md"
BEGIN, END = "<!-- pipeline-report: begin -->", "<!-- pipeline-report: end -->"
# stage: (train.py flags of the quick start's line besides --mode, the stage whose final/ it starts from)
STAGES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "pretrain": ((), None), "sft": ((), "pretrain"), "lora": (("--merge",), "sft"), "dpo": ((), "sft"),
    "grpo": ((), "sft")}
REWARD_WINDOW = 20  # steps at each end of a GRPO run whose logged training reward is compared


def train(stage: str, seed: int, folder: Path, extra: list[str]) -> float:
    """One quick-start stage as a user runs it (its progress bar shows); its wall minutes."""
    flags, source = STAGES[stage]
    cmd = [sys.executable, "train.py", "--mode", stage, *flags, "--seed", str(seed), "--out_dir", str(folder / stage)]
    if source:
        cmd += ["--init_from", str(folder / source / "final")]
    cmd += extra
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    returncode = subprocess.run(cmd, cwd=ROOT).returncode
    if returncode:
        raise SystemExit(f"pipeline_report.py: error: `{shlex.join(cmd)}` exited with status {returncode} (its "
                         f"output is above)")
    return (time.perf_counter() - start) / 60


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_eval(run_dir: Path) -> dict:
    """The run's last validation record."""
    evals = [r for r in records(run_dir) if "val_loss" in r]
    if not evals:
        raise SystemExit(f"pipeline_report.py: error: {run_dir / 'metrics.jsonl'} holds no evaluation")
    return evals[-1]


def reward_trend(run_dir: Path) -> tuple[float, float]:
    """Mean logged training reward over the first and the last REWARD_WINDOW steps of a GRPO run."""
    logged = [r for r in records(run_dir) if "reward" in r]
    last = logged[-1]["step"]
    first = [r["reward"] for r in logged if r["step"] <= REWARD_WINDOW]
    final = [r["reward"] for r in logged if r["step"] > last - REWARD_WINDOW]
    return statistics.mean(first), statistics.mean(final)


def chat_metrics(model: Path, limit: int) -> dict:
    """pipeline_check's figures for one model on the held-out chats, at its default answer length and batch."""
    data, check = ROOT / TASK_DEFAULTS["sft"][2], check_args([])
    pairs = prompts_and_references(data)[:limit or None]
    r = evaluate(model, data, pairs, check.max_new_tokens, check.batch_size)
    return {k: r[k] for k in ("loss", "stop_rate", "exact_match", "arithmetic_accuracy", "arithmetic",
                              "conversations")}


def measure(stage: str, folder: Path, minutes: float, limit: int, seen: dict) -> dict:
    """The held-out figures of one finished stage; `seen` caches the chat figures of models already scored."""
    run = folder / stage
    out: dict = {"minutes": minutes}
    if stage == "pretrain":
        vocab = json.loads((run / "final" / "config.json").read_text())["vocab_size"]
        out.update(before=math.log(vocab), after=final_eval(run)["val_loss"])
    elif stage in ("sft", "lora"):
        for side, model in (("before", folder / STAGES[stage][1] / "final"), ("after", run / "final")):
            if model not in seen:
                seen[model] = chat_metrics(model, limit)
            out[side] = seen[model]
        out["passed"] = sft_verdict(out["before"], out["after"], check_args([]))[0]
    elif stage == "dpo":
        last = final_eval(run)
        out.update(before={"loss": math.log(2), "accuracy": 0.0},
                   after={"loss": last["val_loss"], "accuracy": last["val_rewards/accuracy"]})
    else:
        check = check_args(["--task", "grpo"])
        before, after = (evaluate_grpo(m, ROOT / check.data, limit, check.max_new_tokens, check.batch_size)
                         for m in (folder / "sft" / "final", run / "final"))
        passed, up, down, p = grpo_verdict(before, after, check)
        out.update(before=before["accuracy"], after=after["accuracy"], prompts=after["prompts"],
                   wrong_to_right=up, right_to_wrong=down, p=p, passed=passed, reward=reward_trend(run))
    return out


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


# --- the table --------------------------------------------------------------------------------------------------

def spread(values: list[float], fmt: str) -> str:
    """'mean (lowest–highest)' over seeds, or the value all seeds share."""
    text, low, high = (fmt.format(v) for v in (statistics.mean(values), min(values), max(values)))
    return text if low == high else f"{text} ({low}–{high})"


def p_value(p: float) -> str:
    return f"p {p:.3f}" if p >= 0.001 else "p < 0.001"


def render(report: dict) -> str:
    """The markdown README.md shows: one line saying what was run where, and the table."""
    runs = [report["runs"][str(s)] for s in report["seeds"]]
    stages = [s for s in STAGES if s in report["stages"]]

    def col(stage: str, *keys: str) -> list[float]:
        values = []
        for run in runs:
            v = run[stage]
            for k in keys:
                v = v[k]
            values.append(v)
        return values

    pct, num = "{:.1%}", "{:.3f}"
    rows = []
    for stage in stages:
        minutes = spread(col(stage, "minutes"), "{:.1f}")
        if stage == "pretrain":
            rows.append((stage, minutes, "validation loss (`pretrain_val.jsonl`)",
                         f"{spread(col(stage, 'before'), '{:.2f}')} (uniform guess)", spread(col(stage, "after"), num)))
        elif stage in ("sft", "lora"):
            chats = runs[0][stage]["after"]
            held_out = f"`sft_val.jsonl`, {chats['conversations']} chats"
            for i, (key, what, fmt) in enumerate((
                    ("stop_rate", f"stops at `<\\|im_end\\|>` ({held_out})", pct),
                    ("exact_match", "exact answer", pct),
                    ("arithmetic_accuracy", f"arithmetic correct ({chats['arithmetic']} questions)", pct),
                    ("loss", "loss on the reference replies", num))):
                rows.append((stage if i == 0 else "", minutes if i == 0 else "", what,
                             spread(col(stage, "before", key), fmt), spread(col(stage, "after", key), fmt)))
        elif stage == "dpo":
            rows.append((stage, minutes, "DPO loss (`dpo_val.jsonl`)", f"{math.log(2):.3f} (ln 2)",
                         spread(col(stage, "after", "loss"), num)))
            rows.append(("", "", "reward accuracy (margin > 0)", "0", spread(col(stage, "after", "accuracy"), num)))
        else:
            gains = [a - b for a, b in zip(col(stage, "after"), col(stage, "before"))]
            rows.append((stage, minutes, f"accuracy (`grpo_val.jsonl`, {runs[0][stage]['prompts']} prompts, greedy)",
                         spread(col(stage, "before"), pct), spread(col(stage, "after"), pct)))
            rows.append(("", "", "gain; wrong → right / right → wrong; sign test p, per seed", "",
                         "; ".join(f"{g * 100:+.1f} ({r['wrong_to_right']} / {r['right_to_wrong']}, {p_value(r['p'])})"
                                   for g, r in zip(gains, (run[stage] for run in runs)))))
            rows.append(("", "", "`pipeline_check.py --task grpo` passes", "",
                         f"{sum(col(stage, 'passed'))} of {len(runs)}"))
            rows.append(("", "", f"training reward (logged), first {REWARD_WINDOW} steps → last {REWARD_WINDOW}",
                         spread([r[stage]["reward"][0] for r in runs], num),
                         spread([r[stage]["reward"][1] for r in runs], num)))
    total = spread([sum(run[s]["minutes"] for s in stages) for run in runs], "{:.0f}")
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines = [f"Measured by `python scripts/pipeline_report.py` (commit {report['commit']}, {report['date']}, "
             f"{report['machine']}): seeds {seeds}, each a whole pipeline; mean over seeds (lowest–highest). "
             f"Training time of the {len(stages)} stages: {total} minutes.", "",
             "| stage | minutes | held out | before the stage | after |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def split_readme(text: str) -> tuple[str, str, str]:
    """(text before the begin marker, the table between the markers, text after the end marker)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"pipeline_report.py: error: README.md needs one {BEGIN} and one {END} line")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head, block.strip("\n"), tail


def readme_block(text: str) -> str:
    """The table README.md's text shows between the markers."""
    return split_readme(text)[1]


def update_readme(path: Path, table: str) -> None:
    head, _, tail = split_readme(path.read_text())
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1337,1338,1339", help="comma-separated --seed values, one pipeline each "
                   "(default: 1337,1338,1339; 1337 is train.py's default)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated stages to run (default: all: "
                   f"{','.join(STAGES)}); a stage needs the one it starts from")
    p.add_argument("--work_dir", default="out/pipeline_report", help="where the runs go, one folder per seed; must "
                   "not exist yet unless --overwrite (default: out/pipeline_report)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier report in --work_dir")
    p.add_argument("--report", default="docs/pipeline_report.json", help="the JSON record to write "
                   "(default: docs/pipeline_report.json, the one README.md shows)")
    p.add_argument("--update_readme", action="store_true", help="replace README.md's table with this report's")
    p.add_argument("--render", action="store_true", help="run nothing: print the table of the existing --report (and "
                   "with --update_readme put it in README.md)")
    p.add_argument("--train_args", default="", help="extra train.py flags for every stage (e.g. \"--max_steps 2\" "
                   "for a dry run); not with --update_readme, whose table is of the defaults")
    p.add_argument("--stage_args", action="append", default=[], metavar="STAGE=FLAGS",
                   help="extra train.py flags for one stage, after --train_args (e.g. \"pretrain=--preset mini\": the "
                   "fine-tuning modes refuse pretraining's model-shape flags, so --train_args cannot carry them); "
                   "repeat for more stages; not with --update_readme")
    p.add_argument("--limit", type=int, default=0, help="score only the first N held-out chats/prompts (0 = all); "
                   "not with --update_readme")
    args = p.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",")]
    stages = args.stages.split(",")
    ordered = [s for s in STAGES if s in stages]  # the quick start's order, whatever order they were given in
    unknown = [s for s in stages if s not in STAGES]
    orphans = [s for s in stages if s in STAGES and STAGES[s][1] and STAGES[s][1] not in stages]
    if unknown or orphans:
        p.error(f"--stages: {', '.join(unknown)} unknown (choose from {', '.join(STAGES)})" if unknown else
                f"--stages: {', '.join(orphans)} start from {', '.join(STAGES[s][1] for s in orphans)}: add it")
    stage_args = {}
    for given in args.stage_args:
        stage, _, flags = given.partition("=")
        if stage not in STAGES or not flags:
            p.error(f"--stage_args {given}: give STAGE=FLAGS, STAGE one of {', '.join(STAGES)}")
        stage_args[stage] = f"{stage_args[stage]} {flags}" if stage in stage_args else flags
    if args.update_readme and (args.train_args or stage_args or args.limit):
        p.error("--update_readme shows the default flags on the whole held-out data: drop --train_args, --stage_args "
                "and --limit")
    if args.render:
        show(json.loads(Path(args.report).read_text()), args)
        return
    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()) and not args.overwrite:
        p.error(f"--work_dir {work} already holds runs: pass --overwrite to replace them, or another --work_dir")

    runs = {}
    for seed in seeds:
        folder = work / f"seed-{seed}"
        if folder.exists():  # only with --overwrite (checked above)
            shutil.rmtree(folder)
        seen: dict = {}
        runs[str(seed)] = {stage: measure(stage, folder, train(stage, seed, folder, shlex.split(args.train_args)
                                                                + shlex.split(stage_args.get(stage, ""))),
                                          args.limit, seen)
                           for stage in ordered}
    import torch

    from bench.common import cpu_name

    report = {"seeds": seeds, "stages": ordered, "commit": commit(),
              "date": datetime.date.today().isoformat(), "train_args": args.train_args, "stage_args": stage_args,
              "limit": args.limit,
              "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "runs": runs}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    show(report, args)


def show(report: dict, args: argparse.Namespace) -> None:
    """Print the report's table; with --update_readme, also put it in README.md."""
    table = render(report)
    print(table)
    if args.update_readme:
        if report["train_args"] or report.get("stage_args") or report["limit"]:
            raise SystemExit(f"pipeline_report.py: error: {args.report} was run with --train_args/--stage_args/--limit; "
                             f"README.md shows the default flags on the whole held-out data")
        update_readme(README, table)
        print(f"README.md's table updated from {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
