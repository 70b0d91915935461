"""What every benchmark in bench/ shares: the model configs, the machine line of a record, timing helpers.

Machines here are noisy (shared cores), so every script runs the baseline and ours in the same invocation,
alternating them round after round, and reports the RATIO of the two measured in the same round (median
over rounds) next to the absolute figures. A record states the machine, torch version, date, threads and
the load average before and after, so a reader can tell a quiet run from a crowded one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import Transformer  # noqa: E402
from model.config import ModelConfig, config_from_preset  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
_MOE = config_from_preset("moe", vocab_size=6400)
# Config S, the shape every benchmark compares at: dim 512, 8 layers, 8 heads, 2 KV heads, SwiGLU 1408, vocab 6400, seq 512.
CONFIGS: dict[str, dict] = {
    "S": dict(preset="26m", vocab_size=6400, max_seq_len=512),
    "small": dict(preset="small", vocab_size=6400),  # the default pretraining preset (train.py --mode pretrain)
    "104m": dict(preset="104m", vocab_size=6400, max_seq_len=1024),  # the ~124M-class GPU check, at seq 1024
    "moe": dict(preset="moe", vocab_size=6400),
    # The dense model with the MoE preset's ACTIVE parameters: one SwiGLU as wide as its top-k experts together.
    "moe_dense": dict(preset="moe", vocab_size=6400, use_moe=False,
                      hidden_dim=_MOE.num_experts_per_tok * _MOE.moe_hidden_dim),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the docstring laid out as written and each flag's default (none for switches or empty values)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if "%(default)" not in help_ and not (default is None or default is False or default == ""
                                                or default is argparse.SUPPRESS):
            help_ += " (default: %(default)s)"
        return help_


def model_config(name: str, **overrides) -> ModelConfig:
    spec = {**CONFIGS[name], **overrides}
    return config_from_preset(spec.pop("preset"), **spec)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    """Where and when: device, threads, torch, date, and the 1-minute load average now."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0]
    return (f"{platform.node() or 'machine'} ({where}), torch {torch.__version__}, "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, load {load:.1f}")


def load_after() -> str:
    """The 1-minute load average at the end of a run, for the record's header."""
    return f"load after: {os.getloadavg()[0]:.1f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak of this process: max allocated on CUDA, max RSS on CPU (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronised."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def ratio_rounds(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of baseline_time / impl_time measured in the same round (> 1 = faster than baseline)."""
    return {name: statistics.median(b / t for b, t in zip(times[baseline], ts)) for name, ts in times.items()}


def save_weights(config: ModelConfig, folder: Path, seed: int = 0) -> None:
    """A randomly initialised model folder that both our Transformer and transformers load."""
    torch.manual_seed(seed)
    Transformer(config).save_pretrained(folder)


def train_py(out_dir: Path, *flags: str) -> tuple[float, list[dict]]:
    """Run `python train.py --out_dir out_dir *flags` as a user would; (wall seconds, its metrics.jsonl records)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--out_dir", str(out_dir), *flags]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def seconds_per_step(logs: list[dict]) -> float:
    """The loop's steady step time from a run's metrics.jsonl records: tokens per step over the median logged
    tokens/s of the windows after the first (which holds start-up and compilation)."""
    logs = [r for r in logs if "tokens_per_sec" in r]
    tokens_per_step = logs[0]["tokens_seen"] / logs[0]["step"]
    return tokens_per_step / statistics.median(r["tokens_per_sec"] for r in logs[1:])


def report(lines: list[str], record: bool) -> None:
    """Print a result block; with record, also append it to bench/RESULTS.md."""
    print("\n".join(lines))
    if record:
        with open(RESULTS, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
