"""What every mode shares: the run it is built in, what it hands the loop, and how its models are written."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data import RowsDataset, pad_token_id, split_train_val, stop_token_ids
from model import ModelConfig
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.objectives import Batch, Objective

# How best/ and final/ are written: export(model, folder, info), info being the run's summary (mode, step, ...).
Export = Callable[[torch.nn.Module, Path, dict[str, Any]], None]


@dataclass
class Run:
    """What a mode builds from: the flags, the processes, and what train.py resolved once for everyone."""
    cfg: TrainConfig
    env: DistEnv
    dtype: torch.dtype  # the autocast dtype --dtype resolved to on this device
    tokenizer: Any
    model_cfg: ModelConfig
    seq_len: int  # training row length; the model's context is model_cfg.max_seq_len

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)


@dataclass
class Components:
    """What a mode hands the one loop."""
    model: torch.nn.Module
    objective: Objective
    train_data: RowsDataset
    val_data: RowsDataset | None
    collate_fn: Callable[[list], Batch]
    export: Export


class Mode:
    """A training mode: its flags (`Config`, a TrainConfig subclass with their defaults and checks), how its model's
    shape is decided, and what it builds for the loop. A new mode is a module with a Mode subclass plus its line
    in trainer/modes/__init__.py's MODES."""
    name: str
    Config: type[TrainConfig] = TrainConfig
    model_flags: tuple[str, ...] | None = ()  # the ModelConfig fields this mode takes as flags; None: every one
    model_flags_title = "model"

    def model_config(self, cfg: TrainConfig, overrides: dict[str, Any], tokenizer: Any) -> ModelConfig:
        """The model's shape from the flags (`overrides`: the model flags given); UsageError if it cannot be."""
        raise NotImplementedError

    def seq_len(self, cfg: TrainConfig, model_cfg: ModelConfig) -> int:
        """Tokens per training row."""
        return model_cfg.max_seq_len

    def refused_flag(self, flag: str, args: argparse.Namespace) -> str | None:
        """Why this mode has no `flag` (one of another mode's flags), when there is more to say than whose it is."""
        return None

    def source(self, cfg: TrainConfig) -> str:
        """Where the model comes from, for the line a run starts with."""
        raise NotImplementedError

    def build(self, run: Run) -> Components:
        raise NotImplementedError


def train_and_val(run: Run, load: Callable[[str], RowsDataset]) -> tuple[RowsDataset, RowsDataset]:
    """The training data and its validation data: --val_data_path, or a carve-off of --val_fraction."""
    cfg = run.cfg
    train = load(cfg.data_path)
    if cfg.val_data_path:
        return train, load(cfg.val_data_path)
    train_rows, val_rows = split_train_val(len(train), cfg.val_fraction, cfg.seed)
    return train.subset(train_rows), train.subset(val_rows)


def hf_export(tokenizer: Any) -> Export:
    """best/ and final/ as Hugging Face folders: weights + config (transformers loads them as they are), the
    tokenizer, and zero2llm.json (the run's summary; its "chat" tells eval_model.py how to talk to the model).

    A chat model's generation_config.json lists every token that ends its turn (<|im_end|> besides the
    tokenizer's eos), as chat releases do: transformers' generate stops only at the ids listed there. A list the
    model came with (an imported chat model's) is kept as it is."""
    def export(model: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
        chat = info["mode"] != "pretrain" and bool(tokenizer.chat_template)  # not: SFT of a base model on text
        gen = model.generation_config or {}
        if chat and not isinstance(gen.get("eos_token_id"), list):
            eos = gen.get("eos_token_id", model.config.eos_token_id)
            stops = stop_token_ids(tokenizer, model.config.eos_token_id, gen)
            first = [eos] if isinstance(eos, int) else []  # the model's own eos stays first, as it was
            model.generation_config = {**gen, "eos_token_id": first + [i for i in stops if i != eos]}
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "zero2llm.json").write_text(json.dumps({**info, "chat": chat}, indent=2))
    return export
