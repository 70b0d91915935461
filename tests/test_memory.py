"""trainer/memory.py: malloc keeps what a training step frees, so the next step faults in no fresh pages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from trainer import memory

# What a CPU training step does to host memory: blocks of 1-23 MB made and written, then freed last to first, as a
# backward frees the activations. Printed: the minor page faults of the steps after the first (each a fresh page the
# kernel zero-fills), per step.
SIZES_MB = [1 + 7 * i % 23 for i in range(40)]  # 486 MB a step
CHURN = f"""
import resource, sys, torch
from trainer.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [torch.ones(mb << 18) for mb in {SIZES_MB}]  # float32: 2 ** 18 of them a MB
    while blocks:
        blocks.pop()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


# A block above 32 MB (the most that glibc's mmap threshold can be raised to), such as a step's logits or their
# gradient: printed, whether it lies in the heap, where a freed block is kept for reuse, or in a mapping of its own.
BIG_BLOCK = """
import sys, torch
from trainer.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
block = torch.ones(64 << 18)  # 64 MB
address = block.data_ptr()
for line in open("/proc/self/maps"):  # start-end perms offset device inode [name]
    fields = line.split()
    start, end = (int(a, 16) for a in fields[0].split("-"))
    if start <= address < end:
        print(fields[-1] == "[heap]")
"""


def run(code: str, how: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, how], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[-1]


def faults_per_step(how: str) -> int:
    return int(run(CHURN, how))


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: memory then faults in 2 MB at a time, and few faults are left to cut."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not memory.is_glibc() or huge_pages_always(), reason="glibc's malloc, 4 KB pages")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    pages = sum(SIZES_MB) * 256
    assert default > pages // 8  # glibc's defaults hand much of each step's memory back to the kernel
    assert kept < default // 10


@pytest.mark.skipif(not memory.is_glibc() or not Path("/proc/self/maps").exists(), reason="glibc's malloc, Linux")
def test_blocks_above_glibcs_mmap_threshold_ceiling_come_from_the_heap():
    assert run(BIG_BLOCK, "default") == "False"  # by default a mapping of its own, unmapped the moment it is freed
    assert run(BIG_BLOCK, "keep") == "True"


def test_other_c_libraries_are_left_alone(monkeypatch):
    def no_glibc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name!r}")  # what os.confstr says outside glibc

    monkeypatch.setattr(memory.os, "confstr", no_glibc)
    assert memory.keep_freed_memory() is False
