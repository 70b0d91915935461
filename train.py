#!/usr/bin/env python
"""Zero2LLM training: flags -> config -> build (model, tokenizer, data, objective) -> the one loop.

  python train.py --mode pretrain                        # shipped data, small model, CPU, minutes
  python train.py --mode pretrain --preset 26m --dtype bfloat16 --device cuda
  torchrun --standalone --nproc_per_node=4 train.py --mode pretrain --preset 104m
  python train.py --mode pretrain --resume               # continue from out_dir's newest checkpoint
  python train.py --mode sft --help                      # every flag, with the defaults of that mode
  python train.py --mode sft                             # chat fine-tuning of out/pretrain/final -> out/sft
  python train.py --mode lora --merge                    # a LoRA adapter on out/sft/final -> out/lora
  python train.py --mode dpo                             # preference optimisation of out/sft/final -> out/dpo
  python train.py --mode grpo                            # RL from rewards on sampled answers, out/sft/final -> out/grpo
  python train.py --mode sft --init_from models/qwen2.5-0.5b-instruct --data_path chats.jsonl   # an open model
  torchrun --nproc_per_node=8 train.py --mode sft --init_from models/llama-3.1-8b --fsdp --grad_checkpointing
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data import DataError, load_tokenizer
from model import ModelConfig
from trainer.checkpoint import CheckpointError, resume_path
from trainer import other_flags
from trainer.config import ArgumentParser, TrainConfig, add_dataclass_flags, parsed_fields
from trainer.distributed import destroy, init_distributed, resolve_dtype
from trainer.errors import TrainingError, UsageError
from trainer.loop import Trainer
from trainer.memory import keep_freed_memory
from trainer.modes import MODES, Components, Mode, Run
from trainer.rundir import owned_out_dir


def selected_mode(argv: list[str]) -> str:
    """The value of --mode (default pretrain; the last one given wins, as in argparse), read first: which flags
    exist depends on it."""
    mode = "pretrain"
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            mode = argv[i + 1]
        elif arg.startswith("--mode="):
            mode = arg.split("=", 1)[1]
    return mode


# Modes other projects have that are not training here: what to use instead.
OTHER_MODES = {"test": "Zer02LLM's test mode is no training mode here: to try a model, python eval_model.py "
                       "--model_path out/sft/final; to check that each stage learned, python scripts/pipeline_check.py"}


def build_parser(mode: str = "pretrain") -> argparse.ArgumentParser:
    """The flags of one mode: the shared ones, the mode's own (with its defaults), the model flags it takes, and
    the launcher flags of other projects' commands."""
    spec = MODES[mode]
    # allow_abbrev=False: a typo such as --warmup must fail, not silently set --warmup_iters.
    parser = ArgumentParser(prog="train.py", description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            help_command=f"python train.py --mode {mode} --help")
    add_dataclass_flags(parser, spec.Config, choices={"mode": tuple(MODES)})
    if spec.model_flags != ():
        add_dataclass_flags(parser, ModelConfig, only=spec.model_flags, override_only=True,
                            title=spec.model_flags_title)
    # Not training settings (no config field): how the processes were started, as MiniMind's and Zer02LLM's
    # commands say it.
    launch = parser.add_argument_group("launch (accepted from MiniMind / Zer02LLM commands)")
    launch.add_argument("--ddp", action="store_true", help="DDP starts by itself under torchrun, one process per "
                        "GPU (torchrun --nproc_per_node=N train.py ...); without torchrun this says so and trains in "
                        "one process.")
    launch.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="This process's GPU, as legacy "
                        "launchers (python -m torch.distributed.launch) pass it; torchrun sets LOCAL_RANK instead.")
    return parser


def apply_launch_flags(args: argparse.Namespace) -> None:
    """--local_rank becomes LOCAL_RANK (which init_distributed reads); --ddp alone says that it changes nothing."""
    if args.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.ddp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print("train.py: --ddp without torchrun: one process. Several GPUs: torchrun --nproc_per_node=N train.py "
              "... (DDP is then implied, --ddp is not needed)", file=sys.stderr)


def refusal(flag: str, value: str | None, parser: argparse.ArgumentParser, mode: Mode,
            args: argparse.Namespace) -> str:
    """The one line that answers `flag` (given `value`), a flag this mode's parser lacks."""
    action = parser._option_string_actions.get

    def elsewhere(name: str) -> str:
        return mode.refused_flag(name, args) or foreign_flag(name, mode.name)

    if said := mode.refused_flag(flag, args):
        return said
    # Another project's name, unless it is also another mode's own flag and its rename is not one of this mode's
    # (TRL's DPO --beta is --dpo_beta in --mode dpo; elsewhere --beta is --mode grpo's, TRL's GRPO --beta).
    renamed = other_flags.TRAIN.get(flag, ("", ""))[1]
    if action(renamed) is not None or not modes_with(flag):
        if said := other_flags.answer(flag, value, other_flags.TRAIN, action, elsewhere):
            return said
    return foreign_flag(flag, mode.name)


def modes_with(flag: str) -> list[str]:
    return [name for name in MODES if flag in mode_flags(name)]


@functools.cache
def mode_flags(mode: str) -> frozenset[str]:
    """Every option string of `mode`'s parser, built once however many refused flags ask."""
    return frozenset(build_parser(mode)._option_string_actions)


def foreign_flag(flag: str, mode: str) -> str:
    owners = modes_with(flag)
    if not owners:
        return f"unrecognized argument {flag} (python train.py --mode {mode} --help lists the flags)"
    return f"{flag} is for {' and '.join(f'--mode {m}' for m in owners)}, not --mode {mode} (drop it)"


def parse_config(argv: list[str] | None) -> tuple[Mode, TrainConfig, ModelConfig, Any]:
    """Parse and check every flag before any work starts; user mistakes end in parser.error."""
    argv = sys.argv[1:] if argv is None else argv
    name = selected_mode(argv)
    parser = build_parser(name if name in MODES else "pretrain")  # an unknown --mode: argparse names the choices
    if name in OTHER_MODES:
        parser.error(f"--mode {name}: {OTHER_MODES[name]}")
    args, unknown = parser.parse_known_args(argv)
    mode = MODES[args.mode]
    if unknown:
        # Flags this mode lacks, each answered in one line rather than argparse's "unrecognized": another mode's
        # flag (whose it is), or another project's name (what to write here: trainer/other_flags.py).
        other_flags.refuse(parser, unknown, lambda flag, value: refusal(flag, value, parser, mode, args))
    apply_launch_flags(args)
    cfg = mode.Config(**parsed_fields(mode.Config, args))
    try:
        cfg.check()
        resume_path(cfg.resume, cfg.out_dir)
        tokenizer = tokenizer_of(cfg)
        model_cfg = mode.model_config(cfg, parsed_fields(ModelConfig, args, only=mode.model_flags), tokenizer)
    except (UsageError, CheckpointError) as e:
        parser.error(str(e))
    return mode, cfg, model_cfg, tokenizer


def tokenizer_of(cfg: TrainConfig) -> Any:
    """--tokenizer_path's tokenizer (in the fine-tuning modes, by default the --init_from folder's)."""
    try:
        return load_tokenizer(cfg.tokenizer_path)
    except DataError as e:
        raise UsageError(f"--tokenizer_path {e}; point --tokenizer_path at another folder") from None


def main(argv: list[str] | None = None, adjust: Callable[[Components], None] | None = None) -> dict[str, Any]:
    """Train as the flags say; `adjust(parts)`, if given, may change the built parts before training starts (a
    benchmark feeds GRPO fixed completions that way: bench/peers.py)."""
    mode, cfg, model_cfg, tokenizer = parse_config(argv)
    env = init_distributed(cfg.device, process_group=cfg.fsdp)
    if env.device.type == "cpu":
        keep_freed_memory()  # each step reuses the last one's memory instead of faulting in fresh pages
    run = Run(cfg, env, resolve_dtype(cfg.dtype, env.device), tokenizer, model_cfg, mode.seq_len(cfg, model_cfg))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    try:
        with owned_out_dir(Path(cfg.out_dir), env, resume=bool(cfg.resume), overwrite=cfg.overwrite):
            parts = mode.build(run)
            if adjust is not None:
                adjust(parts)
            if env.is_main:
                val = parts.val_data
                carved = f"--val_fraction {cfg.val_fraction:g} of the training data"
                held_out = ("no validation" if val is None
                            else f"{len(val):,} validation rows ({cfg.val_data_path or carved})")
                print(f"{cfg.mode}: {parts.model.num_params() / 1e6:.2f}M parameters ({mode.source(cfg)}), "
                      f"{len(parts.train_data):,} training rows, {held_out}, {env.world_size} process(es) on "
                      f"{env.device}, {str(run.dtype).removeprefix('torch.')} (--dtype {cfg.dtype})", file=sys.stderr)
                if cfg.mode == "pretrain" and model_cfg.hf_model_type is None:  # said now, not at from_pretrained
                    shape = (f"--dim {model_cfg.dim} is not a multiple of --n_heads {model_cfg.n_heads}"
                             if model_cfg.dim % model_cfg.n_heads else "see the README's table of architectures")
                    print(f"pretrain: transformers has no class for this shape ({shape}): the model is saved with "
                          f"model_type \"zero2llm\", which eval_model.py and model.Transformer load, transformers "
                          "does not", file=sys.stderr)
            return Trainer(run, parts).fit()
    finally:
        destroy()


def cli() -> None:
    """`python train.py`: errors the user can fix print as one line, without a traceback."""
    try:
        result = main()
    except (UsageError, DataError, CheckpointError, TrainingError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    if result["signal"]:
        sys.exit(128 + result["signal"])  # the shell convention for "ended by a signal"


if __name__ == "__main__":
    cli()
