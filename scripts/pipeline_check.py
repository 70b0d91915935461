#!/usr/bin/env python
"""Did a pipeline stage work? Greedy answers to held-out data, before vs after the stage.

    python scripts/pipeline_check.py --before out/pretrain/final --after out/sft/final
    python scripts/pipeline_check.py --before out/sft/final --after out/lora/final      # an adapter folder works too
    python scripts/pipeline_check.py --task grpo --before out/sft/final --after out/grpo/final

--task sft (the default):

For each conversation of --data (default dataset/sft_val.jsonl: chats never seen in training) the
messages before the first assistant reply are rendered with the chat template (generation prompt
added), and the model answers greedily. Reported per model:

  loss           cross-entropy on the reference replies' tokens (what SFT trains), per token
  stop rate      answers that end with <|im_end|> within --max_new_tokens: the model has learnt
                 the chat format and when to stop (a pretrained model never has)
  exact match    answers equal to the reference reply, over all conversations
  arithmetic     answers whose final "a + b = c." line equals the reference's, over the arithmetic ones

Exits with status 1 when --after stops less often than --min_stop_rate or than --before, so it can
guard a pipeline.

--task grpo: the prompts of --data (default dataset/grpo_val.jsonl: questions never asked in training), answered
greedily; reported per model: accuracy (the final answer is the reference "answer", trainer/rewards.py's
accuracy reward), the share of answers in the <think> format, stop rate and mean answer length, and the
prompts that changed: wrong before and right after, or the reverse. Exits with status 1 unless --after is
more accurate by at least --min_gain AND the change is no accident: among the changed prompts, as many more
turned right as would happen by chance with probability below --alpha (exact one-sided sign test, as
McNemar's test for paired answers).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import (GRPODataset, SFTDataset, iter_records, left_pad, pad_collate, pad_token_id,  # noqa: E402
                  sft_example, stop_token_ids)
from eval_model import encode_chat, load_model, model_tokenizer  # noqa: E402
from model.generate import generate_answers  # noqa: E402
from trainer.objectives import CausalLMObjective  # noqa: E402
from trainer.rewards import accuracy_reward, format_reward  # noqa: E402

ARITHMETIC = re.compile(r"\d+( [-+*] \d+)+ = \d+\.")


def prompts_and_references(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    """(messages before the first assistant reply, that reply) for each conversation."""
    pairs = []
    for line_no, row in iter_records(path, "(an SFT conversation)"):
        messages = sft_example(row, path, line_no).messages
        i = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        pairs.append((messages[:i], messages[i]["content"]))
    return pairs


@torch.no_grad()
def answer_all(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int
               ) -> list[tuple[str, bool]]:
    """(answer text, stopped at <|im_end|>) for each prompt; greedy, left-padded batches."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = stop_token_ids(tokenizer, model.config.eos_token_id, model.generation_config)
    results = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_token_id(tokenizer))
        tokens, kept = generate_answers(model, ids, mask, max_new_tokens, stop)
        for row, n in zip(tokens.tolist(), kept.sum(dim=1).tolist()):
            row = row[:n]  # up to and including the first stop token
            ended = bool(row) and row[-1] in stop
            results.append((tokenizer.decode(row[:-1] if ended else row, skip_special_tokens=False),
                            ended and row[-1] == im_end))
    return results


@torch.no_grad()
def reply_loss(model, tokenizer, data_path: Path, batch_size: int) -> float:
    """Mean cross-entropy per assistant token of the held-out conversations (the SFT objective)."""
    data, objective = SFTDataset(data_path, tokenizer, model.config.max_seq_len), CausalLMObjective()
    collate, total, items = pad_collate(tokenizer.pad_token_id or 0), 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        total += float(objective(model, batch)[0])
        items += objective.num_items(batch)
    return total / items


def evaluate(model_path: Path, data_path: Path, pairs: list[tuple[list[dict[str, str]], str]],
             max_new_tokens: int, batch_size: int) -> dict[str, float]:
    model = load_model(model_path)
    tokenizer = model_tokenizer(model_path, model)
    answers = answer_all(model, tokenizer, [encode_chat(tokenizer, m) for m, _ in pairs], max_new_tokens, batch_size)
    arithmetic = [(a, ref) for (a, _), (_, ref) in zip(answers, pairs) if ARITHMETIC.fullmatch(ref.split("\n")[-1])]
    return {
        "conversations": len(pairs),
        "loss": reply_loss(model, tokenizer, data_path, batch_size),
        "stop_rate": sum(stopped for _, stopped in answers) / len(answers),
        "exact_match": sum(a.strip() == ref for (a, _), (_, ref) in zip(answers, pairs)) / len(pairs),
        "arithmetic": len(arithmetic),
        "arithmetic_accuracy": sum(a.strip().split("\n")[-1] == ref.split("\n")[-1] for a, ref in arithmetic)
        / max(len(arithmetic), 1),
        "example": answers[0][0],
    }


def evaluate_grpo(model_path: Path, data_path: Path, limit: int, max_new_tokens: int, batch_size: int
                  ) -> dict[str, float]:
    model = load_model(model_path)
    tokenizer = model_tokenizer(model_path, model)
    seq_len = model.config.max_seq_len
    data = GRPODataset(data_path, tokenizer, seq_len, max_completion_length=max_new_tokens,
                       room=f"the model's max_seq_len {seq_len} minus --max_new_tokens {max_new_tokens}")
    rows = range(min(limit or len(data), len(data)))
    answers = answer_all(model, tokenizer, [data.prompt_ids[i] for i in rows], max_new_tokens, batch_size)
    texts = [a for a, _ in answers]
    correct = accuracy_reward(texts, [data.columns[i]["answer"] for i in rows])
    scored = [c for c in correct if c is not None]
    return {"prompts": len(texts), "correct": correct, "accuracy": sum(scored) / max(len(scored), 1),
            "format": sum(format_reward(texts)) / len(texts),
            "stop_rate": sum(stopped for _, stopped in answers) / len(answers),
            "length": sum(len(tokenizer.encode(t)) for t in texts) / len(texts), "example": texts[0]}


def sign_test(up: int, down: int) -> float:
    """P(at least `up` of up + down changes go one way | each way is a coin flip): one-sided exact sign test."""
    n = up + down
    return sum(math.comb(n, k) for k in range(up, n + 1)) / 2 ** n if n else 1.0


def grpo_verdict(before: dict, after: dict, args: argparse.Namespace) -> tuple[bool, int, int, float]:
    """(passed, wrong -> right, right -> wrong, sign test p) for two evaluate_grpo results on the same prompts:
    passes when accuracy rose by --min_gain and the changed answers went the right way, p < --alpha."""
    pairs = [(b, a) for b, a in zip(before["correct"], after["correct"]) if a is not None and b is not None]
    up, down = sum(a > b for b, a in pairs), sum(b > a for b, a in pairs)
    p = sign_test(up, down)
    return after["accuracy"] - before["accuracy"] >= args.min_gain and p < args.alpha, up, down, p


def check_grpo(args: argparse.Namespace) -> int:
    """--task grpo: held-out accuracy before and after; passes when it rose by --min_gain, significantly."""
    data = Path(args.data)
    results = {}
    for name in ("before", "after"):
        r = results[name] = evaluate_grpo(Path(getattr(args, name)), data, args.limit, args.max_new_tokens,
                                          args.batch_size)
        print(f"{name:>6} {getattr(args, name)}: accuracy {r['accuracy']:.1%} of {r['prompts']}, <think> format "
              f"{r['format']:.1%}, stop rate {r['stop_rate']:.1%}, mean length {r['length']:.1f} tokens; first "
              f"answer: {r['example']!r}")
    passed, up, down, p = grpo_verdict(results["before"], results["after"], args)
    gain = results["after"]["accuracy"] - results["before"]["accuracy"]
    print(f"changed answers: {up} wrong -> right, {down} right -> wrong (sign test p = {p:.3g})")
    print(json.dumps({**{k: {m: v for m, v in r.items() if m not in ("example", "correct")}
                         for k, r in results.items()}, "wrong_to_right": up, "right_to_wrong": down, "p": p}))
    if not passed:
        print(f"FAIL: held-out accuracy changed by {gain:+.1%} (needs at least {args.min_gain:+.1%}), sign test "
              f"p = {p:.3g} (needs < {args.alpha})", file=sys.stderr)
        return 1
    print(f"PASS: held-out accuracy rose by {gain:+.1%} (sign test p = {p:.3g})")
    return 0


def sft_verdict(before: dict, after: dict, args: argparse.Namespace) -> tuple[bool, str]:
    """(passed, why) for two evaluate results: passes when --after stops at <|im_end|> in at least
    --min_stop_rate of its answers, and at least as often as --before."""
    if after["stop_rate"] < max(args.min_stop_rate, before["stop_rate"]):
        return False, (f"the fine-tuned model stops in {after['stop_rate']:.1%} of answers (needs >= "
                       f"{args.min_stop_rate:.0%} and as often as before: {before['stop_rate']:.1%})")
    return True, f"the fine-tuned model stops in {after['stop_rate']:.1%} of answers (needs >= {args.min_stop_rate:.0%})"


def check_sft(args: argparse.Namespace) -> int:
    """--task sft: held-out replies before and after; passes when --after stops at <|im_end|> often enough."""
    pairs = prompts_and_references(Path(args.data))[:args.limit or None]
    results = {}
    for name in ("before", "after"):
        results[name] = evaluate(Path(getattr(args, name)), Path(args.data), pairs, args.max_new_tokens,
                                 args.batch_size)
        r = results[name]
        print(f"{name:>6} {getattr(args, name)}: reply loss {r['loss']:.3f}, stop rate {r['stop_rate']:.1%}, "
              f"exact match {r['exact_match']:.1%}, "
              f"arithmetic {r['arithmetic_accuracy']:.1%} of {r['arithmetic']}; first answer: {r['example']!r}")
    print(json.dumps({k: {m: v for m, v in r.items() if m != "example"} for k, r in results.items()}))
    passed, message = sft_verdict(results["before"], results["after"], args)
    print(f"{'PASS' if passed else 'FAIL'}: {message}", file=sys.stdout if passed else sys.stderr)
    return 0 if passed else 1


# The stages each task compares by default: (--before, --after, --data).
TASK_DEFAULTS = {"sft": ("out/pretrain/final", "out/sft/final", "dataset/sft_val.jsonl"),
                 "grpo": ("out/sft/final", "out/grpo/final", "dataset/grpo_val.jsonl")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sft", "grpo"), default="sft", help="what to check (see above)")
    p.add_argument("--before", default="", help="model folder before fine-tuning (default: out/pretrain/final for "
                   "sft, out/sft/final for grpo)")
    p.add_argument("--after", default="", help="model (or LoRA adapter) folder after fine-tuning (default: "
                   "out/sft/final for sft, out/grpo/final for grpo)")
    p.add_argument("--data", default="", help="held-out data (default: dataset/sft_val.jsonl conversations for "
                   "sft, dataset/grpo_val.jsonl prompts for grpo)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N conversations or prompts (0 = all)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit (default: 64)")
    p.add_argument("--batch_size", type=int, default=50, help="prompts generated together (default: 50)")
    p.add_argument("--min_stop_rate", type=float, default=0.9, help="sft: fail unless --after stops at least this "
                   "often (default: 0.9)")
    p.add_argument("--min_gain", type=float, default=0.02, help="grpo: fail unless --after's accuracy is at least "
                   "this much higher (default: 0.02 = 2 points)")
    p.add_argument("--alpha", type=float, default=0.05, help="grpo: fail unless the sign test's p-value is below this "
                   "(default: 0.05)")
    args = p.parse_args(argv)
    before, after, data = TASK_DEFAULTS[args.task]
    args.before, args.after, args.data = args.before or before, args.after or after, args.data or data
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the stage worked; a missing folder or file ends in one line, not a traceback."""
    args = parse_args(argv)
    try:
        return check_grpo(args) if args.task == "grpo" else check_sft(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"pipeline_check.py: error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
