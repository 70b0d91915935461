"""--mode dpo: direct preference optimisation on pairs of replies, against a frozen reference model."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from data import DPODataset, pair_collate
from trainer.config import flag
from trainer.errors import UsageError
from trainer.modes.base import Components, Run, hf_export
from trainer.modes.finetune import FinetuneMode, ReferenceConfig, load_init_model, load_reference, read_chat_data
from trainer.objectives import DPO_LOSSES, DPOObjective, sequence_logps


@dataclass
class DPOConfig(ReferenceConfig):
    flag_group = "dpo"

    mode: str = "dpo"
    # DPO moves a model that already chats; a tiny learning rate (5e-7..5e-6 for billion-parameter models) keeps
    # it close to the reference. The shipped 6M-parameter models tolerate more.
    out_dir: str = "out/dpo"
    data_path: str = "dataset/dpo.jsonl"
    sample_val_data: ClassVar[str] = "dataset/dpo_val.jsonl"
    learning_rate: float = 5e-5
    eval_interval: int = 50
    dpo_beta: float = flag(0.1, "DPO beta: strength of the pull towards the reference model (higher = stay closer); "
                           "IPO: the target log-ratio margin is 1 / (2 beta).")
    dpo_label_smoothing: float = flag(0.0, "Assumed share of flipped preference labels, in [0, 0.5) (conservative "
                                      "DPO; sigmoid loss only).")
    dpo_loss: str = flag("sigmoid", "Preference loss: sigmoid (DPO) or ipo.", choices=DPO_LOSSES)
    precompute_ref_logps: bool = flag(False, "Compute the reference model's log-probs of every train/val pair once "
                                      "up front and free it: less memory and one forward per step instead of two.")

    def check(self) -> None:
        if not self.dpo_beta > 0:
            raise UsageError(f"--dpo_beta {self.dpo_beta:g}: must be > 0")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise UsageError(f"--dpo_label_smoothing {self.dpo_label_smoothing:g}: must be in [0, 0.5)")
        if self.dpo_label_smoothing and self.dpo_loss != "sigmoid":
            raise UsageError(f"--dpo_label_smoothing is for --dpo_loss sigmoid, not {self.dpo_loss}")
        super().check()


class DPO(FinetuneMode):
    name = "dpo"
    Config = DPOConfig

    def build(self, run: Run) -> Components:
        """Each batch holds both sides of its pairs (pair_collate); with --precompute_ref_logps the reference scores
        every pair once here and is freed."""
        cfg: DPOConfig = run.cfg
        train, val = read_chat_data(run, DPODataset)
        collate_fn = pair_collate(run.pad_id)
        ref = load_reference(run)
        if cfg.precompute_ref_logps:
            for data in (train, val):
                if len(data):  # no validation rows (--val_data_path "" --val_fraction 0): nothing to score
                    precompute_ref_logps(run, ref, data, collate_fn)
            ref = None  # the objective reads batch["ref_logps"]; the reference's memory goes back
        objective = DPOObjective(ref, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss)
        return Components(load_init_model(run), objective, train, val, collate_fn, hf_export(run.tokenizer))


@torch.no_grad()
def precompute_ref_logps(run: Run, ref: torch.nn.Module, data: DPODataset, collate_fn: Callable) -> None:
    """The reference's summed log-probs of both sides of every pair of `data`, under the run's autocast, stored
    on the dataset (items then carry "ref_logps"). Every rank scores every pair: simple, fine for datasets that
    take seconds; a large one would shard this and all-gather."""
    device, batch_size = run.env.device, run.cfg.batch_size
    autocast = torch.autocast(device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)
    out = []
    for start in range(0, len(data), batch_size):
        batch = collate_fn([data[i] for i in range(start, min(start + batch_size, len(data)))])
        batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
        with autocast:
            logps = sequence_logps(ref, batch)[0].float().cpu()
        n = len(logps) // 2
        out.append(torch.stack([logps[:n], logps[n:]], dim=1))
    data.set_ref_logps(torch.cat(out))
