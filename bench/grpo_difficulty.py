#!/usr/bin/env python
"""Which tasks can GRPO learn from? Each skill of dataset/make_samples.py, asked of a chat model: how often its
sampled answers are right, and how many prompts get a group with both right and wrong answers (only those carry
a gradient: a group whose completions all score the same has advantage 0).

    python bench/grpo_difficulty.py --model out/sft/final            # every skill, 48 prompts x 8 samples each
    python bench/grpo_difficulty.py --model out/sft/final --record

A skill where the model is right a third to two thirds of the time is where RL has the most to work with.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import torch

from common import ROOT, HelpFormatter, load_after, machine_line, report

sys.path.insert(0, str(ROOT / "dataset"))
import make_samples  # noqa: E402

from data import left_pad, load_tokenizer, pad_token_id, render_prompt, stop_token_ids  # noqa: E402
from model import Transformer  # noqa: E402
from model.generate import generate_answers  # noqa: E402
from trainer.rewards import is_correct  # noqa: E402

WORDS = ["crown", "king", "sword", "night", "love", "death", "queen", "heart", "blood", "honour", "grace",
         "lord", "fool", "ghost", "storm", "tears", "crow", "fair", "gold", "time"]


def skills() -> dict[str, object]:
    """name -> a function rng -> (messages, answer) for every skill the sample data is made of."""
    def plain(fn, with_words=False):
        def make(rng):
            q, good, _ = fn(rng, WORDS) if with_words else fn(rng)
            answer = re.findall(r"-?\d+", good)[-1] if re.search(r"\d", good) else re.findall(r"'([^']*)'", good)[-1]
            return [{"role": "user", "content": q}], answer
        return make

    def think(rng):
        expr, _, ans = make_samples.two_step(rng)
        return [{"role": "system", "content": make_samples.THINK_SYSTEM},
                {"role": "user", "content": f"What is {expr}?"}], str(ans)

    return {"add (to 50)": plain(make_samples.skill_add), "sub (to 60)": plain(make_samples.skill_sub),
            "add (to 10)": plain(lambda rng: make_samples.skill_add(rng, 10)),
            "sub (to 10)": plain(lambda rng: make_samples.skill_sub(rng, 10)),
            "mul (to 12 x 12)": plain(make_samples.skill_mul), "upper": plain(make_samples.skill_upper, True),
            "reverse": plain(make_samples.skill_reverse, True), "count": plain(make_samples.skill_count, True),
            "two_step (think)": think}


@torch.no_grad()
def pass_rates(model, tokenizer, make, n_prompts: int, n_samples: int, temperature: float, seed: int
               ) -> list[float]:
    rng = random.Random(seed)
    rows = [make(rng) for _ in range(n_prompts)]
    stop = stop_token_ids(tokenizer, model.config.eos_token_id, model.generation_config)
    prompts = [render_prompt(tokenizer, messages)[1] for messages, _ in rows for _ in range(n_samples)]
    ids, mask = left_pad(prompts, pad_token_id(tokenizer))
    torch.manual_seed(seed)
    tokens, kept = generate_answers(model, ids, mask, 64, stop, temperature=temperature)
    texts = [tokenizer.decode(t[:int(k.sum())], skip_special_tokens=True) for t, k in zip(tokens, kept)]
    right = [is_correct(text, rows[i // n_samples][1]) for i, text in enumerate(texts)]
    return [sum(right[i:i + n_samples]) / n_samples for i in range(0, len(right), n_samples)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="out/sft/final", help="the chat model folder (GRPO's --init_from)")
    p.add_argument("--prompts", type=int, default=48, help="prompts per skill")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO's --num_generations)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (GRPO's --temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the sampling")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()

    model = Transformer.from_pretrained(Path(args.model)).eval()
    tokenizer = load_tokenizer(args.model)
    rows = []
    for name, make in skills().items():
        rates = pass_rates(model, tokenizer, make, args.prompts, args.samples, args.temperature, args.seed)
        mixed = sum(0 < r < 1 for r in rates) / len(rates)
        rows.append(f"| {name} | {sum(rates) / len(rates):.0%} | {mixed:.0%} |")
    lines = [f"GRPO difficulty of each skill for {args.model}: {args.prompts} prompts x {args.samples} samples at "
             f"temperature {args.temperature} — {machine_line(torch.device('cpu'))}", "",
             "| skill | answers right | prompts whose group is mixed (right and wrong) |", "|---|---|---|", *rows,
             "", load_after()]
    report(lines, args.record)


if __name__ == "__main__":
    main()
