"""Training curves as a picture: out_dir/curves.png, drawn from out_dir/metrics.jsonl.

The loop writes it at the end of every run; scripts/plot_metrics.py draws it on demand and overlays several
runs on one figure. A panel appears when a run logged its metric: loss against steps and against tokens
seen, the learning rate (and Muon's, when it trains the hidden matrices), DPO's reward margin and accuracy,
GRPO's reward, KL and completion length.
Training values are drawn faint as logged, with a smoothed line over them; validation values are points
joined by a dashed line. matplotlib's object API with the Agg canvas: no window, and no change to the
backend of a program that imports this.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = "metrics.jsonl"
CURVES = "curves.png"


@dataclass(frozen=True)
class Panel:
    title: str
    train: str | None  # the training metric's key in metrics.jsonl
    val: str | None  # the validation metric's key
    ylabel: str
    x: str = "step"  # or "tokens_seen"
    smooth: bool = True  # noisy per-step values get a smoothed line over the raw ones


PANELS = (
    Panel("loss", "loss", "val_loss", "loss"),
    Panel("loss against tokens seen", "loss", "val_loss", "loss", x="tokens_seen"),
    Panel("learning rate", "lr", None, "learning rate", smooth=False),
    Panel("Muon learning rate (hidden matrices)", "lr_muon", None, "learning rate", smooth=False),
    Panel("DPO reward margin", "rewards/margin", "val_rewards/margin", "chosen - rejected reward"),
    Panel("DPO accuracy", "rewards/accuracy", "val_rewards/accuracy", "chosen reward > rejected"),
    Panel("GRPO reward", "reward", "val_reward", "mean reward"),
    Panel("GRPO KL to the reference", "kl", None, "KL"),
    Panel("GRPO completion length", "completion_length", "val_completion_length", "tokens"),
)
XLABELS = {"step": "step", "tokens_seen": "tokens seen"}


def read_history(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} from a run's metrics.jsonl. A later record of a step wins (a resumed run logs
    the steps after its checkpoint again); null values (NaN or inf when logged) are left out."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS} (is it a run's out_dir?)")
    history: dict[str, dict[int, float]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {line_no}: not JSON ({e.msg})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                history.setdefault(key, {})[step] = float(value)
    return history


def series(history: dict[str, dict[int, float]], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """(x values, values) of one metric in step order; x is the step, or the tokens seen by then (validation
    records have no tokens_seen of their own: it is interpolated from the training records')."""
    points = sorted(history.get(key, {}).items())
    steps = np.array([s for s, _ in points], dtype=float)
    values = np.array([v for _, v in points], dtype=float)
    if x == "step" or not len(points):
        return steps, values
    seen = sorted(history.get("tokens_seen", {}).items())
    if not seen:
        return np.array([]), np.array([])
    return np.interp(steps, [s for s, _ in seen], [t for _, t in seen]), values


def smoothed(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing) spanning a tenth of the points."""
    alpha = 2 / (max(1.0, len(values) / 10) + 1)
    out, avg, weight = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out[i] = avg / weight
    return out


def plot_runs(run_dirs: list[Path], labels: list[str] | None = None) -> Figure:
    """One figure of the runs' curves (a matplotlib Figure on an Agg canvas), runs told apart by colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    labels = labels or [str(d) for d in run_dirs]
    runs = [(label, read_history(d)) for label, d in zip(labels, run_dirs)]
    panels = [p for p in PANELS if any(k in h for _, h in runs for k in (p.train, p.val) if k)]
    if not panels:
        raise ValueError(f"no metrics to plot in {', '.join(str(d / METRICS) for d in map(Path, run_dirs))}")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, panels):
        for colour, (label, history) in zip(colours, runs):
            name = f"{label}: " if len(runs) > 1 else ""
            if panel.train:
                xs, ys = series(history, panel.train, panel.x)
                if panel.smooth and len(ys):
                    ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=1, label=f"_{name}train (as logged)")
                    ax.plot(xs, smoothed(ys), color=colour, linewidth=1.8, label=f"{name}train (smoothed)")
                elif len(ys):  # one line per run: the legend names runs only when there are several
                    ax.plot(xs, ys, color=colour, linewidth=1.5, label=label if len(runs) > 1 else "_train")
            if panel.val:
                xs, ys = series(history, panel.val, panel.x)
                if len(ys):
                    ax.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=4, linewidth=1.2,
                            label=f"{name}validation")
        ax.set_title(panel.title)
        ax.set_xlabel(XLABELS[panel.x])
        if panel.x == "tokens_seen":
            ax.xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def write_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Draw run_dir's curves into `out` (default run_dir/curves.png); returns the path written."""
    out = Path(out) if out is not None else Path(run_dir) / CURVES
    plot_runs([Path(run_dir)], labels=[Path(run_dir).name]).savefig(out, dpi=100)
    return out
