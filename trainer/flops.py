"""Peak FLOP/s of the training device, the denominator of MFU (model FLOPs utilisation).

MFU = tokens/s x model FLOPs per token (Transformer.estimate_flops_per_token: 6 x active non-embedding
parameters incl. the lm_head matmul + 6 x layers x heads x head_dim x seq_len for causal attention: half of
PaLM appendix B's full-attention count)
/ peak FLOP/s. The peak is, in this order: --peak_tflops when given; the datasheet dense figure of a known GPU
for the training dtype; else a large matmul measured once per process on this device (what a CPU's cores
actually sustain, e.g. ~1.3 TFLOP/s bf16 per AMX core against ~0.2 TFLOP/s fp32).
"""
from __future__ import annotations

import functools
import time

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets (SXM parts), by dtype.
GPU_PEAK_TFLOPS: dict[str, dict[torch.dtype, float]] = {
    "H200": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0},
    "H100": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0},
    "A100": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5},
    "L4": {torch.bfloat16: 121.0, torch.float16: 121.0, torch.float32: 30.3},
    "A10": {torch.bfloat16: 125.0, torch.float16: 125.0, torch.float32: 31.2},
}


def gpu_datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """FLOP/s from GPU_PEAK_TFLOPS when the CUDA device's name contains a known model, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, peaks in GPU_PEAK_TFLOPS.items():
        if model in name and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n @ n x n matmul in `dtype` on `device` (best of `reps` after one warm-up):
    what the matrix units sustain on a large, well-shaped problem."""
    g = torch.Generator(device).manual_seed(0)  # a private RNG: the training run's seeded draws stay untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = float("inf")
    for i in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i:  # the first call pays for kernel selection and page faults
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


@functools.cache
def _measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    return measure_matmul_flops(device, dtype)


def peak_flops(device: torch.device, dtype: torch.dtype, given_tflops: float = 0.0) -> float:
    """The MFU denominator in FLOP/s: given_tflops if > 0, a GPU datasheet figure, or a measured matmul
    (cached per process, ~0.1-0.5 s the first time on a CPU)."""
    if given_tflops > 0:
        return given_tflops * 1e12
    return gpu_datasheet_peak(device, dtype) or _measured_peak(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
