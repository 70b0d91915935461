#!/usr/bin/env python
"""Decode throughput: eval_model's generation (model/generate.py) vs transformers' generate, same weights.

Greedy, a fixed number of new tokens (no early stop), batch 1 and batch 8, random 32-token prompts.
Implementations: transformers' generate in fp32 (what `from_pretrained(folder).generate(...)` does with our
fp32 checkpoints: the baseline) and in eval_model's default dtype (--dtype auto: bf16 on CPUs with native
bf16); ours in both dtypes, eager and with --compile (the decode step through torch.compile; compilation
happens in the untimed warm-up). Rounds alternate the implementations; "vs transformers fp32" is the ratio
measured within each round (median over rounds). "same tokens" compares each row's sequence with
transformers' in the same dtype (fp32 must match exactly; bf16 rounds differently in different kernels, so a
near-tie can flip a token and everything after it).

    python bench/decode.py                  # config S, CPU, batch 1 and 8, 256 new tokens
    python bench/decode.py --record         # append the table to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from common import HelpFormatter, CONFIGS, load_after, machine_line, model_config, ratio_rounds, report, save_weights, timed
from model import Transformer, generate
from trainer.distributed import resolve_device, resolve_dtype



def same_tokens(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    """'yes', or where the first row that differs first differs."""
    if torch.equal(ours, theirs):
        return "yes"
    row = int((ours != theirs).any(-1).nonzero()[0])
    return f"no (row {row} from token {int((ours[row] != theirs[row]).nonzero()[0])})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="S", choices=CONFIGS, help="model dimensions (bench/common.py CONFIGS)")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new_tokens", type=int, default=256, help="tokens generated per row (greedy, no early stop)")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs ours and transformers once)")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    device = resolve_device(args.device)
    auto = resolve_dtype("auto", device)
    config = model_config(args.config)
    with tempfile.TemporaryDirectory() as folder:
        save_weights(config, Path(folder))
        ours = {dtype: Transformer.from_pretrained(folder, device=device, dtype=dtype).eval().requires_grad_(False)
                for dtype in {torch.float32, auto}}  # frozen and in eval mode, as eval_model loads a model
        hf = {dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
              for dtype in {torch.float32, auto}}
    for model in hf.values():
        model.generation_config.eos_token_id = None  # a fixed number of new tokens for both
    n, machine, rows = args.new_tokens, machine_line(device), []
    impls = {  # name: (label, dtype, compiled)
        "hf": ("transformers generate", torch.float32, False),
        "ours": ("zero2llm generate (eval_model)", torch.float32, False),
        "ours_compiled": ("zero2llm generate (eval_model --compile)", torch.float32, True),
        "hf_auto": ("transformers generate", auto, False),
        "auto": ("zero2llm generate (eval_model)", auto, False),
        "auto_compiled": ("zero2llm generate (eval_model --compile)", auto, True),
    }
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = torch.randint(3, config.vocab_size, (batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(batch)).to(device)
        out: dict[str, torch.Tensor] = {}

        def runner(name: str) -> Callable[[], None]:
            _, dtype, compiled = impls[name]
            if name.startswith("hf"):
                @torch.inference_mode()
                def run() -> None:
                    out[name] = hf[dtype].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                   min_new_tokens=n, do_sample=False,
                                                   pad_token_id=0)[:, args.prompt_len:]
            else:
                def run() -> None:
                    steps = generate(ours[dtype], prompt, n, temperature=0, compile=compiled)
                    out[name] = torch.stack(list(steps), dim=1)
            return run

        runs = {name: runner(name) for name in impls}
        for fn in runs.values():  # warm-up: kernel selection, allocator, compilation
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, device))
        ratios = ratio_rounds(times, "hf")
        for name, (label, dtype, _) in impls.items():
            tok_s = batch * n / statistics.median(times[name])
            reference = out["hf" if dtype == torch.float32 else "hf_auto"]
            rows.append(f"| {batch} | {label} | {str(dtype).removeprefix('torch.')} | {tok_s:,.0f} | "
                        f"{ratios[name]:.2f}x | {same_tokens(out[name], reference)} |")
    lines = [f"decode, config {args.config}, {device.type}, greedy, {args.prompt_len}-token prompts "
             f"+ {n} new tokens, {args.rounds} rounds — {machine} ({load_after()})", "",
             "| batch | implementation | dtype | new tokens/s | vs transformers fp32 | same tokens as transformers |",
             "|---|---|---|---|---|---|",
             *rows]
    report(lines, args.record)


if __name__ == "__main__":
    main()
