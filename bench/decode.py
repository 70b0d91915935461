#!/usr/bin/env python
"""Decode throughput: eval_model's generation (model/generate.py) vs transformers' generate, same weights.

Greedy, a fixed number of new tokens (no early stop), batch 1 and batch 8, random 32-token prompts, the same
dtype for both. Rounds alternate ours and transformers; the ratio is taken within each round (median over
rounds). The generated tokens are compared: the two must produce the same sequence.

    python bench/decode.py                  # config S, fp32, CPU, batch 1 and 8, 256 new tokens
    python bench/decode.py --record         # append the table to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from common import CONFIGS, machine_line, model_config, ratio_rounds, record, save_weights, timed
from model import Transformer, generate
from trainer.distributed import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="S", choices=CONFIGS, help="model dimensions (bench/common.py CONFIGS)")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new_tokens", type=int, default=256, help="tokens generated per row (greedy, no early stop)")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype of both models")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs ours and transformers once)")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    config = model_config(args.config)
    with tempfile.TemporaryDirectory() as folder:
        save_weights(config, Path(folder))
        ours = Transformer.from_pretrained(folder, device=device, dtype=dtype).eval()
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of new tokens for both
    n = args.new_tokens
    machine = machine_line(device)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = torch.randint(3, config.vocab_size, (batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(batch)).to(device)
        out: dict[str, torch.Tensor] = {}

        def run_ours() -> None:
            out["ours"] = torch.stack(list(generate(ours, prompt, n, temperature=0)), dim=1)

        @torch.inference_mode()
        def run_hf() -> None:
            out["hf"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, pad_token_id=0)[:, args.prompt_len:]

        runs = {"hf": run_hf, "ours": run_ours}
        for fn in runs.values():  # warm-up: kernel selection, allocator
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, device))
        ratios = ratio_rounds(times, "hf")
        same = torch.equal(out["ours"], out["hf"])
        for name in runs:
            tok_s = batch * n / statistics.median(times[name])
            label = "transformers generate" if name == "hf" else "zero2llm generate (eval_model)"
            rows.append(f"| {batch} | {label} | {tok_s:,.0f} | {ratios[name]:.2f}x | "
                        f"{'yes' if same else 'NO'} |")
    lines = [f"decode, config {args.config}, {args.dtype}, {device.type}, greedy, {args.prompt_len}-token prompts "
             f"+ {n} new tokens, {args.rounds} rounds — {machine} (load after: {machine_line(device).rsplit(' ', 1)[-1]})",
             "", "| batch | implementation | new tokens/s | vs transformers | same tokens |", "|---|---|---|---|---|",
             *rows]
    print("\n".join(lines))
    if args.record:
        record(lines)


if __name__ == "__main__":
    main()
