"""Objectives: how a batch becomes a loss. Everything else lives in the one loop (trainer/loop.py).

An objective returns the *sum* of its per-item losses and says how many items a batch holds; the
loop divides by the item count of the whole optimizer step (all micro-batches, all ranks). That
keeps the effective learning rate independent of accumulation steps, process count and of how
many real tokens each micro-batch happens to hold (see PITFALLS: gradient accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class CausalLMObjective:
    """Next-token cross-entropy over labelled positions (labels are pre-shifted; -100 = ignore).

    Used by pretraining (every position labelled) and, with masked labels, by SFT.
    """

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        labels = batch["labels"]
        # Cross-entropy in fp32 even under autocast: log-softmax over the vocabulary is where
        # bf16's 8-bit mantissa hurts most.
        ce_sum = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        n = (labels != IGNORE_INDEX).sum()
        # The MoE balance loss is a per-batch mean; weighting it by the batch's item count makes
        # the loop's division by the step's item count average it over micro-batches.
        loss_sum = ce_sum + out.aux_loss * n
        return loss_sum, {"aux_loss": out.aux_loss.detach()}
