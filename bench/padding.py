#!/usr/bin/env python
"""Padding: the share of the positions a training step computes that are padding, on the shipped data.

Pretraining packs documents into full rows of max_seq_len tokens (no attention mask, no padding). SFT and DPO
rows vary in length and are right-padded per batch; the trainer's sampler groups similar lengths into each
optimizer step. This replays one epoch of exactly the trainer's batches (its sampler, seed, batch size and
collator) and counts attention_mask zeros, against random batches of the same size for comparison.
No timing: the numbers are exact and the same on every machine.

    python bench/padding.py                      # batch 16 (the trainer's default), max_seq_len 256
    python bench/padding.py --record
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

import torch

from common import HelpFormatter, ROOT, machine_line, report
from data import (DPODataset, PackedDataset, SFTDataset, collate, load_tokenizer, pad_collate, pad_token_id, pair_collate,
                  pretrain_bin)
from trainer.sampler import ResumableBatchSampler


def padded_share(data, batches: Iterable[list[int]], collate_fn: Callable) -> tuple[float, int]:
    """(padding positions / all positions, batches) over the given batches of row indices."""
    pad = total = n = 0
    for rows in batches:
        batch = collate_fn([data[i] for i in rows])
        mask = batch.get("attention_mask")
        total += batch["input_ids"].numel()
        pad += 0 if mask is None else int((mask == 0).sum())
        n += 1
    return pad / max(total, 1), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--batch_size", type=int, default=16, help="rows per optimizer step (the trainer's default)")
    p.add_argument("--max_seq_len", type=int, default=256, help="truncation length (the small preset's)")
    p.add_argument("--seed", type=int, default=1337, help="the trainer's default seed")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    tok = load_tokenizer(ROOT / "tokenizer")
    pad_id = pad_token_id(tok)
    sft = SFTDataset(ROOT / "dataset" / "sft.jsonl", tok, args.max_seq_len)
    dpo = DPODataset(ROOT / "dataset" / "dpo.jsonl", tok, args.max_seq_len)
    packed = PackedDataset(pretrain_bin(ROOT / "dataset" / "pretrain.jsonl", tok), args.max_seq_len)
    sets = {  # name: (rows, the trainer's collator, the lengths the trainer's sampler groups by)
        "pretrain (dataset/pretrain.jsonl)": (packed, collate, None),
        "sft (dataset/sft.jsonl)": (sft, pad_collate(pad_id), sft.lengths),
        "dpo (dataset/dpo.jsonl)": (dpo, pair_collate(pad_id), dpo.lengths),
    }
    lines = [f"padding, one epoch of the trainer's batches, batch {args.batch_size}, max_seq_len {args.max_seq_len} "
             f"— {machine_line(torch.device('cpu'))}", "",
             "| data | batches | padding, trainer's batches | padding, random batches |", "|---|---|---|---|"]
    for name, (data, collate_fn, lengths) in sets.items():
        # The loop's sampler: lengths given = length-grouped steps of batch_size x processes x accumulation rows.
        grouped = ResumableBatchSampler(len(data), args.batch_size, seed=args.seed, lengths=lengths,
                                        group_rows=args.batch_size)
        shuffled = ResumableBatchSampler(len(data), args.batch_size, seed=args.seed)
        share, n = padded_share(data, grouped, collate_fn)
        random_share, _ = padded_share(data, shuffled, collate_fn)
        lines.append(f"| {name} | {n:,} | {share:.1%} | {random_share:.1%} |")
    report(lines, args.record)


if __name__ == "__main__":
    main()
