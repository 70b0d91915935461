"""Process-group setup and the few collectives the loop needs.

`torchrun` sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python train.py` is a world of one.
Every collective here is called by every rank in the same order: a rank that skips one (to save or
evaluate alone) leaves the others waiting in it forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when present, else CPU; an explicit name must be a device this machine has (UsageError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available (no GPU, or a CPU-only torch {torch.__version__}); "
                         f"use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16).

    On those, oneDNN runs bf16 matmuls several times faster than fp32 (bench/RESULTS.md); without them bf16 is
    emulated and many times slower than fp32. torch.cpu's probes (torch >= 2.3) answer for x86; /proc/cpuinfo's
    flags answer elsewhere (Linux).
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None and probe() for probe in probes):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": Arm's Features line


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bfloat16 where the hardware runs it natively (GPUs that support it, CPUs with
    cpu_has_native_bf16()), else float32."""
    if name == "auto":
        if device.type == "cuda":
            bf16_ok = torch.cuda.is_bf16_supported()
        else:
            bf16_ok = device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def init_distributed(device: str = "auto", process_group: bool = False) -> DistEnv:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU; on several nodes too:
    torchrun's rendezvous sets the same variables). process_group: also make a group for a world of one
    (FSDP needs one even then: `python train.py --fsdp`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        # One GPU per process: LOCAL_RANK picks it unless the user named one explicitly.
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if (world_size > 1 or process_group) and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun
            dist.init_process_group(backend=backend)
        else:  # a plain `python train.py`: an in-memory store, no port to pick
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(rank=rank, world_size=world_size, device=dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op for a world of one) and return it."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max of a tensor over ranks in place (no-op for a world of one) and return it."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def from_main(value: object) -> object:
    """Rank 0's `value` on every rank (the others' own are ignored); also a barrier. A world of one: `value`."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
