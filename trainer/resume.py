"""The resume policy, in one place: what a checkpoint records about its run, what must match to resume from it,
and what may change (taking effect from the next step, said on stderr).

Must match, else the resume is refused with the reason (these decide what the weights and the data position mean):
    the mode and the architecture (checked against the checkpoint's config.json); the tokenizer (a hash of its
    vocabulary, merges, special tokens and chat template); the data files (size and a hash of the first MiB);
    the optimizer; the row length; the seed (it decides the order rows are read in, and a validation split carved off the
    training rows); --val_fraction when validation is carved off; --skip_bad_records (it decides which rows
    exist); and, in length-grouped modes (sft, lora, dpo, grpo), the global batch (--batch_size x processes x
    --accumulation_steps: batches of similar-length rows are cut from it).
May change, and is applied from the next step: the learning rate and its schedule (--learning_rate,
    --min_lr_ratio, --warmup_iters, --lr_decay_iters), the run's length (--max_steps, --epochs), AdamW's
    --weight_decay and betas, --grad_clip, the eval/log/save intervals and everything else not listed above.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from data import data_files
from trainer.checkpoint import CheckpointError
from trainer.config import TrainConfig

FINGERPRINT_BYTES = 1 << 20
# Flags whose change means nothing to a resumed run (where it runs, how it is watched), so nothing is said.
UNSAID = {"out_dir", "resume", "overwrite", "device", "num_workers", "compile", "grad_checkpointing", "fsdp",
          "use_wandb", "wandb_project", "wandb_run_name", "data_path", "val_data_path", "tokenizer_path", "init_from",
          "ref_model_path", "reward_model_path", "peak_tflops"}


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and the sha256 of the first MiB: a changed, truncated or swapped data file is noticed in milliseconds."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(FINGERPRINT_BYTES)
    return {"size": path.stat().st_size, "sha256_first_mib": hashlib.sha256(head).hexdigest()}


def data_fingerprint(spec: str, suffixes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The fingerprints of every file a --data_path names, in the order they are read (a folder, a glob or a
    comma list names several): a file added, removed or reordered changes it as a changed file does."""
    return [{"name": f.name, **file_fingerprint(f)} for f in data_files(spec, suffixes)]


def tokenizer_hash(tokenizer: Any) -> str:
    """What the ids mean: the tokenizer's full definition and its chat template."""
    text = tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_record(cfg: TrainConfig, tokenizer: Any, seq_len: int, global_batch: int, length_grouped: bool
               ) -> dict[str, Any]:
    """What every checkpoint stores so that a later resume can be checked against it."""
    data = {name: data_fingerprint(getattr(cfg, name), cfg.data_suffixes) for name in ("data_path", "val_data_path")
            if getattr(cfg, name)}
    return {"mode": cfg.mode, "tokenizer": tokenizer_hash(tokenizer), "data": data, "seq_len": seq_len,
            "seed": cfg.seed, "val_carved": not cfg.val_data_path, "val_fraction": cfg.val_fraction,
            "skip_bad_records": cfg.skip_bad_records, "global_batch": global_batch, "length_grouped": length_grouped}


def check_resume(saved: dict[str, Any], record: dict[str, Any], cfg: TrainConfig, path: Path) -> list[str]:
    """Refuse (CheckpointError) a resume that would train on something else than the checkpoint's run; return the
    lines that say what changed and takes effect."""
    before = saved.get("run")
    where = path / "trainer_state.json"
    if before is None:
        return [f"{where} records no tokenizer or data fingerprints (an older checkpoint): they are not checked"]
    refused = _refusals(before, record)
    config = saved.get("config", {})
    if config.get("optimizer", "adamw") != cfg.optimizer:
        refused.append(f"it was trained with --optimizer {config.get('optimizer', 'adamw')}, whose state this "
                       f"--optimizer {cfg.optimizer} cannot continue")
    if refused:
        raise CheckpointError(f"--resume {path}: {'; '.join(refused)}. Resume with what the run had, or start a new "
                              f"run in another --out_dir.")
    now = dataclasses.asdict(cfg)
    changed = [f"--{name} {config[name]} -> {now[name]}" for name in now
               if name in config and config[name] != now[name] and name not in UNSAID]
    return [f"changed since the checkpoint, from step {saved.get('step', 0) + 1} on: {', '.join(changed)}"] \
        if changed else []


def _refusals(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    if before["mode"] != now["mode"]:
        out.append(f"it is a --mode {before['mode']} run, this is --mode {now['mode']}")
    if before["tokenizer"] != now["tokenizer"]:
        out.append("the tokenizer differs from the one it was trained with (its ids would mean other text)")
    for name, print_ in now["data"].items():
        if name in before["data"] and before["data"][name] != print_:
            out.append(f"--{name} is not the data it was trained on (a file's size or content changed, or files were "
                       f"added, removed or reordered)")
    if set(before["data"]) != set(now["data"]):
        out.append("it had " + (", ".join(f"--{n}" for n in sorted(before["data"])) or "no data files") +
                   ", this run has " + (", ".join(f"--{n}" for n in sorted(now["data"])) or "none"))
    if before["seq_len"] != now["seq_len"]:
        out.append(f"its rows were {before['seq_len']} tokens, this run's are {now['seq_len']} (--max_seq_len)")
    if before["skip_bad_records"] != now["skip_bad_records"]:
        out.append("--skip_bad_records differs (it decides which rows exist)")
    if before["seed"] != now["seed"]:
        out.append(f"it ran with --seed {before['seed']}, which decides the order its rows are read in"
                   + (" and the validation rows carved off them" if before["val_carved"] else "")
                   + f"; --seed {now['seed']} would read rows twice or never")
    if before["val_carved"] and before["val_fraction"] != now["val_fraction"]:
        out.append(f"validation is carved off the training rows by --val_fraction {before['val_fraction']}; "
                   f"{now['val_fraction']} would move validation rows into training")
    if now["length_grouped"] and before["global_batch"] != now["global_batch"]:
        out.append(f"its global batch was {before['global_batch']} rows (--batch_size x processes x "
                   f"--accumulation_steps), this run's is {now['global_batch']}; batches of similar-length rows "
                   f"are cut from that, so the saved data position means other rows")
    return out
