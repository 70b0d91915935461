"""torch.compile for training: every decoder block compiled on its own, as torchtitan does.

What it buys: Inductor fuses the memory-bound elementwise work of a block (RMSNorm, RoPE, SwiGLU's silu * up,
residual adds, the bf16 casts of autocast) into a few generated kernels, forward and backward, and leaves the
matmuls and attention to oneDNN / cuBLAS / the flash kernels. On a 2-core AMX CPU in bf16 that is ~25% off a
config-S step, and ~15% off the small preset's (bench/RESULTS.md). All blocks run the same code, so one graph
is compiled (~15-40 s on 2 CPU cores the first time, seconds once Inductor's on-disk cache has it) and reused
by every layer. Compiling blocks in place (nn.Module.compile) keeps parameter names, so checkpoints, DDP,
LoRA and activation checkpointing per block see the same modules as in eager mode.
"""
from __future__ import annotations

import shutil
import warnings

import torch
import torch.nn as nn


def can_compile(device: torch.device) -> bool:
    """Inductor needs a C++ compiler for CPU kernels (and Triton, shipped with CUDA builds of torch, for GPUs)."""
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return device.type == "cuda"


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Compile each block of model.model.layers in place and return the model; eager (with a warning) when this
    device cannot compile."""
    if not can_compile(device):
        warnings.warn(f"torch.compile needs a C++ compiler on {device.type} (g++ or clang++); training runs eager")
        return model
    for block in model.model.layers:
        block.compile()
    return model
