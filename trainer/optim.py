"""The optimizers: AdamW for every parameter, or Muon for the hidden matrices and AdamW for the rest.

    --optimizer adamw   AdamW; weight decay on matrices only (decaying norm gains and biases just hurts)
    --optimizer muon    torch.optim.Muon (momentum, then the update orthogonalised by Newton-Schulz) on the 2-D
                        matrices inside the blocks, at --muon_learning_rate; AdamW, as above, on the embeddings, the
                        lm_head, norms and biases, at --learning_rate. The split of nanochat and modded-nanoGPT:
                        Muon's orthogonalised step suits hidden matrices, not a lookup table or the output layer.

The loop and the checkpoints see one Optimizers object; the learning rate of every group is set before each step
from its peak (`peak_lr`) and the schedule's multiplier.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """A 2-D weight inside the blocks (attention and MLP projections, router): what Muon updates."""
    return p.dim() == 2 and "embed_tokens" not in name and not name.startswith("lm_head")


class Optimizers:
    """The optimizers of one run, stepped together. Group order is fixed (the checkpoint relies on it): AdamW's
    [decayed matrices, norms and biases], then Muon's [hidden matrices] if any."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        muon = [p for n, p in named if is_hidden_matrix(n, p)] if cfg.optimizer == "muon" else []
        rest = [p for n, p in named if id(p) not in {id(m) for m in muon}]
        # fused=True: one kernel reads and writes each parameter, gradient and moment once per step instead of one
        # pass per elementwise op (bench/RESULTS.md has the difference on CPU).
        self.adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2]},
                                        {"params": [p for p in rest if p.dim() < 2]}],
                                       lr=cfg.learning_rate, fused=device.type in ("cuda", "cpu"))
        self.muon = torch.optim.Muon(muon, lr=cfg.muon_learning_rate) if muon else None
        self.parts = [self.adamw] + ([self.muon] if self.muon else [])
        self.apply_hyperparameters(cfg)

    def apply_hyperparameters(self, cfg: TrainConfig) -> None:
        """The flags' peak learning rates, weight decay and betas on every group: at the start, and after a resume
        restored the saved ones, so that a changed flag takes effect."""
        for i, group in enumerate(self.adamw.param_groups):
            group.update(peak_lr=cfg.learning_rate, weight_decay=cfg.weight_decay if i == 0 else 0.0,
                         betas=(cfg.beta1, cfg.beta2))
        for group in self.muon.param_groups if self.muon else []:
            group.update(peak_lr=cfg.muon_learning_rate, weight_decay=cfg.weight_decay)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts for g in part.param_groups]

    def set_lr(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * multiplier

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for part in self.parts:
            scaler.unscale_(part)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        for part in self.parts:
            scaler.step(part) if scaler is not None else part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state dict as it is (the format of AdamW-only checkpoints), or every part's."""
        return self.adamw.state_dict() if self.muon is None else {"parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["parts"] if "parts" in state else [state]
        if len(saved) != len(self.parts):
            raise ValueError(f"it was saved with --optimizer {'muon' if len(saved) > 1 else 'adamw'}")
        for part, part_state in zip(self.parts, saved):
            part.load_state_dict(part_state)
