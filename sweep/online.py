"""The online controller: wandb.sweep creates the sweep (or --sweep_id joins one) and wandb.agent gets
each trial's parameters, and its early stop, from the W&B server."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sweep.config import swept_parameters
from sweep.trials import (POLL_SECONDS, ROOT, Trial, describe_outcome, describe_params, trial_command, trial_env,
                          visible_gpus)


def run_online(config: dict[str, Any], args: argparse.Namespace) -> Path:
    """wandb.sweep + wandb.agent; returns the sweep folder. The agent calls one_trial per run the server
    hands out: it starts the trial exactly as offline and streams its metrics.jsonl into that W&B run
    (the server's hyperband reads them there). A server stop interrupts one_trial, whose `finally`
    stops the trial."""
    import wandb

    metric = config["metric"]["name"]
    sweep_id = args.sweep_id or wandb.sweep(config, project=args.project, entity=args.entity)
    sweep_dir = Path(args.sweep_dir or f"out/sweeps/wandb-{sweep_id}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    gpus = args.gpus if args.gpus is not None else visible_gpus() if args.parallel > 1 else []
    if args.parallel > 1:  # agents are process-global in wandb: one subprocess per agent
        counts = [None] * args.parallel if args.count is None else \
            [args.count // args.parallel + (i < args.count % args.parallel) for i in range(args.parallel)]
        agents = [subprocess.Popen(
            [sys.executable, str(ROOT / "run_sweep.py"), "--online", "--agent", "--config",
             str(sweep_dir / "sweep.yaml"), "--sweep_id", sweep_id, "--sweep_dir", str(sweep_dir),
             "--kill_grace", str(args.kill_grace),
             *([f"--project={args.project}"] if args.project else []),
             *([f"--entity={args.entity}"] if args.entity else []),
             *([f"--count={n}"] if n else [])], env=trial_env(i, args.parallel, gpus, args.gpus is not None))
            for i, n in enumerate(counts) if n != 0]
        for agent in agents:
            agent.wait()
        return sweep_dir

    def one_trial() -> None:
        run = wandb.init(dir=str(sweep_dir))
        trial = Trial(sweep_dir / "trials" / run.id, {k: v for k, v in dict(run.config).items()
                                                      if not k.startswith("_")})
        print(f"[{trial.name}] started: {describe_params(trial.params, swept_parameters(config))}")
        trial.launch(trial_command(config, trial), trial_env(0, 1, gpus, args.gpus is not None))
        try:
            while trial.process.poll() is None:
                time.sleep(POLL_SECONDS)
                log_to_run(run, trial.read_metrics())
        finally:
            if trial.process.poll() is None:
                trial.wait_stopped(args.kill_grace)
            log_to_run(run, trial.read_metrics())
            trial.finish(metric)
            print(f"[{trial.name}] {describe_outcome(trial, metric, config['metric'].get('goal', 'minimize'))}")
        if trial.state == "failed":
            raise RuntimeError(f"{trial.name} failed: {trial.reason}")

    wandb.agent(sweep_id, function=one_trial, project=args.project, entity=args.entity, count=args.count)
    return sweep_dir


def log_to_run(run: Any, records: list[dict[str, Any]]) -> None:
    """metrics.jsonl records into a W&B run, each at its step (a None value is left out)."""
    for r in records:
        run.log({k: v for k, v in r.items() if k != "step" and v is not None}, step=r["step"])
