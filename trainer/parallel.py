"""How the model is wrapped for a run, in torchtitan's order: activation checkpointing, then torch.compile
per block, then data parallelism: DDP (every rank holds the whole model) or FSDP2 (`--fsdp`: parameters,
gradients and optimizer states sharded over the ranks, each block gathered just in time).

The loop sees only the module `parallelize` returns and the helpers below, so one code path serves one
process, DDP and FSDP, on one node or many (torchrun sets the ranks either way).

FSDP2 (torch.distributed.fsdp.fully_shard) shards each Block, then the root (embeddings, final norm,
lm_head); under a MixedPrecisionPolicy the gathered parameters are cast to --dtype for compute, while
the sharded fp32 master weights, the optimizer and the gradient reduce-scatter (reduce_dtype) stay in
fp32. The same code runs with NCCL on GPUs and with gloo on CPU (what the tests use; no GPU here).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from model.cpu_linear import CPULinear
from trainer.distributed import DistEnv


def parallelize(model: nn.Module, env: DistEnv, *, fsdp: bool, dtype: torch.dtype, grad_checkpointing: bool,
                compile: bool) -> nn.Module:
    """Wrap `model` (a Transformer, maybe with LoRA layers) in place for training; returns the module to call.

    DDP: a wrapper around the model, moved to the device. FSDP: the model itself, now sharded (its parameters
    are DTensors). Parameter names never change, so checkpoints, exports and LoRA adapters keep theirs.
    """
    if grad_checkpointing:
        model.gradient_checkpointing = True  # Transformer.forward recomputes each block in backward
    if compile:
        compile_blocks(model, env.device)
    if fsdp:
        return shard(model, env, dtype)
    model.to(env.device)
    if env.is_distributed:
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model


def can_compile(device: torch.device) -> bool:
    """Inductor needs a C++ compiler for CPU kernels (and Triton, shipped with CUDA builds of torch, for GPUs)."""
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return device.type == "cuda"


# What --compile auto expects of compiling the blocks (bench/compile_cost.py on the default pretraining recipe, a
# 2-core CPU; bench/RESULTS.md): the one-off cost of a first compilation, about the highest recorded; the cost when
# Inductor's on-disk cache already holds these blocks' kernels from an earlier run on this machine (tracing the block
# again, no C++ compiler), about twice the highest recorded; and the share of each later step it
# saves, a little under the recorded runs' median. Unmeasured on GPUs, which compile in similar time and usually
# gain more: there the rule errs towards eager.
COMPILE_COST_S = 90.0
COMPILE_COST_CACHED_S = 15.0
COMPILE_SAVING = 0.10
AUTO_COMPILE_AFTER = 10  # eager steps timed before --compile auto decides (the first, with its warm-up, not counted)


def compile_pays(seconds_left: float, cached: bool = False) -> bool:
    """Whether compiling now repays its one-off cost within the run: `seconds_left` of eager steps to come; `cached`:
    blocks like these were compiled on this machine before (compiled_before)."""
    return seconds_left * COMPILE_SAVING > (COMPILE_COST_CACHED_S if cached else COMPILE_COST_S)


def blocks_signature(model: nn.Module, env: DistEnv, dtype: torch.dtype, rows: int, grad_checkpointing: bool,
                     fsdp: bool) -> str:
    """A digest of what the graphs of compiled blocks depend on: torch's version, the device, the model's config
    and its blocks' modules (LoRA's included), the rows of a micro-batch, the autocast dtype, activation
    checkpointing, FSDP and the number of processes. Runs that share it reuse each other's compiled kernels."""
    what = {"torch": torch.__version__, "device": env.device.type, "processes": env.world_size,
            "model": asdict(model.config), "block": repr(model.model.layers[0]), "rows": rows, "dtype": str(dtype),
            "grad_checkpointing": grad_checkpointing, "fsdp": fsdp}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _marker(signature: str) -> Path:
    """Kept in Inductor's cache folder (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), beside the
    kernels it vouches for, so it goes when they go."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "zero2llm" / f"blocks-{signature}"


def compiled_before(signature: str) -> bool:
    """Whether blocks of this signature were compiled here before (remember_compiled)."""
    try:
        return _marker(signature).exists()
    except OSError:  # no cache folder to be had (a read-only /tmp): then nothing was compiled into one either
        return False


def remember_compiled(signature: str) -> None:
    """Note that blocks of this signature ran compiled: a later --compile auto run of the same shape may count on
    Inductor's cache. A folder that cannot be written only costs that knowledge."""
    with contextlib.suppress(OSError):
        marker = _marker(signature)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def compile_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile each decoder block in place (torchtitan's way); eager, with a warning, where this device
    cannot compile.

    Inductor fuses the memory-bound elementwise work of a block (RMSNorm, RoPE, SwiGLU's silu * up, residual
    adds, autocast's bf16 casts) into a few generated kernels, forward and backward, and leaves matmuls and
    attention to oneDNN / cuBLAS / the flash kernels (what that saves, and what the first compilation costs:
    bench/compile_cost.py, bench/RESULTS.md). All blocks run the same code, so one graph is compiled (slow the
    first time, quick once Inductor's on-disk cache has it) and reused by every layer. Compiling in
    place keeps parameter names, so checkpoints, DDP/FSDP, LoRA and activation checkpointing see the same modules.
    torch.compile traces a block at its next call, so compiling mid-run (--compile auto) is the same as before the
    DDP/FSDP wrapping.
    """
    if not can_compile(device):
        warnings.warn(f"torch.compile needs a C++ compiler on {device.type} (g++ or clang++); training runs eager")
        return model
    for block in model.model.layers:
        block.compile()
    return model


def shard(model: nn.Module, env: DistEnv, dtype: torch.dtype) -> nn.Module:
    """FSDP2 in place: each block, then the root; computing in `dtype`, reducing gradients in fp32. Also for a
    frozen model every rank runs in step (DPO's reference)."""
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # moves each shard to the mesh's device
    # The root returns the logits as lm_head's [B*T, V] product viewed as [B, T, V], and FSDP2 warns of an in-place
    # op on such a view (it would skip the backward hook). Nothing here writes into logits in place (the objectives
    # and samplers read them, tests/test_parallel.py checks the gradients against one process): the warning, once
    # per process and run, is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    for module in model.modules():
        if isinstance(module, CPULinear):  # collectives rewrite its gathered weights: a packed copy could go stale
            module.pack = False
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without the cross-rank reduction (all micro-batches of a step but the last):
    DDP's no_sync(), FSDP2's set_requires_gradient_sync(False)."""
    if isinstance(model, DDP):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping; the norm as a plain tensor, also when the gradients are sharded DTensors
    (then it is already reduced over the ranks, so every rank sees the same value)."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def meta_copy(model: nn.Module) -> nn.Module:
    """The model's structure with storage-less (meta) parameters: what consolidated_model fills in. Taken before
    sharding, on the rank that exports; tied parameters stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def consolidated_model(model: nn.Module, template: nn.Module | None) -> nn.Module | None:
    """The full, unsharded model on CPU, for a Hugging Face export: `model` itself when it is not sharded;
    for FSDP, the gathered parameters put into a copy of `template` (meta_copy) on rank 0, None elsewhere.
    Every rank must call it (the gather is a collective)."""
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if template is None:
        return None
    full = copy.deepcopy(template)
    full.load_state_dict(state, assign=True)
    full.tie_weights()
    return full
