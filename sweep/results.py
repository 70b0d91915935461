"""A sweep's results: the trials ranked by their best metric, printed as a table and written to
results.csv, with results.png plotting the metric against each swept parameter."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sweep.config import swept_parameters
from sweep.trials import format_value, load_trials


def rank_trials(config: dict[str, Any], sweep_dir: Path) -> list[dict[str, Any]]:
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
    rows = rank_trials(config, sweep_dir)
    metric = config["metric"]["name"]
    columns = ["rank", "trial", "state", metric, "step", *swept_parameters(config), "note"]
    cells = [[format_value(r[c]) if r[c] is not None else "-" for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print()
    for line in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    print(f"\ntable: {sweep_dir / 'results.csv'}")
    if plot_results(rows, swept_parameters(config), metric, sweep_dir / "results.png"):
        print(f"plot:  {sweep_dir / 'results.png'}")
    if rows and rows[0]["rank"] == 1:
        print(f"best:  {sweep_dir / 'trials' / rows[0]['trial']} ({metric} {format_value(rows[0][metric])})")
    return rows


def plot_results(rows: list[dict[str, Any]], swept: list[str], metric: str, path: Path) -> bool:
    """The best metric of each ranked trial against each swept parameter, one panel per parameter;
    False (and no file) when there is nothing to plot."""
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
