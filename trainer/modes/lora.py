"""--mode lora: SFT's data and objective, training only low-rank adapters on the frozen --init_from model.

Checkpoints hold the whole model (base + adapter) like every mode's; best/ and final/ hold only the adapter,
in PEFT's layout, and with --merge also merged/, the full merged model.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from model.lora import apply_lora, count_parameters, merge_lora, save_adapter
from trainer.config import flag
from trainer.errors import UsageError
from trainer.modes.base import Components, Export, Run, hf_export
from trainer.modes.sft import SFT, SFTConfig


@dataclass
class LoRAConfig(SFTConfig):
    flag_group = "lora"
    previous_stage: ClassVar[str] = "sft"

    mode: str = "lora"
    out_dir: str = "out/lora"
    init_from: str = "out/sft/final"
    learning_rate: float = 2e-3
    epochs: int = 1
    lora_rank: int = flag(8, "LoRA rank r of the update B @ A.")
    lora_alpha: float = flag(16.0, "LoRA alpha: the update is scaled by alpha / rank.")
    lora_dropout: float = flag(0.05, "Dropout on the input of LoRA's A.")
    lora_target_modules: str = flag("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                    "Comma-separated linear layers that get LoRA (default: all attention and MLP "
                                    "projections), or all-linear: every linear layer but lm_head (with MoE, the "
                                    "router too), as in PEFT.")
    merge: bool = flag(False, "Also export the adapter merged into the base, a full model, to best/merged/ and "
                       "final/merged/.")

    def check(self) -> None:
        if not (self.lora_rank >= 1 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1):
            raise UsageError(f"--lora_rank {self.lora_rank}, --lora_alpha {self.lora_alpha:g}, --lora_dropout "
                             f"{self.lora_dropout:g}: need rank >= 1, alpha > 0 and 0 <= dropout < 1")
        super().check()


class LoRA(SFT):
    name = "lora"
    Config = LoRAConfig

    def build(self, run: Run) -> Components:
        cfg: LoRAConfig = run.cfg
        parts = super().build(run)
        try:
            wrapped = apply_lora(parts.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        except ValueError as e:
            raise UsageError(f"--lora_target_modules {cfg.lora_target_modules}: {e}") from None
        trainable, total = count_parameters(parts.model)
        if run.env.is_main:
            print(f"lora: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {len(wrapped)} layers; "
                  f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", file=sys.stderr)
        parts.export = adapter_export(run.tokenizer, str(Path(cfg.init_from).resolve()), cfg.merge)
        return parts


def adapter_export(tokenizer: Any, base_model: str, merge: bool) -> Export:
    """The adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors) with the tokenizer; with
    --merge also folder/merged/, the base with the adapter folded in: a full Hugging Face folder."""
    def export(model: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
        save_adapter(model, folder, base_model)
        tokenizer.save_pretrained(folder)
        (folder / "zero2llm.json").write_text(json.dumps({**info, "chat": True, "base_model": base_model}, indent=2))
        if merge:
            merged = merge_lora(copy.deepcopy(model))  # a copy: best/ is written mid-training
            hf_export(tokenizer)(merged, folder / "merged", {**info, "base_model": base_model})
    return export
