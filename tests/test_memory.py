"""trainer/memory.py: malloc keeps what a training step frees, so the next step faults in no fresh pages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from trainer import memory

# What a CPU training step does to host memory: many blocks of a few MB made and written, then all freed; the
# minor page faults of the steps after the first (each a fresh page the kernel zero-fills), per step.
CHURN = """
import resource, sys, torch
from trainer.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [torch.ones(2 << 20) for _ in range(40)]  # 40 x 8 MB
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_step(how: str) -> int:
    proc = subprocess.run([sys.executable, "-c", CHURN, how], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not memory.is_glibc(), reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    pages = 40 * (8 << 20) // 4096
    assert default > pages // 4  # glibc's defaults hand most of a step's 320 MB back to the kernel
    assert kept < default // 4


def test_other_c_libraries_are_left_alone(monkeypatch):
    def no_glibc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name!r}")  # what os.confstr says outside glibc

    monkeypatch.setattr(memory.os, "confstr", no_glibc)
    assert memory.keep_freed_memory() is False
