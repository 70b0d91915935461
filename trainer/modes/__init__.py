"""The training modes. Each is a Mode (trainer/modes/base.py) in a module of its own; this registry is the one
place train.py finds them."""
from trainer.modes.base import Components, Mode, Run
from trainer.modes.dpo import DPO
from trainer.modes.grpo import GRPO
from trainer.modes.lora import LoRA
from trainer.modes.pretrain import Pretrain
from trainer.modes.sft import SFT

MODES: dict[str, Mode] = {mode.name: mode for mode in (Pretrain(), SFT(), LoRA(), DPO(), GRPO())}

__all__ = ["MODES", "Components", "Mode", "Run"]
