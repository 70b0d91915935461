"""Weights in Hugging Face layouts: reading (single-file or sharded, any float dtype) and the exact
re-parameterisations that let transformers' classes compute what our model computes.

Most exports are a renaming at most (our parameter names are Llama's / Qwen's). Three are not:

    q/k/v-only bias (qkv_bias) as Llama / Qwen3 / Qwen3-MoE / Qwen3-Next attention_bias:
        add o_proj.bias = 0.
    shared experts as Qwen2-MoE / Qwen3-Next (which gate them: sigmoid(g . x) * shared(x)):
        mlp.shared_experts.* -> mlp.shared_expert.*; an ungated one gets g = 0 (sigmoid(0) = 1/2
        exactly) and 2 * down_proj; no shared expert at all is one of width 0.
    Qwen3-Next (attention output gate, (1 + w) RMSNorms):
        q_proj rows interleaved per head with zero gate rows (sigmoid(0) = 1/2) and 2 * o_proj;
        every RMSNorm weight w written as w - 1.
Doubling and halving are exact in floating point, so are zeros; w - 1 + 1 == w for w >= 0.5
(the usual range of norm gains), off by an ulp below. `from_hf_state` undoes each step and
refuses weights that the simpler model cannot express (a non-zero gate or bias it would drop).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ModelConfig

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight",
          "k_norm.weight")
_IGNORED = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved; recomputed here


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index names."""
    index = model_dir / INDEX
    if (model_dir / WEIGHTS).is_file() or not index.is_file():
        return [model_dir / WEIGHTS]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: cannot be read ({e}); re-copy the checkpoint") from None
    return [model_dir / name for name in sorted(set(weight_map.values()))]


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), in their stored dtype; errors name the file."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file missing; a model folder needs config.json + model.safetensors "
                                    f"(or the shards listed in {INDEX})")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read the weights, the file is truncated or corrupt ({e}); "
                             "re-save or re-copy the checkpoint") from None
    return {k: v for k, v in state.items() if not k.endswith(_IGNORED)}


def _pads_o_bias(config: ModelConfig) -> bool:
    return config.qkv_bias and config.hf_model_type in ("llama", "qwen3", "qwen3_moe", "qwen3_next")


def _layer_keys(state: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return [k for k in state if k.endswith(suffix)]


def to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the tensors transformers' class for config.hf_model_type expects (see module doc)."""
    model_type, out = config.hf_model_type, dict(state)
    if _pads_o_bias(config):
        for key in _layer_keys(state, "self_attn.o_proj.weight"):
            out[key.removesuffix("weight") + "bias"] = state[key].new_zeros(state[key].shape[0])
    if model_type in ("qwen2_moe", "qwen3_next"):
        out = {k.replace(".mlp.shared_experts.", ".mlp.shared_expert."): v for k, v in out.items()}
        for i in range(config.n_layers):
            prefix = f"model.layers.{i}.mlp."
            ref = out[prefix + "gate.weight"]
            if config.n_shared_experts == 0:  # a shared expert of width 0 adds exactly nothing
                out[prefix + "shared_expert.gate_proj.weight"] = ref.new_zeros(0, config.dim)
                out[prefix + "shared_expert.up_proj.weight"] = ref.new_zeros(0, config.dim)
                out[prefix + "shared_expert.down_proj.weight"] = ref.new_zeros(config.dim, 0)
            if not config.shared_expert_gate:
                out[prefix + "shared_expert_gate.weight"] = ref.new_zeros(1, config.dim)
                out[prefix + "shared_expert.down_proj.weight"] = 2 * out[prefix + "shared_expert.down_proj.weight"]
    if model_type == "qwen3_next":
        H, hd = config.n_heads, config.head_dim
        for key in _layer_keys(out, "self_attn.q_proj.weight") + _layer_keys(out, "self_attn.q_proj.bias"):
            q = out[key].view(H, hd, -1) if key.endswith("weight") else out[key].view(H, hd, 1)
            out[key] = torch.cat([q, torch.zeros_like(q)], dim=1).reshape(2 * H * hd, *out[key].shape[1:])
        for key in _layer_keys(out, "self_attn.o_proj.weight"):
            out[key] = 2 * out[key]
        for key in [k for k in out if k.endswith(_NORMS)]:
            out[key] = out[key] - 1
    return out


def from_hf_state(state: dict[str, torch.Tensor], config: ModelConfig, source: Path) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state for a folder of config.hf_model_type. Raises ValueError, naming `source`, when a
    tensor the conversion drops is not zero (the model would not compute what the folder computes)."""
    model_type, out = config.hf_model_type, dict(state)

    def drop_zero(key: str, what: str) -> None:
        tensor = out.pop(key, None)
        if tensor is not None and tensor.count_nonzero():
            raise ValueError(f"{source}: {key} is not zero, but {what}; this model cannot compute what the "
                             f"checkpoint computes")

    if model_type == "qwen3_next":
        H, hd = config.n_heads, config.head_dim
        for key in [k for k in out if k.endswith(_NORMS)]:
            out[key] = out[key] + 1
        for key in _layer_keys(out, "self_attn.o_proj.weight"):
            out[key] = out[key] / 2
        for key in _layer_keys(out, "self_attn.q_proj.weight") + _layer_keys(out, "self_attn.q_proj.bias"):
            q = out[key].view(H, 2 * hd, -1)
            if q[:, hd:].count_nonzero():
                raise ValueError(f"{source}: {key} has a non-zero attention output gate; Qwen3-Next's gated "
                                 "attention is not implemented (only zero2llm's exports, whose gates are zero, load)")
            out[key] = q[:, :hd].reshape(H * hd, *out[key].shape[1:])
    if model_type in ("qwen2_moe", "qwen3_next"):
        for i in range(config.n_layers):
            prefix = f"model.layers.{i}.mlp."
            if config.n_shared_experts == 0:
                for name in ("gate_proj", "up_proj", "down_proj", "gate"):
                    out.pop(f"{prefix}shared_expert{'_' if name == 'gate' else '.'}{name}.weight", None)
            elif not config.shared_expert_gate:
                drop_zero(prefix + "shared_expert_gate.weight",
                          "config.json's zero2llm block says the shared expert is ungated (delete that block's "
                          "shared_expert_gate to load it as gated)")
                key = prefix + "shared_expert.down_proj.weight"
                if key in out:
                    out[key] = out[key] / 2
        out = {k.replace(".mlp.shared_expert.", ".mlp.shared_experts."): v for k, v in out.items()}
    if _pads_o_bias(config):
        for key in _layer_keys(state, "self_attn.o_proj.bias"):
            drop_zero(key, "config.json's zero2llm block says only q/k/v have biases (qkv_bias)")
    return out
