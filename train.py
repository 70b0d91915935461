#!/usr/bin/env python
"""Zero2LLM training: flags -> config -> build (model, tokenizer, data, objective) -> the one loop.

  python train.py --mode pretrain                        # shipped data, small model, CPU, minutes
  python train.py --mode pretrain --preset 26m --dtype bfloat16 --device cuda
  torchrun --nproc_per_node=4 train.py --mode pretrain --preset 104m
  python train.py --mode pretrain --resume               # continue from out_dir's newest checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from model import ModelConfig, Transformer
from model.config import PRESETS, config_from_preset
from trainer.config import TrainConfig, add_dataclass_flags, take
from trainer.distributed import barrier, destroy, init_distributed
from trainer.loop import Trainer
from trainer.objectives import CausalLMObjective


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, TrainConfig, "training")
    add_dataclass_flags(parser, ModelConfig, "model (each flag overrides one field of --preset)", override_only=True)
    return parser


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, ModelConfig, Any]:
    """Parse and check every flag before any work starts; user mistakes end in parser.error."""
    parser = build_parser()
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


def build_pretrain_data(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, is_main: bool):
    """Tokenize (once, cached) and pack the corpus into rows of max_seq_len tokens."""
    from data import PackedDataset, pretrain_bin, split_train_val

    # Rank 0 tokenizes; the others wait and then read the cached file.
    if is_main:
        pretrain_bin(cfg.data_path, tokenizer)
    barrier()
    train = PackedDataset(pretrain_bin(cfg.data_path, tokenizer), model_cfg.max_seq_len, vocab_size=model_cfg.vocab_size)
    if cfg.val_data_path:
        val = PackedDataset(pretrain_bin(cfg.val_data_path, tokenizer), model_cfg.max_seq_len, vocab_size=model_cfg.vocab_size)
        return train, val
    train_rows, val_rows = split_train_val(len(train), cfg.val_fraction, cfg.seed)
    return train.subset(train_rows), train.subset(val_rows)


def make_export(tokenizer: Any):
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
        train_data, val_data = build_pretrain_data(cfg, model_cfg, tokenizer, env.is_main)
        from data import collate

        model = Transformer(model_cfg)
        if env.is_main:
            print(f"model: {model.num_params() / 1e6:.2f}M parameters ({cfg.preset} preset), "
                  f"{len(train_data):,} training rows of {model_cfg.max_seq_len} tokens, "
                  f"{env.world_size} process(es) on {env.device}", file=sys.stderr)
        trainer = Trainer(cfg, env, model, CausalLMObjective(), train_data, val_data, collate,
                          make_export(tokenizer))
        return trainer.fit()
    finally:
        destroy()


if __name__ == "__main__":
    main()
