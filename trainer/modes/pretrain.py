"""--mode pretrain: a fresh model, next-token prediction on packed rows of a tokenized (once, cached) corpus."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

from data import PackedDataset, collate, pretrain_bin, read_sidecar
from model import ModelConfig, Transformer
from model.config import PRESETS, config_from_preset
from trainer.checkpoint import read_state, resume_path
from trainer.config import TrainConfig, flag
from trainer.errors import UsageError
from trainer.distributed import barrier
from trainer.modes.base import Components, Mode, Run, hf_export, train_and_val
from trainer.objectives import CausalLMObjective
from trainer.schedule import parse_duration


SHORT_BUDGET = 600  # seconds: --preset auto's mini is for a --time_budget up to this (the longest budget searched)


@dataclass
class PretrainConfig(TrainConfig):
    flag_group = "pretraining"

    # Chosen by a search at 2- and 5-minute budgets (bench/RESULTS.md): Muon on the hidden matrices beat AdamW at
    # every learning rate and batch tried, with AdamW's share (embeddings, lm_head, norms) at 3e-3.
    optimizer: str = "muon"
    learning_rate: float = 3e-3
    # Pretraining rows are all one length, so compiling makes one graph; the other modes' batches vary in length.
    compile: str = "auto"

    preset: str = flag("auto", "Model size preset; the model flags below override single fields of it. auto: mini "
                       f"for a --time_budget of up to {SHORT_BUDGET // 60} minutes (the shape that won the model-shape "
                       "searches at 2, 5 and 10 minutes: it takes more steps), else small.",
                       choices=("auto", *PRESETS))
    bin_dtype: str = flag("", "How the ids of a .bin token file without its .json sidecar are stored (uint16 or "
                          "uint32, as it was written); such a file is refused without it. Files from data.py "
                          "prepare have a sidecar.", choices=("", "uint16", "uint32"), metavar="uint16|uint32")


def preset_of(cfg: PretrainConfig) -> str:
    """The preset a run builds: --preset, where auto is mini under a short --time_budget (bench/RESULTS.md: it won
    the model-shape searches at 2, 5 and 10 minutes by taking more steps), else small. A resumed run builds the
    model it began with: auto decides by the preset and budget of its first start (a resume may change the budget)."""
    if cfg.preset != "auto":
        return cfg.preset
    budget = cfg.time_budget
    checkpoint = resume_path(cfg.resume, cfg.out_dir)
    if checkpoint is not None:
        began = read_state(checkpoint).get("config", {})
        if began.get("preset", "auto") != "auto":
            return began["preset"]
        budget = began.get("time_budget", budget)
    return "mini" if budget and parse_duration(budget) <= SHORT_BUDGET else "small"


def check_fits_in_memory(model_cfg: ModelConfig, on_cpu: bool) -> None:
    """Refuse, before allocating anything, a model this machine cannot hold: its weights are built in host memory
    first (4 bytes per parameter), and training on the CPU holds 16 (weights, gradients, AdamW's two moments)."""
    with torch.device("meta"):  # shapes only: counting costs nothing, whatever the size
        n = Transformer(model_cfg).num_params()
    need = n * (16 if on_cpu else 4)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UsageError(f"the model has {n / 1e9:,.2f}B parameters (dim {model_cfg.dim}, {model_cfg.n_layers} layers, "
                         f"vocab {model_cfg.vocab_size}): {need / 2**30:,.0f} GiB to {'train on the CPU' if on_cpu else 'build'}"
                         f", more than this machine's {have / 2**30:,.0f} GiB; choose a smaller --preset or fewer "
                         f"--dim/--n_layers")


class Pretrain(Mode):
    name = "pretrain"
    Config = PretrainConfig
    model_flags = None  # every model field: the architecture is this run's to choose
    model_flags_title = "model (each flag overrides one field of --preset)"

    def model_config(self, cfg: PretrainConfig, overrides: dict[str, Any], tokenizer: Any) -> ModelConfig:
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        try:
            model_cfg = config_from_preset(preset_of(cfg), **overrides)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if model_cfg.vocab_size < len(tokenizer):
            raise UsageError(f"--vocab_size: vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens ({cfg.tokenizer_path})")
        check_fits_in_memory(model_cfg, on_cpu=cfg.device == "cpu" or (cfg.device == "auto" and
                                                                        not torch.cuda.is_available()))
        return model_cfg

    def refused_flag(self, flag: str, args: argparse.Namespace) -> str | None:
        if flag == "--init_from":
            return ("--init_from is for the fine-tuning modes (sft, lora, dpo, grpo); pretraining starts from random "
                    "weights (--resume continues a pretraining run)")
        return None

    def source(self, cfg: PretrainConfig) -> str:
        preset = preset_of(cfg)
        if cfg.preset == "auto" and cfg.resume:
            return f"{preset} preset, the model the resumed run began with (--preset auto)"
        if cfg.preset == "auto" and cfg.time_budget:
            minutes = SHORT_BUDGET // 60
            budget = f"of {minutes} minutes or less" if preset == "mini" else f"over {minutes} minutes"
            return f"{preset} preset, --preset auto's choice for a --time_budget {budget}"
        return f"{preset} preset"

    def build(self, run: Run) -> Components:
        skip, bin_dtype = run.cfg.skip_bad_records, run.cfg.bin_dtype or None
        if run.env.is_main:  # rank 0 tokenizes (and reports skipped bad lines); the others wait, then read the cache
            for path in filter(None, (run.cfg.data_path, run.cfg.val_data_path)):
                pretrain_bin(path, run.tokenizer, skip_bad_records=skip, bin_dtype=bin_dtype)
        barrier()

        # Ids the model has no embedding for, or the tokenizer no token for (a model it could not read or write)
        vocab = min(run.model_cfg.vocab_size, len(run.tokenizer))
        vocab_name = (f"the model's --vocab_size {vocab:,}" if vocab == run.model_cfg.vocab_size else
                      f"the {vocab:,} tokens of the tokenizer (--tokenizer_path {run.cfg.tokenizer_path})")

        def packed(path: str) -> PackedDataset:
            tokens = pretrain_bin(path, run.tokenizer, skip_bad_records=skip, bin_dtype=bin_dtype)
            raw = read_sidecar(tokens) is None  # --bin_dtype is for such a file only; a sidecar says its own
            return PackedDataset(tokens, run.seq_len, dtype=bin_dtype if raw else None, vocab_size=vocab,
                                 vocab_name=vocab_name)

        train, val = train_and_val(run, packed)
        return Components(Transformer(run.model_cfg), CausalLMObjective(), train, val, collate,
                          hf_export(run.tokenizer))
