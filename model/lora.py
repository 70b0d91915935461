"""LoRA (Hu et al. 2021, arXiv 2106.09685), handwritten: a low-rank update trained over a frozen model.

A wrapped projection computes  y = x W^T + (dropout(x) A^T B^T) * alpha / r,  with W frozen and only
A [r, in] and B [out, r] trained. B starts at zero, so training starts exactly at the base model;
A starts like nn.Linear (Kaiming uniform), as PEFT does.

The base weight keeps its name (`...q_proj.weight`), and the adapter adds `...q_proj.lora_A.weight`
and `...q_proj.lora_B.weight`. So a wrapped model still loads its base checkpoint, and the adapter is
saved in PEFT's layout (adapter_config.json + adapter_model.safetensors, keys prefixed with
`base_model.model.`): `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`
loads it onto the exported base model. merge_lora folds W + B A * alpha / r into plain nn.Linear
layers: a full model again, with the same logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .cpu_linear import CPULinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the base model's module names


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter under the same name: base checkpoints still load
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> CPULinear:
        """The model's plain CPULinear (with its decode paths) computing the same function (up to
        rounding): W + scaling * B @ A."""
        linear = CPULinear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """'q_proj, v_proj' or a list -> ['q_proj', 'v_proj']."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if t.strip()]


def _is_target(name: str, targets: list[str]) -> bool:
    # PEFT's rule for a list of target_modules: the module's full name is a target or ends with ".target".
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: str | list[str] | tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of `model`, then wrap the target nn.Linear layers in LoRALinear (in place).

    Returns the wrapped module names. Raises ValueError when a target matches no nn.Linear, naming the
    ones that exist: a typo must not silently train nothing.
    """
    targets = parse_targets(targets)
    if not targets:
        raise ValueError("no LoRA target modules given")
    if targets == ["all-linear"]:  # PEFT's shorthand: every linear layer but the output layer
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, nn.Linear) and name != "lm_head"})
    model.requires_grad_(False)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _is_target(name, targets)]
    unmatched = [t for t in targets if not any(_is_target(name, [t]) for name in wrapped)]
    if unmatched:
        available = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target module(s) {', '.join(unmatched)} match no linear layer; "
                         f"this model has: {', '.join(available)}")
    for name in wrapped:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return wrapped


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged CPULinear (in place); returns the model, now a plain one."""
    for name, layer in lora_layers(model).items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    return state


def adapter_config(model: nn.Module, base_model_path: str) -> dict[str, Any]:
    """adapter_config.json for PEFT's LoraConfig (the fields it needs; the rest take PEFT's defaults)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = layers[0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model)}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model_path: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base_model_path), indent=2) + "\n")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Wrap `model` (the base) with the adapter saved in `folder` and load its weights; returns model."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    targets = config["target_modules"]
    apply_lora(model, int(config["r"]), float(config["lora_alpha"]), 0.0,
               parse_targets(targets) if isinstance(targets, str) else targets)
    weights = folder / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(weights))
    except Exception as e:  # missing, truncated or corrupt
        raise ValueError(f"{weights}: cannot read the adapter weights ({e})") from None
    state = {}
    for key, tensor in saved.items():
        name = key.removeprefix(PEFT_PREFIX)
        for ab in ("lora_A", "lora_B"):  # PEFT's in-memory names carry the adapter name; its files do not
            name = name.replace(f".{ab}.default.", f".{ab}.")
        state[name] = tensor
    expected = {k for k in model.state_dict() if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit this base model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}; is base_model_name_or_path in {ADAPTER_CONFIG} the model it was "
                         f"trained on?")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch: another rank or another base model
        raise ValueError(f"{weights}: does not fit this base model ({e})") from None
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters (a tied weight counts once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
