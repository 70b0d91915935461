"""Training checkpoints: atomic, rotating, resumable.

Layout of one checkpoint (out_dir/checkpoints/step_000500/):
    config.json, model.safetensors   the model, in the same HF format as final/
    optimizer.pt                     the optimizer(s): AdamW's state dict, or every part's with --optimizer muon
      or sharded/                    --fsdp: model and optimizer as torch.distributed.checkpoint (DCP) shards,
                                     every rank writing its own; loads into any number of processes, with
                                     or without --fsdp (and a model.safetensors checkpoint loads under --fsdp)
    scaler.pt                        fp16's loss scale (the learning rate is a function of the step: no state)
    rng_state_<rank>.pt              per-rank RNG (dropout masks differ per rank)
    rollouts_<rank>.pt               only between two updates on one batch (GRPO's --num_iterations > 1):
                                     each rank's prepared micro-batches (save_checkpoint's rank_files)
    trainer_state.json               step, data position, best val loss, whether this step's evaluation ran,
                                     and the run's record for resume's checks (trainer/resume.py) ... written LAST

Everything is written into `step_000500.tmp/` and renamed into place only when complete, so a
kill at any moment leaves either the previous checkpoints or a `.tmp` folder that resume ignores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from model import Transformer, hf
from model.config import TRAINING_FIELDS, ModelConfig
from model.lora import apply_lora, merge_lora
from trainer.distributed import DistEnv, barrier
from trainer.optim import Optimizers
from trainer.parallel import is_sharded
from trainer.rundir import replace_folder

STATE_FILE = "trainer_state.json"
SHARDED = "sharded"  # the DCP folder of an --fsdp checkpoint
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message saying which file and why."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with a trainer_state.json), oldest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def step_of(path: str | Path) -> int:
    """The step a checkpoint folder holds: from its name (step_000500), else from its trainer_state.json."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else int(read_state(path).get("step", 0))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def resume_path(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint --resume names: None (not resuming), out_dir's newest for 'auto', or the folder given."""
    if not resume:
        return None
    if resume == "auto":
        path = latest_checkpoint(out_dir)
        if path is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {checkpoint_dir(out_dir)}; start without "
                                  f"--resume, or pass a checkpoint folder")
        return path
    if not Path(resume).is_dir():
        raise CheckpointError(f"--resume {hf.file_not_folder(resume) or f'{resume}: no such checkpoint folder'} "
                              f"(--resume alone, or --resume auto, continues from --out_dir's newest checkpoint)")
    return Path(resume)


def _fsync_write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json."""
    state_file = Path(path) / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file}: cannot be read ({e}); not a complete checkpoint.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: not a JSON object; not a checkpoint this train.py wrote.")
    return state


def update_state(path: str | Path, trainer_state: dict[str, Any]) -> None:
    """Rewrite a complete checkpoint's trainer_state.json in place, atomically (the step's evaluation has run)."""
    tmp = Path(path) / (STATE_FILE + ".tmp")
    _fsync_write_json(tmp, trainer_state)
    os.replace(tmp, Path(path) / STATE_FILE)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(out_dir: str | Path, step: int, env: DistEnv, *, model: torch.nn.Module,
                    optimizer: Optimizers, scaler: Any, trainer_state: dict[str, Any],
                    rank_files: dict[str, Any] | None = None, tokenizer: Any = None) -> Path:
    """Write a complete checkpoint atomically. Called by every rank (each saves its RNG, and each object of
    `rank_files` as <name>_<rank>.pt: state that differs per rank, such as GRPO's rollouts mid-group). Unsharded,
    it is also a Hugging Face model folder with its `tokenizer`, which eval_model.py and transformers load as is;
    a LoRA run's holds the adapter's weights beside the base's, which only read_model reads as the tuned model."""
    root = checkpoint_dir(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        torch.save(_rng_state(), tmp / f"rng_state_{env.rank}.pt")
        for name, obj in (rank_files or {}).items():
            torch.save(obj, tmp / f"{name}_{env.rank}.pt")
        if is_sharded(model):  # a collective: every rank writes its shards of model and optimizer
            model_state, optimizer_state = get_state_dict(model, optimizer.parts)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED)
        barrier()
        if env.is_main:
            if is_sharded(model):  # what resume checks the architecture against, and read_model builds
                (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
            else:
                model.save_pretrained(tmp)
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
            _fsync_write_json(tmp / STATE_FILE, trainer_state)
            replace_folder(tmp, final)  # the same step saved twice (e.g. a resumed run): newest wins
    except (OSError, RuntimeError) as e:  # typically a full disk (torch.save's zip writer raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(out_dir)
        kept = f"the previous checkpoint {prev} is intact" if prev else "there is no earlier checkpoint"
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        free = shutil.disk_usage(next(p for p in (root, *root.parents) if p.exists())).free >> 20
        raise CheckpointError(f"could not write checkpoint {final}: {reason} ({free} MiB free there); {kept}. "
                              f"Free disk space (or lower --keep_checkpoint_max), then --resume.") from None
    barrier()
    return final


def rotate_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (all when keep <= 0); drop stale .tmp/.old folders.

    A checkpoint is renamed to .tmp before it is deleted, so a kill in the middle never leaves a half-deleted
    folder that looks like a checkpoint."""
    root = checkpoint_dir(out_dir)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            os.rename(old, old.with_name(old.name + ".tmp"))
    for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
        shutil.rmtree(stale, ignore_errors=True)


# What to do about a checkpoint that cannot be read (its folder fills the {}).
_ANOTHER = "Resume from another checkpoint (--resume <its folder>), or delete {} and --resume takes the newest left."


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete. {_ANOTHER.format(path.parent)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt file: say which, not a pickle traceback
        reason = (str(e).splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {reason}); the checkpoint is damaged. "
                              f"{_ANOTHER.format(path.parent)}") from None


def read_model(path: Path) -> torch.nn.Module:
    """The model of checkpoint `path`, read whole into this one process, as eval_model reads a checkpoint. Most are
    Hugging Face folders; two kinds are not, and are read here: an --fsdp run's (its sharded/ weights) and a LoRA
    run's (the frozen base and the adapter in one model.safetensors, for resume), whose adapter is merged in.
    transformers and PEFT read those runs' final/ and best/ instead."""
    config = read_state(path).get("config", {})
    lora = config.get("mode") == "lora"
    if not lora and not (path / SHARDED).is_dir():
        return Transformer.from_pretrained(path)
    model = Transformer(saved_config(path))
    if lora:  # the run's own wrapping, so that the saved names and shapes are the model's
        apply_lora(model, config["lora_rank"], config["lora_alpha"], targets=config["lora_target_modules"])
    if (path / SHARDED).is_dir():
        state = get_model_state_dict(model)
        try:
            with warnings.catch_warnings():  # DCP warns that it reads every shard in one process: the intent here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"model": state}, checkpoint_id=path / SHARDED, no_dist=True)
        except Exception as e:  # a missing or truncated shard
            raise CheckpointError(f"{path / SHARDED}: cannot be read as a model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); the run's final/ and best/ are whole model "
                                  f"folders") from None
        set_model_state_dict(model, state)
    else:
        model.load_state_dict(_model_weights(model.config, path))
    return merge_lora(model) if lora else model


def saved_config(path: Path) -> ModelConfig:
    """The model config a checkpoint was written with (its config.json)."""
    config_file = path / "config.json"
    try:
        return ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: cannot be read ({e}); not a complete checkpoint.") from None


def check_architecture(model: torch.nn.Module, path: Path) -> ModelConfig:
    """The checkpoint's model config; CheckpointError naming the differing fields when it is another architecture."""
    saved, config_file = saved_config(path), path / "config.json"
    diff = [f"{k}={v} (this run: {getattr(model.config, k)})" for k, v in vars(saved).items()
            if k not in TRAINING_FIELDS and getattr(model.config, k) != v]
    if diff:
        raise CheckpointError(f"{config_file}: the checkpoint is a different model: {', '.join(diff)}. "
                              f"Resume with the same model flags, or use a new --out_dir.")
    return saved


def _model_weights(saved: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as the run's model.state_dict() (for LoRA: the frozen base and the adapter). Read as a
    state dict, not through Transformer.from_pretrained, which knows no adapters."""
    weights_file = path / "model.safetensors"
    try:  # written by save_pretrained, so in the layout of the model's transformers class: convert back
        state = hf.from_hf_state(load_file(str(weights_file)), saved, weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_file}: cannot read the weights, the file is missing, truncated or corrupt "
                              f"({e}). {_ANOTHER.format(weights_file.parent)}") from None
    if saved.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # saved once, as transformers does
    return state


def _by_name(optimizer_state: dict[str, Any], model: torch.nn.Module, optimizer: Optimizers) -> dict[str, Any]:
    """A plain optimizer.state_dict() (parameters numbered in the optimizer's order) keyed by parameter names
    instead, the form torch.distributed.checkpoint.state_dict reads (to resume a DDP checkpoint with --fsdp)."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: v for i, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}


def load_checkpoint(path: str | Path, env: DistEnv, *, model: torch.nn.Module, optimizer: Optimizers,
                    scaler: Any) -> dict[str, Any]:
    """Restore model (refusing a checkpoint of another architecture), optimizer, scaler and this rank's RNG; return
    the trainer state. Sharded (--fsdp) checkpoints load with or without --fsdp, at any process count;
    model.safetensors ones too (under --fsdp each rank keeps its shard of them)."""
    path = Path(path)
    state = read_state(path)
    saved = check_architecture(model, path)
    if (path / SHARDED).is_dir():
        model_state, optimizer_state = get_state_dict(model, optimizer.parts)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(loaded, checkpoint_id=path / SHARDED)
        except Exception as e:  # a missing or truncated shard: DCP's own error, summarised
            raise CheckpointError(f"{path / SHARDED}: cannot be read ({type(e).__name__}: {str(e)[:300]}). "
                                  f"{_ANOTHER.format(path)}") from None
        set_state_dict(model, optimizer.parts, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        weights, optimizer_state = _model_weights(saved, path), _load(path / "optimizer.pt")
        try:
            if is_sharded(model):
                set_state_dict(model, optimizer.parts, model_state_dict=weights,
                               optim_state_dict=_by_name(optimizer_state, model, optimizer),
                               options=StateDictOptions(full_state_dict=True))
            else:
                model.load_state_dict(weights)
                optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. LoRA resumed with another --lora_rank
            raise CheckpointError(f"{path}: does not fit this run's model ({str(e).splitlines()[0]}). "
                                  f"Resume with the same flags, or use a new --out_dir.") from None
    scaler.load_state_dict(_load(path / "scaler.pt"))
    rng_file = path / f"rng_state_{env.rank}.pt"
    if not rng_file.is_file():  # resumed with more processes than were saved: reuse rank 0's
        rng_file = path / "rng_state_0.pt"
    rng = _load(rng_file)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def load_rank_file(path: str | Path, name: str, env: DistEnv) -> Any:
    """This rank's <name>_<rank>.pt of a checkpoint (see save_checkpoint's rank_files); they must have been
    saved by as many processes as there are now."""
    path = Path(path)
    saved = len(list(path.glob(f"{name}_*.pt")))
    if not saved:
        raise CheckpointError(f"{path}: holds no {name}, which this run needs to go on from there; resume with the "
                              f"flags of the run that wrote it (e.g. the same --num_iterations)")
    if saved != env.world_size:
        raise CheckpointError(f"{path}: its {name} were saved by {saved} process(es), this run has "
                              f"{env.world_size}; resume it with {saved}, or from another checkpoint")
    return _load(path / f"{name}_{env.rank}.pt")
