#!/usr/bin/env python
"""Train-step throughput: our trainer's step vs transformers' LlamaForCausalLM, same dimensions, same run.

Implementations (each in its own subprocess, so peak memory is its own; identical weights, random tokens;
compilation happens in the untimed warm-up steps):
  hf             transformers LlamaForCausalLM + F.cross_entropy(logits.float()) + torch.optim.AdamW (its
                 default, foreach) in --dtype: what a user would write
  hf_fused       the same with AdamW(fused=True): separates the optimizer's share of our gain
  ours           our Transformer, CausalLMObjective (chunked fp32 cross-entropy) and Optimizers (fused
                 AdamW): the trainer's step, in --dtype, with malloc set to keep freed memory on CPU as train.py
                 sets it (trainer/memory.py)
  ours_compiled  ours with the trainer's --compile (trainer/parallel.py: each block through torch.compile)
  recipe         ours in the trainer's default dtype (--dtype auto: bfloat16 on CPUs/GPUs with native bf16), with
                 AdamW like the peers
  recipe_muon    recipe with Muon on the hidden matrices: pretraining's default optimizer
  compiled       recipe with --compile
  hf_recipe      transformers in that same default dtype (bf16 autocast): the like-for-like comparison
  minimind       MiniMind's MiniMindForCausalLM (from a MiniMind checkout, --minimind_dir; left out without one)
                 with the step of its train_pretrain.py: its own shifted cross-entropy + aux loss, gradient
                 clipping, torch.optim.AdamW, in fp32 whatever --dtype says, since its script autocasts only on
                 CUDA
Rounds alternate the implementations; "vs hf" is the ratio of step times measured in the same round (median
over rounds). MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6 x (non-embedding params + lm_head) +
6 x layers x heads x head_dim x seq (PaLM appendix B, attention counted causally; Transformer.estimate_flops_per_token) and the peak a
2048^2 matmul measured here in the row's dtype (or --peak_tflops, e.g. a GPU datasheet figure).

    python bench/train_throughput.py                       # config S, fp32 baseline, CPU
    python bench/train_throughput.py --record --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from common import (HelpFormatter, CONFIGS, load_after, machine_line, model_config, peak_memory_mb, ratio_rounds, report,
                    save_weights, timed)
from model import Transformer
from trainer.distributed import DistEnv, resolve_device, resolve_dtype
from trainer.flops import peak_flops
from trainer.memory import keep_freed_memory
from trainer.parallel import parallelize

IMPLS = ("minimind", "hf", "hf_fused", "ours", "ours_compiled", "recipe", "recipe_muon", "compiled", "hf_recipe")
LABELS = {"hf": "transformers LlamaForCausalLM, AdamW", "hf_fused": "transformers LlamaForCausalLM, AdamW fused",
          "ours": "zero2llm trainer step", "ours_compiled": "zero2llm trainer step, --compile",
          "recipe": "zero2llm trainer step, default dtype",
          "recipe_muon": "zero2llm trainer step, default dtype, Muon (pretraining's default)",
          "compiled": "zero2llm trainer step, default dtype, --compile",
          "hf_recipe": "transformers LlamaForCausalLM, AdamW, default dtype",
          "minimind": "MiniMind MiniMindForCausalLM, its train_pretrain.py step"}


def make_step(args: argparse.Namespace) -> tuple[Callable[[], None], torch.device, torch.dtype]:
    """One implementation's training step (args.impl, args.weights, args.run_dtype, args.device,
    args.batch_size): forward, backward, optimizer step on a fixed batch of random tokens."""
    from trainer.config import TrainConfig
    from trainer.optim import Optimizers
    from trainer.objectives import CausalLMObjective

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.run_dtype, device)
    torch.manual_seed(0)
    if args.impl == "minimind":
        return minimind_step(args, device)
    if not args.impl.startswith("hf"):
        if device.type == "cpu":
            keep_freed_memory()  # as train.py does
        model = Transformer.from_pretrained(args.weights).train()
        model = parallelize(model, DistEnv(0, 1, device), fsdp=False, dtype=dtype, grad_checkpointing=False,
                            compile=args.impl.endswith("compiled"))
        optimizer = Optimizers(model, TrainConfig(learning_rate=1e-4, optimizer="muon" if args.impl == "recipe_muon"
                                                  else "adamw"), device)
        objective = CausalLMObjective()

        def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return objective(model, {"input_ids": inputs, "labels": labels})[0] / labels.numel()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.weights, dtype=torch.float32, attn_implementation="sdpa")
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.impl == "hf_fused" or None)

        def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = model(inputs).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    seq = model.config.max_position_embeddings if args.impl.startswith("hf") else model.config.max_seq_len
    x = torch.randint(0, 6400, (args.batch_size, seq + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, device, dtype


def minimind_step(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], None], torch.device,
                                                                           torch.dtype]:
    """MiniMind's model and training step at our config's dimensions (fp32: its script's CPU path)."""
    import importlib.util

    path = Path(args.minimind_dir) / "model" / "model_minimind.py"
    if not path.is_file():
        raise SystemExit(f"--minimind_dir {args.minimind_dir}: no model/model_minimind.py (a MiniMind checkout)")
    spec = importlib.util.spec_from_file_location("model_minimind", path)
    minimind = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minimind)
    ours = json.loads((Path(args.weights) / "config.json").read_text())
    config = minimind.MiniMindConfig(
        hidden_size=ours["hidden_size"], num_hidden_layers=ours["num_hidden_layers"],
        num_attention_heads=ours["num_attention_heads"], num_key_value_heads=ours["num_key_value_heads"],
        intermediate_size=ours["intermediate_size"], vocab_size=ours["vocab_size"])
    model = minimind.MiniMindForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, ours["vocab_size"], (args.batch_size, ours["max_position_embeddings"]), device=device)

    def step() -> None:
        out = model(x, labels=x)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, device, torch.float32


def run_one(args: argparse.Namespace) -> dict:
    """One implementation in this process: the median of args.steps step times after args.warmup."""
    step, device, dtype = make_step(args)
    times = [timed(step, device) for _ in range(args.warmup + args.steps)][args.warmup:]
    return {"step_s": statistics.median(times), "peak_mb": peak_memory_mb(device), "dtype": str(dtype)[6:]}


def measure(impl: str, weights: str, run_dtype: str, args: argparse.Namespace) -> dict:
    """run_one in a fresh subprocess (its own peak memory, no state shared with the other implementations);
    args needs device, batch_size, steps and warmup."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, "--weights", weights, "--run_dtype",
           run_dtype, "--device", args.device, "--batch_size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--minimind_dir", args.minimind_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="S", choices=CONFIGS, help="model dimensions (bench/common.py CONFIGS)")
    p.add_argument("--batch_size", type=int, default=8, help="rows of max_seq_len tokens per step")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the hf, hf_fused and ours rows (autocast; weights stay fp32)")
    p.add_argument("--impls", default="", help=f"comma-separated subset of {', '.join(IMPLS)} (default: all; "
                   f"minimind only with --minimind_dir)")
    p.add_argument("--minimind_dir", default="", help="a MiniMind checkout (github.com/jingyaogong/minimind): adds "
                   "its model and training step as the minimind row")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every implementation once")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="peak for MFU (e.g. a GPU datasheet figure); 0 = a 2048^2 matmul measured here per dtype")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # internal: one subprocess
    p.add_argument("--run_dtype", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return

    device = resolve_device(args.device)
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if i != "minimind" or args.minimind_dir]
    if "minimind" in impls and not args.minimind_dir:
        p.error("the minimind row needs --minimind_dir, a MiniMind checkout")
    config = model_config(args.config)
    flops_per_token = Transformer(config).estimate_flops_per_token()
    tokens = args.batch_size * config.max_seq_len
    machine = machine_line(device)
    times: dict[str, list[float]] = {name: [] for name in impls}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as weights:
        save_weights(config, Path(weights))
        for _ in range(args.rounds):
            for impl in impls:
                run_dtype = ("auto" if impl in ("recipe", "recipe_muon", "compiled", "hf_recipe") else
                             "float32" if impl == "minimind" else args.dtype)
                out = measure(impl, weights, run_dtype, args)
                times[impl].append(out["step_s"])
                results[impl] = {**out, "peak_mb": max(out["peak_mb"], results.get(impl, {}).get("peak_mb", 0))}
    baseline = "hf" if "hf" in impls else impls[0]
    ratios = ratio_rounds(times, baseline)
    peaks = {d: peak_flops(device, getattr(torch, d), args.peak_tflops) for d in {r["dtype"] for r in results.values()}}
    peak_text = ", ".join(f"{d} {v / 1e9:,.0f} GFLOP/s" for d, v in sorted(peaks.items()))
    lines = [f"train step, config {args.config}, batch {args.batch_size} x {config.max_seq_len}, {device.type}, "
             f"{args.rounds} rounds x {args.steps} steps — {machine} ({load_after()}); "
             f"MFU peak {'given' if args.peak_tflops else 'measured'}: {peak_text}; "
             f"{flops_per_token / 1e6:.0f} MFLOP/token (6N + attention)",
             "", f"| implementation | dtype | step (s) | tokens/s | vs {baseline} | peak memory (MB) | MFU |",
             "|---|---|---|---|---|---|---|"]
    for impl in impls:
        r = results[impl]
        step = statistics.median(times[impl])
        mfu = tokens / step * flops_per_token / peaks[r["dtype"]]
        lines.append(f"| {LABELS[impl]} | {r['dtype']} | {step:.2f} | {tokens / step:,.0f} | {ratios[impl]:.2f}x "
                     f"| {r['peak_mb']:,.0f} | {mfu:.1%} |")
    targets = [(base, impl, what) for base, impl, what in (
        ("minimind", "recipe", "the default step (bf16) vs MiniMind's (its CPU path, fp32)"),
        ("hf_recipe", "recipe", "vs transformers under the same bf16 autocast"),
        ("minimind", "recipe_muon", "the default pretraining step (bf16, Muon) vs MiniMind's"),
        ("recipe", "recipe_muon", "Muon's step vs AdamW's"),
        ("hf", "ours", f"{args.dtype} vs transformers {args.dtype}")) if base in impls and impl in impls]
    if targets:
        lines += [""] + [f"- {what}: {ratio_rounds(times, base)[impl]:.2f}x" for base, impl, what in targets]
    report(lines, args.record)


if __name__ == "__main__":
    main()
