"""Objectives: how a batch becomes a loss. Everything else lives in the one loop (trainer/loop.py).

An objective returns the *sum* of its per-item losses and says how many items a batch holds; the
loop divides by the item count of the whole optimizer step (all micro-batches, all ranks). That
keeps the effective learning rate independent of accumulation steps, process count and of how
many real tokens each micro-batch happens to hold: a per-micro-batch mean would weigh a micro-batch
with few target tokens as much as one with many.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CE_CHUNK_ROWS = 128  # 128 rows x 6,400 vocab x 4 bytes = 3 MB of fp32 scratch: fits in a CPU's L2/L3
Batch = dict[str, Any]  # tensors, and for some modes plain values (GRPO: prompt texts, answers)


class Objective:
    """What the loop asks of a mode's objective; the defaults fit an objective that only computes a loss.

    The loop calls every method; an objective overrides what it needs (GRPO overrides them all).
    """
    num_iterations: int = 1  # optimizer steps on each prepared batch (GRPO's policy updates per rollout batch)
    eval_metrics: tuple[str, ...] = ()  # metrics evaluate() averages over the validation set
    loss_is_nll: bool = False  # True: validation also logs the perplexity exp(val_loss)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the summed loss of the batch's items, metrics as batch means)."""
        raise NotImplementedError

    def num_items(self, batch: Batch) -> int:
        """How many items the loss sums over (labelled tokens, pairs, completion tokens)."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, micro_batches: list[Batch], step: int,
                draw: Callable[[], Batch] | None = None) -> list[Batch]:
        """Turn fetched micro-batches into what is trained on, once per fetch, on the unwrapped model without
        gradients (GRPO samples and scores its rollouts here); `draw()` fetches one more batch from the data."""
        return micro_batches

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The validation loss and metrics of a batch; by default the training loss."""
        return self(model, batch)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy in fp32, CE_CHUNK_ROWS rows at a time, with d loss / d logits made in the forward.

    Why: F.cross_entropy(logits.float()) streams three [tokens, vocab] fp32 tensors through memory (the upcast
    copy, the log-softmax it keeps for backward, and its gradient), a large share of a CPU step. Here each chunk's
    log-softmax is computed in fp32 while it is in cache, the loss is picked from it, and softmax - onehot (the
    gradient of the summed loss) is written once, in the logits' dtype, which is what autograd would cast the
    fp32 gradient to anyway. Backward only scales it. Same numbers as F.cross_entropy(logits.float()).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        losses = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            rows = slice(start, start + CE_CHUNK_ROWS)
            target = labels[rows].clamp(min=0)[:, None]  # ignored rows pick class 0; zeroed below
            log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)
            losses[rows] = -log_probs.gather(1, target).squeeze(1)
            if need_grad:
                probs = log_probs.exp_()
                grad[rows] = probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
        ignored = labels == IGNORE_INDEX
        losses.masked_fill_(ignored, 0.0)
        if need_grad:
            grad.masked_fill_(ignored[:, None], 0)
            ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position, fp32, 0 where labels == IGNORE_INDEX: logits [..., V], labels [...] -> [...].

    Equals F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none") in value and gradient,
    at a fraction of the memory traffic (see _ChunkedCrossEntropy).
    """
    return _ChunkedCrossEntropy.apply(logits.flatten(0, -2), labels.flatten()).view(labels.shape)


class CausalLMObjective(Objective):
    """Next-token cross-entropy over labelled positions (labels are pre-shifted; -100 = ignore).

    Used by pretraining (every position labelled) and, with masked labels, by SFT.
    """

    loss_is_nll = True  # the loop reports exp(val_loss), the perplexity

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        labels = batch["labels"]
        # Cross-entropy in fp32 even under autocast: log-softmax over the vocabulary is where
        # bf16's 8-bit mantissa hurts most.
        ce_sum = token_cross_entropy(out.logits, labels).sum()
        n = (labels != IGNORE_INDEX).sum()
        # The MoE balance loss is a per-batch mean; weighting it by the batch's item count makes
        # the loop's division by the step's item count average it over micro-batches.
        loss_sum = ce_sum + out.aux_loss * n
        return loss_sum, {"aux_loss": out.aux_loss.detach()}


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                temperature: float = 1.0) -> tuple[torch.Tensor, object]:
    """Log-probability of each labelled token (0 where the label is -100): [rows, L], and the model output.

    batch["labels"] may cover only the LAST L positions of input_ids (GRPO: the completion after the prompt);
    then only those L positions get logits (logits_to_keep), none is computed for the prompt. `temperature`
    divides the logits first: the log-probs of the distribution a sampler at that temperature drew from.
    The log-softmax runs in fp32 a chunk of positions at a time (token_cross_entropy), so no fp32 copy of
    the whole [rows, L, vocab] logits is made at once: with policy and reference on both sides of DPO pairs,
    or on every GRPO completion, those copies are what runs out of memory first.
    """
    labels = batch["labels"]
    keep = labels.shape[1] if labels.shape[1] < batch["input_ids"].shape[1] else 0
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_to_keep=keep)
    logits = out.logits if temperature == 1.0 else out.logits / temperature
    return -token_cross_entropy(logits, labels), out


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, object]:
    """Log-probability of each row's labelled tokens, SUMMED over those tokens (not averaged, and padding
    or the prompt, labelled -100, adds nothing): [rows]. Also returns the model output (for aux_loss)."""
    logps, out = token_logps(model, batch)
    return logps.sum(-1), out


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses from summed sequence log-probs, and the implicit rewards
    beta * (log pi - log pi_ref) of the chosen and rejected sides.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    sigmoid (DPO, Rafailov et al. 2023; with label_smoothing = conservative DPO / cDPO):
        loss = -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)
    ipo (Azar et al. 2023, eq. 17): loss = (h - 1 / (2 * beta))^2 on the unscaled log-ratio difference h, as in
        the paper, of the same summed log-probs as DPO (TRL divides each side's log-prob by its token count for
        IPO).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        logits = beta * h
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


class DPOObjective(Objective):
    """Direct preference optimisation on pair_collate batches (B chosen rows, then B rejected rows).

    One item = one pair. The reference log-probs come from batch["ref_logps"] when precomputed, else from
    `ref_model`, frozen, run under no_grad in eval mode (and under the caller's autocast, like the policy).
    """

    eval_metrics = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")

    def __init__(self, ref_model: torch.nn.Module | None, beta: float, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid") -> None:
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
        self.ref_model, self.beta, self.label_smoothing, self.loss_type = ref_model, beta, label_smoothing, loss_type

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        if self.ref_model is None:
            raise ValueError("DPOObjective: no reference model and the batch carries no precomputed 'ref_logps'")
        self.ref_model.eval()
        with torch.no_grad():
            return sequence_logps(self.ref_model, batch)[0]

    def __call__(self, model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.num_items(batch)
        policy, out = sequence_logps(model, batch)
        ref = self.reference_logps(batch)
        losses, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta,
                                            self.label_smoothing, self.loss_type)
        margin = chosen - rejected
        metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/margin": margin.mean(), "rewards/accuracy": (margin > 0).float().mean()}
        return losses.sum() + out.aux_loss * n, metrics
