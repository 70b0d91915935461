"""Learning-rate schedules, and how a time budget decides a run's length.

    cosine  linear warmup, then a cosine decay to min_lr_ratio x peak over the run (nanoGPT, Chinchilla)
    wsd     warmup-stable-decay: linear warmup, the peak held, then a linear decay to min_lr_ratio x peak over the
            last decay_fraction of the run (modded-nanoGPT, nanochat). Its decay need not be placed up front: with a
            time budget the run's length is unknown, and the decay starts when the remaining time says so.

The learning rate is a function of the step and of the run's length, set on the optimizer before every step. The
length a time budget decided is part of the train state, so a resume continues that very schedule; a resume with
another --learning_rate or schedule flag takes it up from the next step.
"""
from __future__ import annotations

import math
import re

SCHEDULES = ("auto", "cosine", "wsd")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|hr)?\s*$")
_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as "90s", "10m", "1.5h" or "600" (seconds); ValueError if it is none."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; write it as 90s, 10m or 1.5h")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def lr_multiplier(step: int, *, schedule: str, warmup_iters: int, total_steps: int | None, min_lr_ratio: float,
                  decay_iters: int = 0, decay_fraction: float = 0.2, decay_start: int | None = None) -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (0-based).

    Warmup ramps from 1/warmup to 1, so the very first step already learns. cosine decays over `decay_iters`
    (0: the run's total steps), then stays at the floor, so training past the schedule is safe. wsd holds the peak
    until `decay_start` (default: the last decay_fraction of `total_steps`; a time budget sets it to the step at
    which it decided the total), then decays linearly to the floor at `total_steps`; while the total is unknown
    (None), it holds the peak.
    """
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if schedule == "wsd":
        if total_steps is None:
            return 1.0
        if decay_start is None:
            decay_start = wsd_decay_start(total_steps, warmup_iters, decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    end = decay_iters or total_steps
    if step >= end:
        return min_lr_ratio
    progress = (step - warmup_iters) / max(1, end - warmup_iters)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_decay_start(total_steps: int, warmup_iters: int, decay_fraction: float) -> int:
    """The step at which wsd starts to decay in a run of `total_steps` that no time budget planned."""
    return max(warmup_iters, total_steps - max(1, round(decay_fraction * total_steps)))


def steps_in_budget(step: int, elapsed: float, budget: float, decay_fraction: float, seconds_per_step: float,
                    reserve: float) -> int | None:
    """The run's total steps, decided once the budget's stable part is spent, else None (go on at the peak).

    At that moment the steps left are what the remaining time holds at the recent rate, less `reserve` (what the
    final evaluation and export will take); wsd then decays over those steps, so the run ends on time with its
    schedule complete.
    """
    if elapsed < (1.0 - decay_fraction) * budget:
        return None
    left = (budget - elapsed - reserve) / max(seconds_per_step, 1e-9)
    return step + max(1, int(left))


def budget_plan(step: int, budget_total: int, max_steps: int | None, warmup_iters: int,
                decay_fraction: float) -> tuple[int, int | None]:
    """(the run's total steps, wsd's decay start) once a time budget found at `step` that its time holds
    `budget_total` steps. The decay starts at `step`, unless --max_steps's schedule is already the run's: where its
    steps end the run first, that schedule stands (decay start None: its last decay_fraction); where the budget ends
    the run first but --max_steps's decay has begun, that decay goes on from where it began, down to the floor at
    the budget's end. Either way the learning rate never climbs back during a decay."""
    if max_steps is None:
        return budget_total, step
    if budget_total >= max_steps:
        return max_steps, None
    return budget_total, min(step, wsd_decay_start(max_steps, warmup_iters, decay_fraction))
