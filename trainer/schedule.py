"""Learning-rate schedule: linear warmup, then cosine decay to a floor (as in nanoGPT / Chinchilla).

The learning rate is a function of the step and the flags, set on the optimizer before every step: nothing to
checkpoint, and a resume with another --learning_rate or schedule length takes it up from the next step.
"""
from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_iters: int, decay_iters: int, min_lr_ratio: float) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based).

    Warmup ramps from 1/warmup to 1 so the very first step already learns; after `decay_iters`
    the LR stays at the floor `min_lr_ratio * peak`, so training past the schedule is safe.
    """
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr_ratio
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine
