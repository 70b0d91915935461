#!/usr/bin/env python
"""Parameter counts and training-memory estimates of the presets and of open models, computed with the model
code (built on the meta device: no memory, any size). Prints the README's table of them.

    python scripts/model_sizes.py                 # the markdown table
    python scripts/model_sizes.py --batch_size 4  # activations for another per-GPU batch

Memory of full training with AdamW, per replica (divide the first part by the process count with --fsdp):
  states       16 bytes per parameter: fp32 weights, fp32 gradients, Adam's two fp32 moments
  activations  kept for backward at --batch_size rows of max_seq_len tokens under bf16 autocast, with flash
               attention: about 34 x dim bytes per token per layer (Korthikanti et al. 2022, "Reducing
               activation recomputation", eq. 2 without the attention-score term), plus the logits in bf16
               and fp32 (6 bytes x vocab per token). --grad_checkpointing keeps only each block's input
               (2 x dim bytes per token per layer) plus one block's activations.
These are estimates for planning, not measurements; CUDA's allocator and workspaces add a few GB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402
from model.config import PRESETS, config_from_preset  # noqa: E402

GB = 1e9
# Open models for --init_from, as their config.json on the Hub describes them (the fields that size them).
OPEN_MODELS: dict[str, dict] = {
    "Qwen2.5-0.5B": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                         qkv_bias=True, tie_word_embeddings=True, max_seq_len=32768),
    "Qwen2.5-1.5B": dict(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960,
                         qkv_bias=True, tie_word_embeddings=True, max_seq_len=32768),
    "Qwen2.5-7B": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944,
                       qkv_bias=True, tie_word_embeddings=False, max_seq_len=32768),
    "Llama-3.1-8B": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                         tie_word_embeddings=False, max_seq_len=131072, rope_theta=5e5),
}
TRAIN_LEN = 2048  # the sequence length the open models' rows assume (their max_seq_len is their context)


def count(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the model `config` describes."""
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_params(), model.num_params(active=True)


def memory(config: ModelConfig, params: int, batch_size: int, seq_len: int, checkpointing: bool) -> tuple[float, float]:
    """(optimizer-state bytes, activation bytes) of full AdamW training, see the module docstring."""
    tokens = batch_size * seq_len
    per_layer = (2 if checkpointing else 34) * config.dim * tokens
    block = 34 * config.dim * tokens if checkpointing else 0
    return 16.0 * params, config.n_layers * per_layer + block + 6.0 * config.vocab_size * tokens


def hardware(params: int, states_gb: float, activations_gb: float) -> str:
    """What to train it on: small models by compute (a CPU does millions of parameters), larger ones by memory
    (states + checkpointed activations, a few GB of margin)."""
    if params < 10e6:
        return "a laptop CPU (minutes)"
    if params < 50e6:
        return "a strong CPU (hours) or any GPU"
    if states_gb + activations_gb < 20:
        return "one 24 GB GPU"
    if states_gb + activations_gb < 70:
        return "one 80 GB GPU"
    return f"`--fsdp` over {max(2, -int(-states_gb // (70 - activations_gb)))}+ 80 GB GPUs"


def rows(batch_size: int) -> list[str]:
    out = []
    configs = [(f"`{name}`", config_from_preset(name, **({} if name == "tiny" else {"vocab_size": 6400})), None)
               for name in PRESETS]
    configs += [(f"{name} (`--init_from`)", ModelConfig(**fields), TRAIN_LEN) for name, fields in OPEN_MODELS.items()]
    for label, config, seq_len in configs:
        total, active = count(config)
        seq_len = seq_len or config.max_seq_len
        states, acts = memory(config, total, batch_size, seq_len, checkpointing=False)
        _, acts_ckpt = memory(config, total, batch_size, seq_len, checkpointing=True)
        shape = f"{config.dim} × {config.n_layers}"
        if config.use_moe:
            shape += f", {config.n_routed_experts} experts, top-{config.num_experts_per_tok}"
        size = f"{total / 1e6:,.1f} M" + (f" ({active / 1e6:,.1f} M active)" if active != total else "")
        out.append(f"| {label} | {shape} | {config.n_heads} / {config.n_kv_heads} | {config.vocab_size:,} | {size} | "
                   f"{states / GB:,.1f} | {seq_len:,} | {acts / GB:,.1f} ({acts_ckpt / GB:,.1f}) | "
                   f"{hardware(total, states / GB, acts_ckpt / GB)} |")
    return out


def table(batch_size: int = 8) -> str:
    head = ["| model | dim × layers | heads / kv heads | vocab | parameters | weights + grads + AdamW, GB | "
            f"row length | activations at batch {batch_size}, GB (with `--grad_checkpointing`) | wants |",
            "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows(batch_size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per GPU for the activation estimate (default: 8).")
    print(table(parser.parse_args(argv).batch_size))


if __name__ == "__main__":
    main()
