"""A trial: the YAML's command with wandb's macros filled in, run as a subprocess in its own folder,
and the metric history read back from the metrics.jsonl it writes there."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.5
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ARG_MACROS = ("args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json")
ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


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


def runs_train_py(config: dict[str, Any]) -> bool:
    """Whether the trials run this repository's train.py (whose flags and checkpoints we know)."""
    chunks = [config["program"] if str(c) == "${program}" else str(c) for c in config["command"]]
    return any(c.endswith("train.py") and Path(c).resolve() == ROOT / "train.py" for c in chunks)


def trial_command(config: dict[str, Any], trial: Trial) -> list[str]:
    """The trial's command: its parameters, its out_dir, and --resume if train.py left a checkpoint (--overwrite if
    it left only the start of a run, stopped before its first checkpoint: that trial starts again)."""
    args = {**trial.params, "out_dir": str(trial.folder)}
    if runs_train_py(config):
        from trainer.checkpoint import latest_checkpoint
        from trainer.rundir import earlier_run

        if latest_checkpoint(trial.folder) is not None:  # an interrupted trial continues where it was
            args["resume"] = "auto"
        elif earlier_run(trial.folder):
            args["overwrite"] = True
    return expand_command(config["command"], config["program"], args)


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


def chosen_gpus(spec: str) -> list[str]:
    """--gpu's comma-separated ids (as torch numbers the GPUs this process sees) as CUDA_VISIBLE_DEVICES values;
    ValueError, saying why, when they are not GPUs this machine has."""
    import torch

    ids = [g.strip() for g in spec.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpu {spec}: expected distinct GPU ids separated by commas, e.g. --gpu 0,1")
    if not torch.cuda.is_available():
        raise ValueError(f"--gpu {spec}: CUDA is not available here (no GPU, or a CPU-only torch "
                         f"{torch.__version__}); leave --gpu out to run the trials on the CPU")
    visible = visible_gpus()
    missing = [g for g in ids if int(g) >= len(visible)]
    if missing:
        raise ValueError(f"--gpu {spec}: this process sees {len(visible)} GPU(s), 0 to {len(visible) - 1}; there is "
                         f"no GPU {missing[0]}")
    return [visible[int(g)] for g in ids]


def trial_env(slot: int, parallel: int, gpus: list[str], pinned: bool = False) -> dict[str, str]:
    """One GPU per parallel slot (also for a single trial when `pinned`: --gpu chose them); without GPUs,
    parallel CPU trials share the cores instead of each starting a thread per core (oversubscribed, they run
    many times slower)."""
    env = dict(os.environ)
    if gpus and (pinned or parallel > 1):
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif parallel > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    return env


# ----------------------------------------------------------------------------- what is printed of a trial

def format_value(value: Any) -> str:
    """A parameter or metric value as printed: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_params(params: dict[str, Any], swept: list[str]) -> str:
    return ", ".join(f"{k}={format_value(params.get(k))}" for k in swept) or "(no swept parameters)"


def describe_outcome(trial: Trial, metric: str, goal: str) -> str:
    """The line printed when a trial ends: its state, how long it ran, its best metric, and why it ended."""
    best = trial.best(metric, goal)
    took = f" after {time.monotonic() - trial.started:.0f} s" if trial.started else ""
    score = f": best {metric} {best[1]:.4f} at step {best[0]}" if best else ""
    note = f" ({trial.reason})" if trial.reason else ""
    return f"{trial.state}{took}{score}{note}"
