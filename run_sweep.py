#!/usr/bin/env python
"""Hyper-parameter sweeps of train.py from a standard wandb sweep YAML, online or offline.

  python run_sweep.py --config sweep_configs/pretrain.yaml --count 3              # offline without wandb credentials
  python run_sweep.py --config sweep_configs/pretrain.yaml --count 8 --parallel 2  # two trials at a time
  python run_sweep.py --config sweep_configs/pretrain.yaml --count 8 --gpu 0,1     # one trial on each of GPUs 0, 1
  python run_sweep.py --config sweep_configs/pretrain.yaml --count 8 --resume      # continue an interrupted sweep
  python run_sweep.py --config sweep_configs/sft.yaml --online --project zero2llm --count 20

Online (wandb credentials, or --online): wandb.sweep creates the sweep (--sweep_id joins one) and
wandb.agent gets each trial's parameters, and its early stop, from the W&B server.
Offline (no credentials, or --offline): the same YAML runs on wandb's own open-source sweep engine
(the `sweeps` package behind wandb's local controller). It proposes each next configuration from the
trials so far (grid, random, bayes) and decides hyperband early stops from their metric histories.

Either way a trial is the YAML's command (train.py) run as a subprocess with its own --out_dir under
the sweep folder, and its metric history is read from the metrics.jsonl it writes there. The folder
(default out/sweeps/<yaml name>) holds everything a --resume needs and the results:
  sweep.yaml                 the sweep's config (with --mode applied)
  trials/<trial>/            trial.json (parameters, state, command), train.log, and train.py's outputs
  results.csv, results.png   the ranked table, and the metric against each swept parameter
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from sweep.config import SweepConfigError, load_config
from sweep.offline import open_offline_sweep, run_offline
from sweep.online import run_online
from sweep.results import write_results
from sweep.trials import chosen_gpus
from trainer import other_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="Sweep YAML (wandb's format). Required except with --resume, which "
                                         "uses the sweep folder's sweep.yaml.")
    parser.add_argument("--count", type=int, help="Trials in the sweep (offline: in total, so --resume runs the "
                        "rest; online: for this agent). Default: run_cap, or every point of a grid.")
    parser.add_argument("--mode", help="Sets the mode parameter of every trial (train.py --mode).")
    parser.add_argument("--parallel", type=int, help="Trials at once, one GPU each when GPUs exist (each starts "
                        "once the one before has logged, so they share its prepared data). Default: 1, or the "
                        "number of --gpu GPUs.")
    parser.add_argument("--gpu", help="Comma-separated GPU ids (as torch numbers them) to run the trials on, each "
                        "trial with CUDA_VISIBLE_DEVICES set to one of them, at most one trial per GPU at a time.")
    parser.add_argument("--sweep_dir", help="Sweep folder (default: out/sweeps/<yaml name>[-<mode>]; online: "
                                            "out/sweeps/wandb-<sweep id>).")
    parser.add_argument("--resume", action="store_true", help="Continue the offline sweep in --sweep_dir: "
                        "relaunch interrupted trials (from their last checkpoint), then propose new ones.")
    parser.add_argument("--kill_grace", type=float, default=30.0, help="Seconds a stopped trial gets to save "
                        "and exit after SIGTERM before SIGKILL (default: %(default)s).")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--online", action="store_true", help="Use the W&B server (default when wandb "
                                                             "credentials are configured).")
    where.add_argument("--offline", action="store_true", help="Run the sweep engine locally (default without "
                                                              "credentials).")
    parser.add_argument("--sweep_id", help="Online: join this existing sweep instead of creating one.")
    parser.add_argument("--project", help="Online: wandb project.")
    parser.add_argument("--entity", help="Online: wandb entity (user or team).")
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)  # one of --parallel's agents
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        other_flags.refuse_unknown(parser, unknown, {})
    try:
        args.gpus = chosen_gpus(args.gpu) if args.gpu else None
    except ValueError as e:
        parser.error(str(e))
    if args.parallel is None:
        args.parallel = len(args.gpus) if args.gpus else 1
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    if args.gpus and args.parallel > len(args.gpus):
        parser.error(f"--parallel {args.parallel} with --gpu {args.gpu}: at most one trial per GPU at a time, so at "
                     f"most {len(args.gpus)}")
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1 (leave it out for run_cap, or every point of a grid)")
    if not args.config and not args.resume:
        parser.error("--config is required (or --resume with --sweep_dir of an existing sweep)")
    from trainer.logger import wandb_mode

    online = args.online or bool(args.sweep_id) or (not args.offline and wandb_mode() == "online")
    if online and args.resume:
        parser.error("--resume continues an offline sweep; online, join the sweep again with --sweep_id")
    try:
        if online:
            config = load_config(args.config, args.mode)
            sweep_dir = run_online(config, args)
        else:
            config, sweep_dir = open_offline_sweep(args)
            print(f"offline sweep in {sweep_dir}: method {config['method']}, "
                  f"{config['metric'].get('goal', 'minimize')} {config['metric']['name']} "
                  f"(a trial's progress bar: {sweep_dir / 'trials' / '<trial>' / 'train.log'})")
            previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` acts as Ctrl-C does
            try:
                run_offline(config, sweep_dir, args.count, args.parallel, args.kill_grace, args.gpus)
            except KeyboardInterrupt:
                return 130
            finally:
                signal.signal(signal.SIGTERM, previous)
        if not args.agent:
            write_results(config, sweep_dir)
    except SweepConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: run_offline then stops the trials and leaves them for --resume, as on Ctrl-C."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
