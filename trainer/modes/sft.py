"""--mode sft: supervised fine-tuning on chats (or Alpaca rows), with the loss on the assistant's tokens only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from data import SFTDataset, pad_collate
from trainer.modes.base import Components, Run, hf_export
from trainer.modes.finetune import FinetuneConfig, FinetuneMode, load_init_model, read_chat_data
from trainer.objectives import CausalLMObjective


@dataclass
class SFTConfig(FinetuneConfig):
    previous_stage: ClassVar[str] = "pretrain"

    mode: str = "sft"
    out_dir: str = "out/sft"
    data_path: str = "dataset/sft.jsonl"
    sample_val_data: ClassVar[str] = "dataset/sft_val.jsonl"
    init_from: str = "out/pretrain/final"
    learning_rate: float = 5e-4
    epochs: int = 2


class SFT(FinetuneMode):
    name = "sft"
    Config = SFTConfig

    def build(self, run: Run) -> Components:
        """The --init_from model on conversations: batches of similar-length rows (the sampler groups by the
        dataset's lengths), right-padded."""
        train, val = read_chat_data(run, SFTDataset)
        train.check_trainable()  # (validation rows without a reply only leave the run without a metric)
        return Components(load_init_model(run), CausalLMObjective(), train, val, pad_collate(run.pad_id),
                          hf_export(run.tokenizer))
