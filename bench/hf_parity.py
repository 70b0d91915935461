#!/usr/bin/env python
"""Hugging Face round trips, measured: for each architecture, the largest |logit difference| (fp32) between our
model and transformers' class, in both directions, and whether greedy generation picks the same tokens.

  export:  our random model (random norm gains and biases too) -> save_pretrained -> AutoModelForCausalLM
  import:  a random model transformers initialises from that config.json (less our "zero2llm" block, as a Hub
           model has none: so a shared expert comes back gated) -> its save_pretrained -> ours

    python bench/hf_parity.py            # prints the table
    python bench/hf_parity.py --record   # and appends it to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch

from common import RESULTS
from model import ModelConfig, Transformer, generate

SIZE = dict(vocab_size=1000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=256, moe_hidden_dim=256,
            n_routed_experts=8, num_experts_per_tok=2)
SHARED = dict(use_moe=True, n_shared_experts=1)
CASES = {
    "Llama, tied embeddings": {},
    "Llama, untied": dict(tie_word_embeddings=False),
    "Llama, attention_bias + mlp_bias": dict(attention_bias=True, mlp_bias=True),
    "Qwen2 (q/k/v bias)": dict(qkv_bias=True, tie_word_embeddings=False),
    "Qwen3 (q/k norm)": dict(qk_norm=True),
    "Qwen3-MoE": dict(use_moe=True, n_shared_experts=0, qk_norm=True),
    "Qwen2-MoE, ungated shared expert (zero gate, 2x down_proj)": SHARED,
    "Qwen2-MoE, gated shared expert, q/k/v bias": dict(**SHARED, shared_expert_gate=True, qkv_bias=True),
    "Qwen3-Next, MoE + shared expert + q/k norm (zero output gate)": dict(**SHARED, qk_norm=True),
    "Llama, YaRN x4": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "Llama, llama3 RoPE x8": dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm gains and biases start at 1 / 0, which would hide a mis-mapped one: draw them at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_((0.0 if name.endswith("bias") else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def same_greedy(ours: Transformer, hf: torch.nn.Module, prompt: torch.Tensor, n: int = 32) -> bool:
    mine = torch.stack(list(generate(ours, prompt, n, temperature=0)), dim=1)
    theirs = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, prompt.shape[1]:]
    return torch.equal(mine, theirs)


def measure(overrides: dict, folder: Path) -> tuple[str, float, float, bool]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    ours = randomized(Transformer(ModelConfig(**{**SIZE, **overrides})), 1)
    ours.save_pretrained(folder / "ours")
    hf = AutoModelForCausalLM.from_pretrained(folder / "ours", dtype=torch.float32).eval()
    x = torch.randint(0, SIZE["vocab_size"], (4, 200), generator=torch.Generator().manual_seed(2))
    export = (logits(hf, x) - logits(ours, x)).abs().max().item()
    greedy = same_greedy(ours, hf, x[:2, :16])

    # What transformers makes of that config.json without our "zero2llm" block (as a Hub model has none).
    config = {k: v for k, v in json.loads((folder / "ours" / "config.json").read_text()).items() if "zero2llm" not in k}
    (folder / "config").mkdir()
    (folder / "config" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    theirs = randomized(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder / "config")), 4)
    if type(theirs).__name__ == "Qwen3NextForCausalLM":  # only gate-free Qwen3-Next attention is ours to compute
        with torch.no_grad():
            for layer in theirs.model.layers:
                q = layer.self_attn.q_proj.weight.view(SIZE["n_heads"], 2, -1, SIZE["dim"])
                q[:, 1].zero_()
    theirs.save_pretrained(folder / "theirs")
    imported = Transformer.from_pretrained(folder / "theirs").eval()
    back = (logits(imported, x) - logits(theirs, x)).abs().max().item()
    greedy = greedy and same_greedy(imported, theirs, x[:2, :16])
    return type(hf).__name__, export, back, greedy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="Append the table to bench/RESULTS.md.")
    args = parser.parse_args(argv)
    import transformers

    lines = [f"HF round trips, fp32 CPU, dim {SIZE['dim']} x {SIZE['n_layers']} layers, vocab {SIZE['vocab_size']}, "
             f"4 x 200 tokens; transformers {transformers.__version__}, torch {torch.__version__}, "
             f"{datetime.date.today()}", "",
             "| architecture | transformers class | max abs dlogits, export | max abs dlogits, import | "
             "greedy 32 tokens equal |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(CASES.items()):
            cls, export, back, greedy = measure(overrides, Path(tmp) / str(i))
            lines.append(f"| {name} | {cls} | {export:.1e} | {back:.1e} | {'yes' if greedy else 'NO'} |")
            print(lines[-1], flush=True)
    if args.record:
        with open(RESULTS, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
