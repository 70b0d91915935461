#!/usr/bin/env python
"""Train-step throughput: our decoder vs transformers' LlamaForCausalLM, same dimensions, same run.

Each implementation runs in its own subprocess (so peak memory is its own), with identical weights
(ours saved, then loaded by transformers), AdamW, random tokens, forward + backward + step.
Reports step time (median), tokens/s, peak memory (RSS on CPU, max allocated on CUDA) and MFU:
FLOPs/token = 6 x (non-embedding params + lm_head) + 12 x layers x heads x head_dim x seq (PaLM,
appendix B; model.estimate_flops_per_token), against a peak measured here with a 2048^2 matmul in
the same dtype (or --peak_tflops, e.g. a GPU datasheet figure).

    python bench/train_throughput.py                       # config S, fp32, CPU
    python bench/train_throughput.py --dtype bfloat16 --record
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import Transformer  # noqa: E402
from model.config import config_from_preset  # noqa: E402
from trainer.distributed import resolve_device  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config S of the performance issue: dim 512, 8 layers, 8 heads, 2 KV heads, SwiGLU 1408, vocab 6400.
CONFIGS = {"S": dict(preset="26m", vocab_size=6400, max_seq_len=512)}


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(args: argparse.Namespace) -> dict:
    """One implementation, in this process: median step time over args.steps after args.warmup."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    if args.impl == "ours":
        model = Transformer.from_pretrained(args.weights)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.weights, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    cfg = json.loads((Path(args.weights) / "config.json").read_text())
    seq, vocab = cfg["max_position_embeddings"], cfg["vocab_size"]
    x = torch.randint(0, vocab, (args.batch_size, seq + 1), device=device)
    inputs, labels = x[:, :-1], x[:, 1:]
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    return {"impl": args.impl, "step_s": step, "tokens_per_s": args.batch_size * seq / step,
            "peak_mb": peak_memory_mb(device), "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="S", choices=CONFIGS, help="model dimensions (see CONFIGS)")
    p.add_argument("--batch_size", type=int, default=8, help="rows of max_seq_len tokens per step")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype (weights stay fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--steps", type=int, default=4, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="peak for MFU (e.g. a GPU datasheet figure); 0 = measure a 2048^2 matmul here")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    p.add_argument("--impl", choices=("ours", "hf"), help=argparse.SUPPRESS)   # internal: one subprocess
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return

    device = resolve_device(args.device)
    spec = dict(CONFIGS[args.config])
    model = Transformer(config_from_preset(spec.pop("preset"), **spec))
    flops_per_token = model.estimate_flops_per_token()
    peak = args.peak_tflops * 1e12 or matmul_peak_flops(DTYPES[args.dtype], device)
    rows = []
    with tempfile.TemporaryDirectory() as weights:
        model.save_pretrained(weights)
        del model
        for impl in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--impl", impl, "--weights", weights, "--dtype", args.dtype,
                   "--device", args.device, "--batch_size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["tokens_per_s"]
    header = (f"train step, config {args.config}, batch {args.batch_size}, {args.dtype}, {device.type} — "
              f"{platform.node() or 'machine'} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}; MFU peak {'given' if args.peak_tflops else 'measured'} "
              f"{peak / 1e9:,.0f} GFLOP/s; {flops_per_token / 1e6:.0f} MFLOP/token")
    lines = [header, "", "| implementation | step (s) | tokens/s | vs transformers | peak memory (MB) | MFU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = "transformers LlamaForCausalLM" if r["impl"] == "hf" else "zero2llm"
        mfu = r["tokens_per_s"] * flops_per_token / peak
        lines.append(f"| {name} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x "
                     f"| {r['peak_mb']:,.0f} | {mfu:.1%} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
