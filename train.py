#!/usr/bin/env python
"""Zero2LLM training: flags -> config -> build (model, tokenizer, data, objective) -> the one loop.

  python train.py --mode pretrain                        # shipped data, small model, CPU, minutes
  python train.py --mode pretrain --preset 26m --dtype bfloat16 --device cuda
  torchrun --standalone --nproc_per_node=4 train.py --mode pretrain --preset 104m
  python train.py --mode pretrain --resume               # continue from out_dir's newest checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from data import DataError, PackedDataset, collate, pretrain_bin, split_train_val
from model import ModelConfig, Transformer
from model.config import PRESETS, config_from_preset
from trainer.checkpoint import CheckpointError, latest_checkpoint
from trainer.config import MODE_DEFAULTS, TrainConfig, UsageError, add_dataclass_flags, take
from trainer.distributed import DistEnv, barrier, destroy, init_distributed
from trainer.loop import Trainer, TrainingError
from trainer.objectives import CausalLMObjective


@dataclass
class Job:
    """What a mode builds for the loop."""
    model: torch.nn.Module
    objective: Any
    train_data: Dataset
    val_data: Dataset | None
    collate_fn: Callable[[list], dict[str, torch.Tensor]]


def build_pretrain(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, env: DistEnv) -> Job:
    """A fresh model on packed rows of max_seq_len tokens from a tokenized (once, cached) corpus."""
    if env.is_main:  # rank 0 tokenizes; the others wait, then read the cached file
        pretrain_bin(cfg.data_path, tokenizer)
    barrier()

    def packed(path: str) -> PackedDataset:
        return PackedDataset(pretrain_bin(path, tokenizer), model_cfg.max_seq_len, vocab_size=model_cfg.vocab_size)

    train = packed(cfg.data_path)
    if cfg.val_data_path:
        val = packed(cfg.val_data_path)
    else:
        train_rows, val_rows = split_train_val(len(train), cfg.val_fraction, cfg.seed)
        train, val = train.subset(train_rows), train.subset(val_rows)
    return Job(Transformer(model_cfg), CausalLMObjective(), train, val, collate)


BUILDERS: dict[str, Callable[[TrainConfig, ModelConfig, Any, DistEnv], Job]] = {"pretrain": build_pretrain}


def build_parser(mode: str = "pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, TrainConfig, "training")
    add_dataclass_flags(parser, ModelConfig, "model (each flag overrides one field of --preset)", override_only=True)
    parser.set_defaults(**MODE_DEFAULTS[mode])
    return parser


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, ModelConfig, Any]:
    """Parse and check every flag before any work starts; user mistakes end in parser.error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=tuple(MODE_DEFAULTS), default="pretrain")
    mode = pre.parse_known_args(argv)[0].mode
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**take(TrainConfig, args))
    if cfg.preset not in PRESETS:
        parser.error(f"--preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    for flag in ("data_path", "val_data_path", "tokenizer_path"):
        path = getattr(cfg, flag)
        if path and not Path(path).exists():
            parser.error(f"--{flag} {path}: no such file or folder")
    if cfg.accumulation_steps < 1 or cfg.batch_size < 1:
        parser.error("--batch_size and --accumulation_steps must be >= 1")
    if cfg.resume == "auto" and latest_checkpoint(cfg.out_dir) is None:
        parser.error(f"--resume: no complete checkpoint in {cfg.out_dir}/checkpoints; start without --resume, "
                     f"or pass a checkpoint folder")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_dir():
        parser.error(f"--resume {cfg.resume}: no such checkpoint folder")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    overrides = take(ModelConfig, args)
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    try:
        model_cfg = config_from_preset(cfg.preset, **overrides)
    except ValueError as e:
        parser.error(str(e))
    if model_cfg.vocab_size < len(tokenizer):
        parser.error(f"--vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens "
                     f"({cfg.tokenizer_path})")
    return cfg, model_cfg, tokenizer


def make_export(tokenizer: Any) -> Callable[[Transformer, Path, dict[str, Any]], None]:
    def export(model: Transformer, folder: Path, info: dict[str, Any]) -> None:
        """An HF folder: weights + config (transformers loads it as is), tokenizer, training summary."""
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # eval_model.py reads "chat" to choose chat or plain completion for --mode auto.
        summary = {**info, "chat": info["mode"] != "pretrain"}
        (folder / "zero2llm.json").write_text(json.dumps(summary, indent=2))
    return export


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, model_cfg, tokenizer = parse_config(argv)
    env = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    try:
        job = BUILDERS[cfg.mode](cfg, model_cfg, tokenizer, env)
        if env.is_main:
            print(f"{cfg.mode}: {job.model.num_params() / 1e6:.2f}M parameters ({cfg.preset} preset), "
                  f"{len(job.train_data):,} training rows, {env.world_size} process(es) on {env.device}",
                  file=sys.stderr)
        trainer = Trainer(cfg, env, job.model, job.objective, job.train_data, job.val_data, job.collate_fn,
                          make_export(tokenizer))
        return trainer.fit()
    finally:
        destroy()


def cli() -> None:
    """`python train.py`: errors the user can fix print as one line, without a traceback."""
    try:
        result = main()
    except (UsageError, DataError, CheckpointError, TrainingError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    if result["signal"]:
        sys.exit(128 + result["signal"])  # the shell convention for "ended by a signal"


if __name__ == "__main__":
    cli()
