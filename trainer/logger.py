"""Where metrics go: a tqdm bar, out_dir/metrics.jsonl (one JSON object per record), and wandb.

Only rank 0 logs. metrics.jsonl is the run's machine-readable history (sweeps and tests read it);
wandb is optional and never needs a network: without credentials it runs offline. Its run config holds every
flag and, under "model", the model's architecture; it can also keep the repository's code, the exported
models (as artifacts) and wandb.watch histograms of gradients or parameters.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from trainer.errors import TrainingError
REPO = Path(__file__).resolve().parent.parent


def wandb_mode() -> str:
    """WANDB_MODE if the user set it; 'online' only when credentials exist; else 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _clean(v: Any) -> Any:
    """JSON-friendly scalars: tensors to floats, NaN/inf to null (JSON has no NaN)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _repository_code(path: str, root: str) -> bool:
    """The files --wandb_log_code saves: the repository's Python files, not those of its virtual environment,
    runs or caches."""
    first = Path(os.path.relpath(path, root)).parts[0]
    return path.endswith(".py") and not first.startswith(".") and first not in ("out", "wandb")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, config: dict[str, Any], *, enabled: bool, total_steps: int | None,
                 initial_step: int, use_wandb: bool, project: str, run_name: str, log_freq: int = 1,
                 log_model: bool = False, log_code: bool = False) -> None:
        """`log_freq`: every how many training records one goes to wandb; `log_model`: exported models become
        wandb artifacts (exported()); `log_code`: the run keeps the repository's Python files."""
        self.enabled = enabled
        self.bar = None
        self.wandb = None
        self.log_freq, self.log_model, self.n_train_records = log_freq, log_model, 0
        self.held: dict[str, Any] | None = None  # the last training record log_freq kept from wandb
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if use_wandb:
            import wandb  # imported only when asked for: it is slow to import

            self.wandb = wandb.init(project=project, name=run_name or None, config=config, dir=str(out),
                                    mode=wandb_mode(), resume="allow")
            if log_code:
                self.wandb.log_code(str(REPO), include_fn=_repository_code)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=config.get("mode", "train"),
                        unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # typically a full disk
            raise TrainingError(f"could not write {self.file.name}: {e.strerror}; free disk space, then --resume "
                                f"(from the last checkpoint)") from None
        if self.wandb is None:
            return
        if "val_loss" not in record:  # a training record: every log_freq-th goes to wandb, and the run's last
            self.n_train_records += 1
            self.held = record if (self.n_train_records - 1) % self.log_freq else None
            if self.held is not None:
                return
        self._send(record)

    def _send(self, record: dict[str, Any]) -> None:
        self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def watch(self, model: Any, log: str, log_freq: int) -> None:
        """wandb.watch: histograms of the model's gradients and/or parameters every `log_freq` backward passes
        (log "None": the model graph only)."""
        if self.wandb is not None:
            self.wandb.watch(model, log=None if log == "None" else log, log_freq=log_freq)

    def exported(self, folder: Path, name: str, step: int) -> None:
        """With log_model: the exported folder (best/ or final/) as a version of the run's model artifact,
        tagged with its name and step."""
        if self.wandb is None or not self.log_model:
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model", metadata={"folder": name, "step": step})
        artifact.add_dir(str(folder))
        self.wandb.log_artifact(artifact, aliases=[name, f"step-{step}"])

    def set_total(self, total_steps: int) -> None:
        """The progress bar's length, once known (a time budget decides it on the way)."""
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def progress(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def postfix(self, values: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def message(self, text: str) -> None:
        """A line above the progress bar (tqdm.write keeps the bar intact)."""
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            if self.held is not None:  # the summary shows the run's last training record, not an earlier one
                self._send(self.held)
            self.wandb.finish()
