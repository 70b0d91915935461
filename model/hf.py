"""Model folders in Hugging Face format: save_pretrained and from_pretrained (Transformer's methods of those
names delegate here), weight reading (single-file or sharded, any float dtype), and the exact
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
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig

if TYPE_CHECKING:  # model.py imports this module, so the class comes in as an argument, not an import
    from .model import Transformer

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight",
          "k_norm.weight")
_IGNORED = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved; recomputed here


def file_not_folder(path: str | Path) -> str:
    """Said when a single file is named where a model or checkpoint folder is expected ('' when `path` is no file):
    a .pt/.pth state dict (MiniMind's, nanoGPT's) holds weights without the architecture that reads them."""
    if not Path(path).is_file():
        return ""
    return (f"{path} is a file, not a model folder (config.json + model.safetensors, as train.py and transformers' "
            f"save_pretrained write): a bare weights file, such as a .pt or .pth state dict, cannot be read here; "
            f"convert it to a Hugging Face folder with its project's tools, then name that folder")


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


# ----------------------------------------------------------------------------- model folders


def save_pretrained(model: Transformer, save_dir: str | Path) -> None:
    """Write config.json (HF format), model.safetensors and generation_config.json.

    The weights go out in the layout of config.hf_model_type's transformers class (to_hf_state); the tied
    lm_head.weight is left out, as transformers does (it re-ties on load). generation_config.json keeps
    what an imported model came with (several eos ids, sampling defaults).
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    c = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    state = {k: v.contiguous() for k, v in to_hf_state(state, c).items()}
    dtype = next(model.parameters()).dtype
    save_file(state, str(save_dir / WEIGHTS), metadata={"format": "pt"})
    config = c.to_hf_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    (save_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
           **(model.generation_config or {})}
    (save_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def from_pretrained(
    model_class: type[Transformer],
    model_dir: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Load a folder written by save_pretrained, or a transformers Llama / Qwen2 / Qwen3 / Qwen2-MoE /
    Qwen3-MoE folder (one model.safetensors or shards with model.safetensors.index.json, any float dtype),
    into a model_class (Transformer or a subclass).

    dtype None gives fp32 (safe for training); pass torch.bfloat16 or a name of DTYPE_NAMES for inference.
    Every user-facing problem (missing file, bad JSON, an architecture we cannot compute, truncated
    weights, shape mismatch) raises one error that names the file and what to do.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(file_not_folder(model_dir) or f"{model_dir}: no such model folder (expected "
                                "config.json + model.safetensors)")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: file missing; a model folder needs config.json + model.safetensors")
    try:
        config = ModelConfig.from_hf_dict(json.loads(config_path.read_text()))
        config.validate()
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    weights = weight_files(model_dir)
    where = weights[0] if len(weights) == 1 else model_dir / INDEX
    state = from_hf_state(read_weights(model_dir), config, where)

    # Built on the meta device (no memory, no random init: that takes minutes for billions of parameters),
    # then the loaded tensors are assigned to it.
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: does not match {config_path}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; "
            "the weights and config.json come from different models"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(expected[name].shape)} from {config_path} "
                f"(dim={config.dim}, vocab_size={config.vocab_size}, "
                f"n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, hidden_dim={config.hidden_dim}); "
                "the weights and config.json come from different models"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: {name} is stored as {tensor.dtype}; quantized checkpoints are not "
                             "supported (use the float16/bfloat16/float32 release of the model)")
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        try:
            model.generation_config = json.loads(generation.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{generation}: not valid JSON ({e})") from None
    if dtype is None:
        dtype = torch.float32
    elif isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    return model.to(device=device, dtype=dtype)


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch.dtype a from_pretrained dtype name such as "bf16" or "bfloat16" stands for."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]
