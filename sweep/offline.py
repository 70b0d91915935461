"""The offline controller: wandb's open-source sweep engine (the `sweeps` package behind wandb's local
controller) proposes each next configuration from the trials so far and decides hyperband early stops
from their metric histories; this module launches the trials, up to --parallel at once, watches their
metrics, stops them, and leaves in the sweep folder what a --resume needs."""
from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sweep.config import SweepConfigError, import_sweeps, load_config, swept_parameters
from sweep.trials import (POLL_SECONDS, Trial, describe_outcome, describe_params, load_trials, trial_command,
                          trial_env, visible_gpus)

# What the engine is told about a trial. An early-stopped trial counts as "killed", as on the W&B
# server: bayes imputes its metric (metric.impute, default the worst seen) rather than trusting it.
ENGINE_STATE = {"running": "running", "finished": "finished", "stopped": "killed", "failed": "failed"}


def open_offline_sweep(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The sweep's config and folder: a new folder, or with --resume the saved config of an existing one."""
    name = Path(args.config).stem if args.config else "sweep"
    sweep_dir = Path(args.sweep_dir or f"out/sweeps/{name}{'-' + args.mode if args.mode else ''}")
    saved = sweep_dir / "sweep.yaml"
    if args.resume:
        if not saved.is_file():
            raise SweepConfigError(f"--resume: {sweep_dir} holds no sweep (no sweep.yaml); give its --sweep_dir")
        config = load_config(saved)
        if args.config and _search(load_config(args.config, args.mode)) != _search(config):
            raise SweepConfigError(f"--resume: {args.config} differs from the sweep's {saved}; a sweep keeps its "
                                   f"search space (start a new one with another --sweep_dir)")
        return config, sweep_dir
    if saved.exists():
        raise SweepConfigError(f"{sweep_dir} already holds a sweep: continue it with --resume, "
                               f"or choose another --sweep_dir")
    config = load_config(args.config, args.mode)
    if args.count is not None:  # the sweep's length, kept for --resume without --count
        config["run_cap"] = args.count
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    return config, sweep_dir


def _search(config: dict[str, Any]) -> dict[str, Any]:
    """A sweep's config but its run_cap, which --count sets in the saved copy."""
    return {k: v for k, v in config.items() if k != "run_cap"}


def to_python(value: Any) -> Any:
    """numpy scalars from the engine as Python values (JSON and flags want those)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def run_offline(config: dict[str, Any], sweep_dir: Path, count: int | None, parallel: int, grace: float,
                gpus: list[str] | None = None) -> None:
    """The local controller: propose, launch, watch metrics, early-stop, until the budget or grid is spent.
    `gpus` (--gpu's): the GPUs the trials run on, one trial per GPU at a time; None: the visible ones, shared
    out when trials run in parallel."""
    sweeps = import_sweeps()
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    target = config["metric"].get("target")
    limit = count or config.get("run_cap")
    if limit is None and config["method"] != "grid":
        raise SweepConfigError(f"--count: a {config['method']} sweep never runs out of configurations; "
                               "give --count N (or run_cap in the YAML)")
    swept = swept_parameters(config)
    trials = load_trials(sweep_dir)
    interrupted = [t for t in trials if t.state == "running"]
    pinned = gpus is not None
    gpus = gpus if pinned else visible_gpus() if parallel > 1 else []
    running: dict[int, Trial] = {}
    exhausted = False

    def engine_runs() -> list[Any]:
        return [sweeps.SweepRun(name=t.name, state=ENGINE_STATE[t.state],
                                config={k: {"value": v} for k, v in t.params.items()},
                                history=[{metric: v} for _, v in t.history(metric)]) for t in trials]

    def target_reached() -> bool:
        bests = [t.best(metric, goal) for t in trials if t.state == "finished"]
        return target is not None and any(b and (b[1] <= target if goal == "minimize" else b[1] >= target)
                                          for b in bests)

    try:
        while True:
            # Parallel trials start one after another, each once the previous one logs: the first
            # prepares the data caches (tokenized corpus) that the others then read instead of rebuilding.
            while len(running) < parallel and all(t.logging for t in running.values()):
                if interrupted:
                    trial = interrupted.pop(0)
                    print(f"[{trial.name}] relaunched (interrupted): {describe_params(trial.params, swept)}")
                elif exhausted or (limit and len(trials) >= limit) or target_reached():
                    break
                else:
                    proposal = sweeps.next_run(config, engine_runs())
                    if proposal is None:  # a grid with every point tried
                        exhausted = True
                        break
                    params = {k: to_python(v["value"]) for k, v in proposal.config.items()}
                    trial = Trial(sweep_dir / "trials" / f"trial_{len(trials) + 1:03d}", params)
                    trials.append(trial)
                    print(f"[{trial.name}] started: {describe_params(params, swept)}")
                slot = min(set(range(parallel)) - set(running))
                trial.launch(trial_command(config, trial), trial_env(slot, parallel, gpus, pinned))
                running[slot] = trial
            if not running:
                break
            time.sleep(POLL_SECONDS)
            new_metric = False
            for slot, trial in list(running.items()):
                new_metric |= any(metric in r for r in trial.read_metrics())
                if trial.process.poll() is not None:
                    trial.finish(metric)
                    del running[slot]
                    print(f"[{trial.name}] {describe_outcome(trial, metric, goal)}")
                elif trial.stop_requested and time.monotonic() - trial.stop_requested > grace:
                    trial.stop(signal.SIGKILL)
            if new_metric and "early_terminate" in config:
                for run in sweeps.stop_runs(config, engine_runs()):
                    trial = next((t for t in running.values() if t.name == run.name), None)
                    if trial is not None and trial.stop_requested is None:
                        trial.reason = hyperband_reason(run, metric, goal)
                        trial.stop()
    finally:
        if running:  # interrupted: stop the trials; they stay 'running' and --resume relaunches them
            print(f"\ninterrupted: stopping {', '.join(t.name for t in running.values())} "
                  f"(continue with --resume)", file=sys.stderr)
            for trial in running.values():
                trial.wait_stopped(grace)
                trial.reason = "interrupted"
                trial.save()


def hyperband_reason(run: Any, metric: str, goal: str) -> str:
    """'hyperband: <metric> <value> > <threshold> at evaluation <band>' from the engine's note on the run."""
    line = next(x for x in reversed(run.early_terminate_info["lines"]) if x.startswith(f"Run: {run.name} "))
    band, value, threshold = re.search(r"Band: (\d+) Metric: (\S+) Threshold: (\S+)\)", line).groups()
    if goal == "maximize":  # the engine compares negated values
        return f"hyperband: {metric} {-float(value):.4g} < {-float(threshold):.4g} at evaluation {band}"
    return f"hyperband: {metric} {float(value):.4g} > {float(threshold):.4g} at evaluation {band}"
