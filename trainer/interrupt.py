"""Ctrl-C and preemption (SIGINT / SIGTERM): finish the current step, checkpoint, exit cleanly.

The handler only records the signal; the loop polls it between optimizer steps, so a checkpoint is
never written from inside a half-done step. A second Ctrl-C stops at once (KeyboardInterrupt).
Under torchrun every rank polls together: if any rank was signalled, all stop at the same step.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from trainer.distributed import all_reduce_max


class StopOnSignal:
    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.signum = signum

    def poll(self, device: torch.device) -> int:
        """The signal number any rank received (0 = none). Every rank must call this at the same step."""
        return int(all_reduce_max(torch.tensor(self.signum, device=device)))
