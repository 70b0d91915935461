"""What the fine-tuning modes (sft, lora, dpo, grpo) share: they start from a trained model folder, --init_from."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from data import RowsDataset
from model import ModelConfig, Transformer, hf
from model.config import TRAINING_FIELDS
from trainer import parallel
from trainer.config import TrainConfig, flag
from trainer.errors import UsageError
from trainer.modes.base import Mode, Run, train_and_val


@dataclass
class FinetuneConfig(TrainConfig):
    flag_group = "fine-tuning (the modes that start from --init_from)"
    previous_stage: ClassVar[str] = "sft"  # the stage whose final/ the default --init_from is
    data_suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".parquet")

    # Shared flags with other defaults: the tokenizer is the --init_from folder's, and validation sets are small.
    tokenizer_path: str = ""
    warmup_iters: int = 20
    eval_iters: int = 0
    init_from: str = flag("out/sft/final", "Model folder to start from; its config.json fixes the architecture "
                          "(only --dropout, --flash_attn, --aux_loss_alpha and --max_seq_len may be changed).")
    max_seq_len: int = flag(0, "Training row length: longer conversations are cut to it; 0 = the --init_from "
                            "model's context. The exported model keeps the context it came with.")

    def check(self) -> None:
        init = Path(self.init_from)
        if not self.init_from:
            raise UsageError(f"--mode {self.mode} fine-tunes a trained model: pass --init_from <model folder>")
        if not (init / "config.json").is_file():
            if init.is_file():
                raise UsageError(f"--init_from {hf.file_not_folder(init)}")
            if (init / "adapter_config.json").is_file():
                hint = "it holds a LoRA adapter, not a full model: use its merged/ folder (train with --merge)"
            elif self.init_from == self.default("init_from"):
                hint = (f"run the previous stage first (python train.py --mode {self.previous_stage}), "
                        f"or point --init_from at a model folder")
            else:
                hint = "point --init_from at a folder with config.json + model.safetensors (a final/ or best/ folder)"
            raise UsageError(f"--init_from {self.init_from}: no model there; {hint}")
        if not self.tokenizer_path:  # the model's own tokenizer, once --init_from is known to be a model folder
            if not (init / "tokenizer_config.json").is_file():
                raise UsageError(f"--init_from {self.init_from} has no tokenizer files; pass --tokenizer_path")
            self.tokenizer_path = self.init_from
        if self.max_seq_len < 0:
            raise UsageError(f"--max_seq_len {self.max_seq_len}: must be >= 0 (0 = the model's context)")
        super().check()


def rope_range(config: ModelConfig) -> int:
    """Positions a saved model handles: its max_seq_len, or what its rope_scaling (yarn, llama3) extends it to."""
    scaling = config.rope_scaling or {}
    extended = int(float(scaling.get("factor", 1.0)) * int(scaling.get("original_max_position_embeddings", 0)))
    return max(config.max_seq_len, extended)


class FinetuneMode(Mode):
    Config = FinetuneConfig
    model_flags = TRAINING_FIELDS  # of the model, what a fine-tuning run may change
    model_flags_title = "model (changes to the --init_from model)"

    def model_config(self, cfg: FinetuneConfig, overrides: dict[str, Any], tokenizer: Any) -> ModelConfig:
        """The --init_from folder's architecture, with the few fields `model_flags` may change."""
        config_file = Path(cfg.init_from) / "config.json"
        try:
            model_cfg = dataclasses.replace(ModelConfig.from_hf_dict(json.loads(config_file.read_text())),
                                            **overrides).validate()
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{config_file}: {e}") from None
        limit = rope_range(model_cfg)
        if cfg.max_seq_len > limit:
            how = (f"max_position_embeddings {model_cfg.max_seq_len}" if model_cfg.rope_scaling is None else
                   f"rope_scaling covers {limit}")
            raise UsageError(f"--max_seq_len {cfg.max_seq_len}: beyond the RoPE range of --init_from {cfg.init_from} "
                             f"({how}, in {config_file}); positions past {limit} were never trained. Use "
                             f"--max_seq_len {limit} or less, or a model whose config has rope_scaling covering "
                             f"{cfg.max_seq_len}")
        if model_cfg.vocab_size < len(tokenizer):
            raise UsageError(f"--init_from {cfg.init_from}: vocab_size {model_cfg.vocab_size} is smaller than the "
                             f"tokenizer's {len(tokenizer)} tokens ({cfg.tokenizer_path})")
        return model_cfg

    def seq_len(self, cfg: FinetuneConfig, model_cfg: ModelConfig) -> int:
        return cfg.max_seq_len or model_cfg.max_seq_len

    def refused_flag(self, flag: str, args: argparse.Namespace) -> str | None:
        if flag == "--preset" or flag.removeprefix("--").removeprefix("no-") in ModelConfig.__dataclass_fields__:
            hint = "drop --preset" if flag == "--preset" else (
                "only --" + ", --".join(self.model_flags) + " and --max_seq_len may be changed")
            return f"{flag}: --mode {self.name} takes the architecture from --init_from ({args.init_from}); {hint}"
        return None

    def source(self, cfg: FinetuneConfig) -> str:
        return f"from {cfg.init_from}"


def load_init_model(run: Run, path: str | None = None, flag: str = "--init_from") -> Transformer:
    """The --init_from weights (or `path`'s) in a model built from run.model_cfg (that folder's config, with the
    fields the flags may change)."""
    cfg = run.cfg
    path = path or cfg.init_from
    try:
        saved = Transformer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:  # already names the file and the problem
        raise UsageError(f"{flag}: {e}") from None
    with torch.device("meta"):  # no random init of weights about to be replaced (minutes for billions)
        model = Transformer(run.model_cfg)
    try:
        model.load_state_dict(saved.state_dict(), assign=True)
    except RuntimeError as e:
        raise UsageError(f"{flag} {path}: its architecture differs from --init_from {cfg.init_from}'s: "
                         f"{str(e).splitlines()[0]}") from None
    model.tie_weights()
    model.generation_config = saved.generation_config  # several eos ids, sampling defaults: kept for export
    return model


@dataclass
class ReferenceConfig(FinetuneConfig):
    """What the modes that hold a frozen reference model (DPO; GRPO's KL penalty) share."""
    flag_group = "reference model (dpo, grpo)"

    ref_model_path: str = flag("", "Frozen reference model folder (DPO's reference, GRPO's KL penalty); empty = the "
                               "--init_from folder.")

    def check(self) -> None:
        check_reference_path(self.ref_model_path, "ref_model_path")
        super().check()


def load_reference(run: Run) -> Transformer:
    """The frozen reference model (DPO, GRPO's KL): --ref_model_path, default the --init_from model. Under --fsdp
    it is sharded like the policy (else every GPU would hold a whole copy)."""
    cfg = run.cfg
    ref = load_init_model(run, cfg.ref_model_path or cfg.init_from, "--ref_model_path")
    ref = ref.eval().requires_grad_(False)
    return parallel.shard(ref, run.env, run.dtype) if cfg.fsdp else ref.to(run.env.device)


def check_reference_path(path: str, name: str) -> None:
    """--ref_model_path / --reward_model_path name a model folder, checked before any work."""
    if path and not (Path(path) / "config.json").is_file():
        why = hf.file_not_folder(path) or f"{path}: no model there (config.json + model.safetensors)"
        raise UsageError(f"--{name} {why}")


def read_chat_data(run: Run, dataset_cls: Callable[..., RowsDataset]) -> tuple[RowsDataset, RowsDataset]:
    """Train and validation chat data (SFT conversations, DPO pairs, GRPO prompts), tokenized up front on every rank
    (seconds for the shipped files); rank 0 reports skipped records and a summary."""

    def read(path: str) -> RowsDataset:
        data = dataset_cls(path, run.tokenizer, run.seq_len, skip_bad_records=run.cfg.skip_bad_records)
        if run.env.is_main:
            for report in (data.bad_report, data.unused_report):
                if report:
                    print(report, file=sys.stderr)
            print(data.summary(), file=sys.stderr)
        return data

    return train_and_val(run, read)
