#!/usr/bin/env python
"""Hyper-parameter sweeps of train.py from a standard wandb sweep YAML, online or offline.

  python run_sweep.py --config sweep_configs/pretrain.yaml --count 3              # offline without wandb credentials
  python run_sweep.py --config sweep_configs/pretrain.yaml --count 8 --parallel 2  # two trials at a time
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
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
POLL_SECONDS = 0.5
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ARG_MACROS = ("args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json")
ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")
# What the engine is told about a trial. An early-stopped trial counts as "killed", as on the W&B
# server: bayes imputes its metric (metric.impute, default the worst seen) rather than trusting it.
ENGINE_STATE = {"running": "running", "finished": "finished", "stopped": "killed", "failed": "failed"}


class SweepConfigError(ValueError):
    """A mistake in the sweep YAML or the flags, named by file and key; printed without a traceback."""


def import_sweeps() -> Any:
    """wandb's sweep engine. Its pydantic-1 style model warns on import under pydantic 2 (harmless)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


# ----------------------------------------------------------------------------- the YAML

def load_config(path: str | Path, mode: str | None = None) -> dict[str, Any]:
    """Read a sweep YAML, apply --mode, fill wandb's default program/command, check every key."""
    path = Path(path)
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise SweepConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SweepConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise SweepConfigError(f"{path}: expected a mapping of sweep keys (method, metric, parameters, ...)")
    if mode and isinstance(config.get("parameters"), dict):
        config["parameters"]["mode"] = {"value": mode}
    config.setdefault("program", "train.py")
    config.setdefault("command", list(DEFAULT_COMMAND))
    problems = check_config(config)
    if problems:
        raise SweepConfigError("\n".join(f"{path}: {p}" for p in problems))
    return config


def check_config(config: dict[str, Any]) -> list[str]:
    """Everything wrong with a sweep config, one 'key: what' line each; later checks need earlier ones clean."""
    for check in (check_schema, check_semantics, check_command, check_train_flags):
        problems = check(config)
        if problems:
            return problems
    return []


def check_schema(config: dict[str, Any]) -> list[str]:
    """The sweeps package's JSON schema (the one wandb validates with), errors translated to key paths."""
    import_sweeps()
    from sweeps.config.schema import validator

    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [_describe(e) for e in errors]
    if "parameters" not in config:
        problems.append("parameters: missing: the sweep needs at least one parameter")
    if "metric" not in config:
        problems.append("metric: missing: trials are ranked by it (e.g. metric: {name: val_loss, goal: minimize})")
    return problems


def _leaves(error: Any) -> list[Any]:
    return [leaf for sub in error.context for leaf in _leaves(sub)] if error.context else [error]


def _where(path: Any) -> str:
    return ".".join(str(p) for p in path)


def _describe(error: Any) -> str:
    """One jsonschema error as 'key.path: message', digging into anyOf for the error that explains it."""
    path = list(error.absolute_path)
    if len(path) == 2 and path[0] == "parameters":
        return f"{_where(path)}: {_explain_parameter(error.instance)}"
    leaves = _leaves(error)
    if len(leaves) > 1 and all(e.validator == "required" for e in leaves):  # alternatives, each incomplete
        needs = " or ".join(sorted({" + ".join(e.schema["required"]) for e in leaves}))
        return f"{_where(path) or '(top level)'}: needs {needs}"
    leaf = max(leaves, key=lambda e: len(e.absolute_path))
    return _message(leaf, _where(leaf.absolute_path))


def _message(error: Any, where: str) -> str:
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        return f"{key}: unknown key (allowed here: {', '.join(allowed)})"
    hint = ""
    if isinstance(error.instance, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", error.instance):
        hint = f" (YAML reads {error.instance} as text: write it with a dot, e.g. 1.0e-4)"
    return f"{where or '(top level)'}: {error.message}{hint}"


def _explain_parameter(spec: Any) -> str:
    """Why a parameter matches none of the schema's parameter forms, judged against the closest form."""
    from jsonschema import Draft7Validator
    from sweeps.config.schema import format_checker, sweep_config_jsonschema as schema

    if not isinstance(spec, dict):
        return "expected a mapping such as {value: 3}, {values: [1, 2]} or {min: 1.0e-4, max: 1.0e-2}"
    definitions = schema["definitions"]
    forms = []
    for ref in definitions["parameter"]["anyOf"]:
        form = definitions[ref["$ref"].split("/")[-1]]
        forms += form.get("anyOf", [form])  # uniform is itself a choice of forms
    forms = [f for f in forms if "distribution" in f.get("properties", {})]  # not nested parameter dicts
    dist = spec.get("distribution")
    if dist is not None:
        known = sorted({d for f in forms for d in f["properties"]["distribution"]["enum"]})
        forms = [f for f in forms if dist in f["properties"]["distribution"]["enum"]]
        if not forms:
            return f"distribution: unknown distribution {dist!r} (one of: {', '.join(known)})"
    else:
        forms = [f for f in forms if "distribution" not in f.get("required", [])]
    candidates = [_leaves_of(Draft7Validator(f, format_checker=format_checker), spec) for f in forms]
    errors = min(candidates, key=len)
    # An unknown key explains the rest (a misspelt 'values' also makes 'values' missing).
    error = min(errors, key=lambda e: e.validator != "additionalProperties")
    if error.validator == "additionalProperties":
        unknown = sorted(set(spec) - set(error.schema["properties"]))
        return (f"{unknown[0]}: unknown key (a parameter takes value, values [+ probabilities], min + max, "
                f"or a distribution with its fields)")
    if error.validator == "required":
        return f"missing {error.message.split(' is a required')[0]}"
    return _message(error, _where(error.absolute_path)) if error.absolute_path else error.message


def _leaves_of(validator: Any, instance: Any) -> list[Any]:
    return [leaf for e in validator.iter_errors(instance) for leaf in _leaves(e)]


def check_semantics(config: dict[str, Any]) -> list[str]:
    """The checks the sweeps package makes beyond the schema, and a dry run of its search and stopping."""
    sweeps = import_sweeps()
    from sweeps.config import schema

    def without_name(e: Exception, name: str) -> str:  # the package's messages start with the name
        return re.sub(rf"^(Parameter )?{re.escape(name)}:? ", "", str(e))

    problems = []
    for name, spec in config["parameters"].items():
        try:
            schema.validate_min_max(name, spec)
            schema.validate_categorical_prob(name, spec)
        except ValueError as e:
            problems.append(f"parameters.{name}: {without_name(e, name)}")
            continue
        try:  # wandb only warns: min/max as exponents is legitimate, if easy to get wrong
            schema.check_for_deprecated_distributions(name, spec)
        except ValueError as e:
            print(f"warning: parameters.{name}: {without_name(e, name)}", file=sys.stderr)
    if config["metric"]["name"] == "loss":
        print("warning: metric: 'loss' is the training loss; rank by val_loss (train loss rewards overfitting "
              "and batch settings, not generalisation)", file=sys.stderr)
    if "out_dir" in config["parameters"]:
        problems.append("parameters.out_dir: remove it: every trial gets its own --out_dir in the sweep folder")
    if problems:
        return problems
    try:
        sweeps.next_run(config, [])
    except ValueError as e:
        problems.append(f"method ({config['method']}): {e}")
    if "early_terminate" in config:
        try:
            sweeps.stop_runs(config, [])
        except ValueError as e:
            problems.append(f"early_terminate: {e}")
    return problems


def check_command(config: dict[str, Any]) -> list[str]:
    """The command must pass the parameters on (an ${args...} macro) and name a program that exists."""
    command = [str(c) for c in config["command"]]
    known = {"env", "interpreter", "program", *ARG_MACROS}
    problems = [f"command[{i}]: unknown macro {c} (known: {', '.join('${%s}' % k for k in sorted(known))}, "
                f"${{envvar:NAME}})" for i, c in enumerate(command)
                if c.startswith("${") and c.endswith("}") and c[2:-1] not in known and not ENVVAR_MACRO.fullmatch(c)]
    if not any(c[2:-1] in ARG_MACROS for c in command):
        problems.append("command: needs ${args} (or another ${args...} macro): it carries each trial's parameters "
                        "and --out_dir")
    if "${program}" in command and not Path(config["program"]).is_file():
        problems.append(f"program: {config['program']} not found from {Path.cwd()} "
                        "(run from the repository root, or give its path)")
    return problems


def runs_train_py(config: dict[str, Any]) -> bool:
    """Whether the trials run this repository's train.py (whose flags and checkpoints we know)."""
    chunks = [config["program"] if str(c) == "${program}" else str(c) for c in config["command"]]
    return any(c.endswith("train.py") and Path(c).resolve() == ROOT / "train.py" for c in chunks)


def check_train_flags(config: dict[str, Any]) -> list[str]:
    """Parse each parameter's values with train.py's own parser: a typo or a mode train.py lacks fails
    here once, not in every trial."""
    if not runs_train_py(config):
        return []
    import train

    parser = train.build_parser()  # allow_abbrev=False: a parameter must name a flag exactly

    def reject(message: str) -> None:
        raise ValueError(message)

    parser.error = reject  # report the problem instead of exiting
    macro = next(str(c)[2:-1] for c in config["command"] if str(c)[2:-1] in ARG_MACROS)
    problems = []
    for name, spec in config["parameters"].items():
        for value in [spec[k] for k in ("value", "min", "max") if k in spec] + list(spec.get("values", [])):
            argv = format_args({name: value}, macro)
            try:
                unknown = parser.parse_known_args(argv)[1]
            except ValueError as e:
                problems.append(f"parameters.{name}: train.py rejects {' '.join(argv)}: {e}")
                break
            if unknown:
                problems.append(f"parameters.{name}: train.py does not accept {' '.join(unknown)}")
                break
    return problems


# ----------------------------------------------------------------------------- trial commands

def format_args(args: dict[str, Any], macro: str) -> list[str]:
    """Parameters as wandb's agent formats them for each ${args...} macro."""
    if macro == "args_json":
        return [json.dumps(args)]
    out: list[str] = []
    for k, v in args.items():
        if macro == "args":
            out.append(f"--{k}={v}")
        elif macro == "args_no_equals":
            out += [f"--{k}", str(v)]
        elif macro == "args_no_hyphens":
            out.append(f"{k}={v}")
        elif isinstance(v, bool):  # args_no_boolean_flags: true -> --flag, false -> left out
            out += [f"--{k}"] if v else []
        else:
            out.append(f"--{k}={v}")
    return out


def expand_command(command: list[Any], program: str, args: dict[str, Any]) -> list[str]:
    """The YAML's command with wandb's macros filled in (${interpreter} is this Python, not 'python')."""
    out: list[str] = []
    for chunk in command:
        chunk = ENVVAR_MACRO.sub(lambda m: os.environ.get(m.group(1), m.group(1)), str(chunk))
        if chunk == "${env}":
            out += [] if os.name == "nt" else ["/usr/bin/env"]
        elif chunk == "${interpreter}":
            out.append(sys.executable)
        elif chunk == "${program}":
            out.append(program)
        elif chunk.startswith("${") and chunk.endswith("}"):
            out += format_args(args, chunk[2:-1])
        else:
            out.append(chunk)
    return out


def trial_command(config: dict[str, Any], trial: Trial) -> list[str]:
    """The trial's command: its parameters, its out_dir, and --resume if train.py left a checkpoint."""
    args = {**trial.params, "out_dir": str(trial.folder)}
    if runs_train_py(config):
        from trainer.checkpoint import latest_checkpoint

        if latest_checkpoint(trial.folder) is not None:  # an interrupted trial continues where it was
            args["resume"] = "auto"
    return expand_command(config["command"], config["program"], args)


def plain(value: Any) -> Any:
    """numpy scalars from the engine as Python values (JSON and flags want those)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


# ----------------------------------------------------------------------------- trials

@dataclass
class Trial:
    """One train.py run: its folder, its process, and the records of the metrics.jsonl it writes."""

    folder: Path
    params: dict[str, Any]
    state: str = "running"  # running, finished, stopped (early-terminated), failed
    reason: str = ""
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    stop_requested: float | None = None  # time.monotonic() of the SIGTERM
    started: float = 0.0
    records_at_launch: int = 0
    _offset: int = 0

    @property
    def name(self) -> str:
        return self.folder.name

    @classmethod
    def load(cls, folder: Path) -> Trial:
        saved = json.loads((folder / "trial.json").read_text())
        trial = cls(folder, saved["params"], saved["state"], saved["reason"], saved["command"], saved["returncode"])
        trial.read_metrics()
        return trial

    def save(self) -> None:
        fields = {k: getattr(self, k) for k in ("params", "state", "reason", "command", "returncode")}
        (self.folder / "trial.json").write_text(json.dumps({"name": self.name, **fields}, indent=2) + "\n")

    def launch(self, command: list[str], env: dict[str, str]) -> None:
        """Start the trial in its own process group, so a stop reaches its children too."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.command, self.state, self.reason, self.stop_requested = command, "running", "", None
        self.save()
        with open(self.folder / "train.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.started, self.records_at_launch = time.monotonic(), len(self.records)

    @property
    def logging(self) -> bool:
        """Whether this launch has logged a record yet (its data is prepared by then)."""
        return len(self.records) > self.records_at_launch

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records appended to metrics.jsonl since the last call (complete lines only)."""
        path = self.folder / "metrics.jsonl"
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        self._offset += len(data)
        new = [json.loads(line) for line in data.splitlines() if line.strip()]
        self.records += new
        return new

    def history(self, metric: str) -> list[tuple[int, float | None]]:
        """(step, value) per logged step in step order; a resumed run's re-logged steps replace the old."""
        return sorted({r["step"]: r[metric] for r in self.records if metric in r}.items())

    def best(self, metric: str, goal: str) -> tuple[int, float] | None:
        values = [(s, v) for s, v in self.history(metric) if v is not None and math.isfinite(v)]
        if not values:
            return None
        return (min if goal == "minimize" else max)(values, key=lambda sv: sv[1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def wait_stopped(self, grace: float) -> None:
        """SIGTERM (train.py then saves a checkpoint and exits), SIGKILL if it is not gone after `grace` s."""
        self.stop()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)
            self.process.wait()

    def finish(self, metric: str) -> None:
        """Classify the ended process: stopped on request, failed (crash or diverged), or finished."""
        self.read_metrics()
        self.returncode = self.process.returncode
        values = self.history(metric)
        if self.stop_requested is not None:
            self.state = "stopped"
        elif self.returncode != 0:
            self.state, self.reason = "failed", f"exit code {self.returncode}: {self._last_log_line()}"
        elif not values:  # often a typo in metric.name: say what the trial did log
            logged = sorted({k for r in self.records for k in r} - {"step"})
            self.state, self.reason = "failed", f"wrote no {metric} to metrics.jsonl" + (
                f" (it logged {', '.join(logged)}; check the YAML's metric.name)" if logged else "")
        elif values[-1][1] is None or not math.isfinite(values[-1][1]):
            self.state, self.reason = "failed", f"diverged: {metric} is not finite at step {values[-1][0]}"
        else:
            self.state = "finished"
        self.save()

    def _last_log_line(self) -> str:
        text = (self.folder / "train.log").read_text(errors="replace")
        lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
        return lines[-1][:300] if lines else "(no output)"


def load_trials(sweep_dir: Path) -> list[Trial]:
    return [Trial.load(p.parent) for p in sorted((sweep_dir / "trials").glob("*/trial.json"))]


def visible_gpus() -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def trial_env(slot: int, parallel: int, gpus: list[str]) -> dict[str, str]:
    """One GPU per parallel slot; without GPUs, parallel CPU trials share the cores instead of each
    starting a thread per core (oversubscribed, they run many times slower)."""
    env = dict(os.environ)
    if parallel > 1 and gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif parallel > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    return env


def describe_params(params: dict[str, Any], swept: list[str]) -> str:
    return ", ".join(f"{k}={fmt(params.get(k))}" for k in swept) or "(no swept parameters)"


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- offline

def run_offline(config: dict[str, Any], sweep_dir: Path, count: int | None, parallel: int, grace: float) -> None:
    """The local controller: propose, launch, watch metrics, early-stop, until the budget or grid is spent."""
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
    gpus = visible_gpus() if parallel > 1 else []
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
                    params = {k: plain(v["value"]) for k, v in proposal.config.items()}
                    trial = Trial(sweep_dir / "trials" / f"trial_{len(trials) + 1:03d}", params)
                    trials.append(trial)
                    print(f"[{trial.name}] started: {describe_params(params, swept)}")
                slot = min(set(range(parallel)) - set(running))
                trial.launch(trial_command(config, trial), trial_env(slot, parallel, gpus))
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
                    print(f"[{trial.name}] {outcome(trial, metric, goal)}")
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
    """'hyperband: val_loss 8.74 > 7.26 at evaluation 1' from the engine's note on the run."""
    line = next(x for x in reversed(run.early_terminate_info["lines"]) if x.startswith(f"Run: {run.name} "))
    band, value, threshold = re.search(r"Band: (\d+) Metric: (\S+) Threshold: (\S+)\)", line).groups()
    if goal == "maximize":  # the engine compares negated values
        return f"hyperband: {metric} {-float(value):.4g} < {-float(threshold):.4g} at evaluation {band}"
    return f"hyperband: {metric} {float(value):.4g} > {float(threshold):.4g} at evaluation {band}"


def outcome(trial: Trial, metric: str, goal: str) -> str:
    best = trial.best(metric, goal)
    took = f" after {time.monotonic() - trial.started:.0f} s" if trial.started else ""
    score = f": best {metric} {best[1]:.4f} at step {best[0]}" if best else ""
    note = f" ({trial.reason})" if trial.reason else ""
    return f"{trial.state}{took}{score}{note}"


def swept_parameters(config: dict[str, Any]) -> list[str]:
    return [k for k, spec in config["parameters"].items() if "value" not in spec]


# ----------------------------------------------------------------------------- online

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
    if args.parallel > 1:  # agents are process-global in wandb: one subprocess per agent
        gpus = visible_gpus()
        counts = [None] * args.parallel if args.count is None else \
            [args.count // args.parallel + (i < args.count % args.parallel) for i in range(args.parallel)]
        agents = [subprocess.Popen(
            [sys.executable, __file__, "--online", "--agent", "--config", str(sweep_dir / "sweep.yaml"),
             "--sweep_id", sweep_id, "--sweep_dir", str(sweep_dir), "--kill_grace", str(args.kill_grace),
             *([f"--project={args.project}"] if args.project else []),
             *([f"--entity={args.entity}"] if args.entity else []),
             *([f"--count={n}"] if n else [])], env=trial_env(i, args.parallel, gpus))
            for i, n in enumerate(counts) if n != 0]
        for agent in agents:
            agent.wait()
        return sweep_dir

    def one_trial() -> None:
        run = wandb.init(dir=str(sweep_dir))
        trial = Trial(sweep_dir / "trials" / run.id, {k: v for k, v in dict(run.config).items()
                                                      if not k.startswith("_")})
        print(f"[{trial.name}] started: {describe_params(trial.params, swept_parameters(config))}")
        trial.launch(trial_command(config, trial), dict(os.environ))
        try:
            while trial.process.poll() is None:
                time.sleep(POLL_SECONDS)
                log_records(run, trial.read_metrics())
        finally:
            if trial.process.poll() is None:
                trial.wait_stopped(args.kill_grace)
            log_records(run, trial.read_metrics())
            trial.finish(metric)
            print(f"[{trial.name}] {outcome(trial, metric, config['metric'].get('goal', 'minimize'))}")
        if trial.state == "failed":
            raise RuntimeError(f"{trial.name} failed: {trial.reason}")

    wandb.agent(sweep_id, function=one_trial, project=args.project, entity=args.entity, count=args.count)
    return sweep_dir


def log_records(run: Any, records: list[dict[str, Any]]) -> None:
    for r in records:
        run.log({k: v for k, v in r.items() if k != "step" and v is not None}, step=r["step"])


# ----------------------------------------------------------------------------- results

def results(config: dict[str, Any], sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: finished and stopped trials ranked by their best metric, then the others."""
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    rows = []
    for t in load_trials(sweep_dir):
        best = t.best(metric, goal) if t.state in ("finished", "stopped") else None
        rows.append({"trial": t.name, "state": t.state, metric: best[1] if best else None,
                     "step": best[0] if best else None,
                     **{k: t.params.get(k) for k in swept_parameters(config)}, "note": t.reason})
    sign = 1 if goal == "minimize" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0, r["trial"]))
    for i, row in enumerate(rows):
        row["rank"] = i + 1 if row[metric] is not None else None
    return rows


def write_results(config: dict[str, Any], sweep_dir: Path) -> list[dict[str, Any]]:
    """Print the ranked table and write it as results.csv, with the plot as results.png."""
    rows = results(config, sweep_dir)
    metric = config["metric"]["name"]
    columns = ["rank", "trial", "state", metric, "step", *swept_parameters(config), "note"]
    cells = [[fmt(r[c]) if r[c] is not None else "-" for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print()
    for line in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    print(f"\ntable: {sweep_dir / 'results.csv'}")
    if plot(rows, swept_parameters(config), metric, sweep_dir / "results.png"):
        print(f"plot:  {sweep_dir / 'results.png'}")
    if rows and rows[0]["rank"] == 1:
        print(f"best:  {sweep_dir / 'trials' / rows[0]['trial']} ({metric} {fmt(rows[0][metric])})")
    return rows


def plot(rows: list[dict[str, Any]], swept: list[str], metric: str, path: Path) -> bool:
    """The best metric of each ranked trial against each swept parameter, one panel per parameter."""
    ranked = [r for r in rows if r["rank"] is not None]
    if not ranked or not swept:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], swept):
        values = [r[name] for r in ranked]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        x = values if numeric else [str(v) for v in values]
        for state, marker in (("finished", "o"), ("stopped", "x")):
            pts = [(xi, r[metric]) for xi, r in zip(x, ranked) if r["state"] == state]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=state)
        ax.scatter([x[0]], [ranked[0][metric]], marker="*", s=220, color="gold", edgecolors="black", label="best",
                   zorder=3)
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"best {metric} of each trial ({len(ranked)} ranked)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="Sweep YAML (wandb's format). Required except with --resume, which "
                                         "uses the sweep folder's sweep.yaml.")
    parser.add_argument("--count", type=int, help="Trials in the sweep (offline: in total, so --resume runs the "
                        "rest; online: for this agent). Default: run_cap, or every point of a grid.")
    parser.add_argument("--mode", help="Sets the mode parameter of every trial (train.py --mode).")
    parser.add_argument("--parallel", type=int, default=1, help="Trials at once, one GPU each when GPUs exist "
                        "(each starts once the one before has logged, so they share its prepared data).")
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
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
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
            config, sweep_dir = offline_sweep(args)
            print(f"offline sweep in {sweep_dir}: method {config['method']}, "
                  f"{config['metric'].get('goal', 'minimize')} {config['metric']['name']} "
                  f"(a trial's progress bar: {sweep_dir / 'trials' / '<trial>' / 'train.log'})")
            previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the trials like Ctrl-C
            try:
                run_offline(config, sweep_dir, args.count, args.parallel, args.kill_grace)
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def offline_sweep(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The sweep's config and folder: a new folder, or with --resume the saved config of an existing one."""
    name = Path(args.config).stem if args.config else "sweep"
    sweep_dir = Path(args.sweep_dir or f"out/sweeps/{name}{'-' + args.mode if args.mode else ''}")
    saved = sweep_dir / "sweep.yaml"
    if args.resume:
        if not saved.is_file():
            raise SweepConfigError(f"--resume: {sweep_dir} holds no sweep (no sweep.yaml); give its --sweep_dir")
        config = load_config(saved)
        if args.config and load_config(args.config, args.mode) != config:
            raise SweepConfigError(f"--resume: {args.config} differs from the sweep's {saved}; a sweep keeps its "
                                   f"search space (start a new one with another --sweep_dir)")
        return config, sweep_dir
    if saved.exists():
        raise SweepConfigError(f"{sweep_dir} already holds a sweep: continue it with --resume, "
                               f"or choose another --sweep_dir")
    config = load_config(args.config, args.mode)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    return config, sweep_dir


if __name__ == "__main__":
    sys.exit(main())
