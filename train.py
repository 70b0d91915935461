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
import copy
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from data import (DataError, DPODataset, GRPODataset, PackedDataset, RowsDataset, SFTDataset, collate, pad_collate,
                  pair_collate, pretrain_bin, prompt_collate, split_train_val)
from model import ModelConfig, Transformer
from model.config import PRESETS, config_from_preset
from model.lora import apply_lora, count_parameters, merge_lora, save_adapter
from trainer.checkpoint import CheckpointError, latest_checkpoint
from trainer.config import MODE_DEFAULTS, PREVIOUS_STAGE, TrainConfig, UsageError, add_dataclass_flags, take
from trainer import parallel
from trainer.distributed import DistEnv, barrier, destroy, init_distributed, resolve_dtype
from trainer.grpo import GRPOObjective
from trainer.loop import Trainer, TrainingError
from trainer.objectives import CausalLMObjective, DPOObjective, sequence_logps
from trainer.rewards import RewardModel, load_reward_funcs, parse_weights


Export = Callable[[torch.nn.Module, Path, dict[str, Any]], None]


@dataclass
class Job:
    """What a mode builds for the loop."""
    model: torch.nn.Module
    objective: Any
    train_data: Dataset
    val_data: Dataset | None
    collate_fn: Callable[[list], dict[str, Any]]
    export: Export | None = None  # how best/ and final/ are written; None = a full HF folder (make_export)


def train_and_val(cfg: TrainConfig, load: Callable[[str], RowsDataset]) -> tuple[RowsDataset, RowsDataset]:
    """The training data and its validation data: --val_data_path, or a carve-off of --val_fraction."""
    train = load(cfg.data_path)
    if cfg.val_data_path:
        return train, load(cfg.val_data_path)
    train_rows, val_rows = split_train_val(len(train), cfg.val_fraction, cfg.seed)
    return train.subset(train_rows), train.subset(val_rows)


def build_pretrain(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, env: DistEnv) -> Job:
    """A fresh model on packed rows of max_seq_len tokens from a tokenized (once, cached) corpus."""
    skip = cfg.skip_bad_records
    if env.is_main:  # rank 0 tokenizes (and reports skipped bad lines); the others wait, then read the cached file
        pretrain_bin(cfg.data_path, tokenizer, skip_bad_records=skip)
    barrier()

    def packed(path: str) -> PackedDataset:
        return PackedDataset(pretrain_bin(path, tokenizer, skip_bad_records=skip), model_cfg.max_seq_len,
                             vocab_size=model_cfg.vocab_size)

    train, val = train_and_val(cfg, packed)
    return Job(Transformer(model_cfg), CausalLMObjective(), train, val, collate)


def load_init_model(cfg: TrainConfig, model_cfg: ModelConfig, path: str | None = None,
                    flag: str = "--init_from") -> Transformer:
    """The --init_from weights (or `path`'s) in a model built from model_cfg (that folder's config, dropout etc.
    overridden)."""
    path = path or cfg.init_from
    try:
        saved = Transformer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:  # already names the file and the problem
        raise UsageError(f"{flag}: {e}") from None
    with torch.device("meta"):  # no random init of weights about to be replaced (minutes for billions)
        model = Transformer(model_cfg)
    try:
        model.load_state_dict(saved.state_dict(), assign=True)
    except RuntimeError as e:
        raise UsageError(f"{flag} {path}: its architecture differs from --init_from {cfg.init_from}'s: "
                         f"{str(e).splitlines()[0]}") from None
    model.tie_weights()
    model.generation_config = saved.generation_config  # several eos ids, sampling defaults: kept for export
    return model


def read_chat_data(dataset_cls: Callable[..., RowsDataset], cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any,
                   env: DistEnv) -> tuple[RowsDataset, RowsDataset]:
    """Train and validation chat data (SFT conversations, DPO pairs, GRPO prompts), tokenized up front on every rank
    (seconds for the shipped files); rank 0 reports skipped records and a summary."""

    def read(path: str) -> RowsDataset:
        data = dataset_cls(path, tokenizer, model_cfg.max_seq_len, skip_bad_records=cfg.skip_bad_records)
        if env.is_main:
            if data.bad_report:
                print(data.bad_report, file=sys.stderr)
            print(data.summary(), file=sys.stderr)
        return data

    return train_and_val(cfg, read)


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its eos (padding is masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad or 0


def build_sft(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, env: DistEnv) -> Job:
    """The --init_from model on chat/Alpaca conversations: loss on the assistant's tokens only, batches of
    similar-length conversations (the sampler groups by SFTDataset.lengths), right-padded."""

    train, val = read_chat_data(SFTDataset, cfg, model_cfg, tokenizer, env)
    return Job(load_init_model(cfg, model_cfg), CausalLMObjective(), train, val, pad_collate(pad_id(tokenizer)))


def build_lora(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, env: DistEnv) -> Job:
    """SFT's data and objective, on the frozen --init_from model with trainable LoRA adapters.

    Checkpoints hold the whole model (base + adapter) like every mode's; best/ and final/ hold only
    the adapter, in PEFT's layout, and with --merge also merged/, the full merged model.
    """
    job = build_sft(cfg, model_cfg, tokenizer, env)
    try:
        wrapped = apply_lora(job.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {cfg.lora_target_modules}: {e}") from None
    trainable, total = count_parameters(job.model)
    if env.is_main:
        print(f"lora: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {len(wrapped)} layers; "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", file=sys.stderr)
    job.export = make_lora_export(tokenizer, str(Path(cfg.init_from).resolve()), cfg.merge)
    return job


def build_dpo(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, env: DistEnv) -> Job:
    """The --init_from model trained on preference pairs against a frozen reference (--ref_model_path, default
    the --init_from model itself). Each batch holds both sides of its pairs (pair_collate); with
    --precompute_ref_logps the reference scores every pair once here and is freed."""

    train, val = read_chat_data(DPODataset, cfg, model_cfg, tokenizer, env)
    collate_fn = pair_collate(pad_id(tokenizer))
    ref = load_reference(cfg, model_cfg, env)
    if cfg.precompute_ref_logps:
        for data in (train, val):
            precompute_ref_logps(ref, data, collate_fn, cfg, env)
        ref = None  # the objective reads batch["ref_logps"]; the reference's memory goes back
    return Job(load_init_model(cfg, model_cfg), DPOObjective(ref, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss),
               train, val, collate_fn)


def load_reference(cfg: TrainConfig, model_cfg: ModelConfig, env: DistEnv) -> Transformer:
    """The frozen reference model (DPO, GRPO's KL): --ref_model_path, default the --init_from model. Under --fsdp
    it is sharded like the policy (else every GPU would hold a whole copy)."""
    ref = load_init_model(cfg, model_cfg, cfg.ref_model_path or cfg.init_from, "--ref_model_path")
    ref = ref.eval().requires_grad_(False)
    return parallel.shard(ref, env, resolve_dtype(cfg.dtype, env.device)) if cfg.fsdp else ref.to(env.device)


def build_grpo(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any, env: DistEnv) -> Job:
    """The --init_from model trained by GRPO on prompts (data.GRPODataset): it samples --num_generations completions
    per prompt, the reward functions score them, and the objective (trainer/grpo.py) raises the likelihood of the
    better ones; a frozen reference (when --beta > 0) holds it near where it started."""
    funcs = load_reward_funcs(cfg.reward_funcs)
    if cfg.reward_model_path:
        funcs.append(("reward_model", RewardModel(cfg.reward_model_path, env.device)))
    if not funcs:
        raise UsageError("--reward_funcs is empty and there is no --reward_model_path: nothing scores the completions")
    weights = parse_weights(cfg.reward_weights, len(funcs))
    dataset = functools.partial(GRPODataset, max_completion_length=cfg.max_completion_length)
    train, val = read_chat_data(dataset, cfg, model_cfg, tokenizer, env)
    objective = GRPOObjective(
        tokenizer, funcs, weights, load_reference(cfg, model_cfg, env) if cfg.beta > 0 else None,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
        num_iterations=cfg.num_iterations, loss_type=cfg.loss_type,
        scale_rewards=cfg.loss_type != "dr_grpo" if cfg.scale_rewards is None else cfg.scale_rewards,
        log_completions_interval=cfg.log_completions_interval, log_dir=Path(cfg.out_dir) if env.is_main else None)
    return Job(load_init_model(cfg, model_cfg), objective, train, val, prompt_collate(pad_id(tokenizer)))


@torch.no_grad()
def precompute_ref_logps(ref: torch.nn.Module, data: DPODataset, collate_fn: Callable, cfg: TrainConfig,
                         env: DistEnv) -> None:
    """The reference's summed log-probs of both sides of every pair of `data`, under the run's autocast, stored
    on the dataset (items then carry "ref_logps"). Every rank scores every pair: simple, fine for datasets that
    take seconds; a large one would shard this and all-gather."""
    dtype = resolve_dtype(cfg.dtype, env.device)
    autocast = torch.autocast(env.device.type, dtype=dtype, enabled=dtype != torch.float32)
    out = []
    for start in range(0, len(data), cfg.batch_size):
        batch = collate_fn([data[i] for i in range(start, min(start + cfg.batch_size, len(data)))])
        batch = {k: v.to(env.device) for k, v in batch.items() if k != "ref_logps"}
        with autocast:
            logps = sequence_logps(ref, batch)[0].float().cpu()
        n = len(logps) // 2
        out.append(torch.stack([logps[:n], logps[n:]], dim=1))
    data.set_ref_logps(torch.cat(out))


BUILDERS: dict[str, Callable[[TrainConfig, ModelConfig, Any, DistEnv], Job]] = {
    "pretrain": build_pretrain, "sft": build_sft, "lora": build_lora, "dpo": build_dpo, "grpo": build_grpo}
# Flags where a negative value means nothing: flag -> what 0 means (for the message).
NON_NEGATIVE_FLAGS = {"eval_iters": "the whole validation set", "eval_interval": "only at the end",
                      "save_interval_steps": "only at the end", "keep_checkpoint_max": "keep all",
                      "max_bad_steps": "never stop", "max_steps": "derive from --epochs", "warmup_iters": "no warmup",
                      "lr_decay_iters": "the run's total steps", "num_workers": "load in the main process",
                      "log_completions_interval": "never", "weight_decay": "no decay", "grad_clip": "no clipping",
                      "learning_rate": "the weights stay as they are",
                      "peak_tflops": "the GPU's datasheet figure, or a measured matmul"}
# Flags only some modes read (their field's `modes`): given to another mode they would be silently ignored.
# (--merge and --precompute_ref_logps have messages of their own.)
MODE_ONLY_FLAGS: dict[str, tuple[str, ...]] = {
    f.name: f.metadata["modes"] for f in dataclasses.fields(TrainConfig) if "modes" in f.metadata}
# Model fields a fine-tuning run may change: they do not change what the weights mean.
FINETUNE_MODEL_FLAGS = ("dropout", "flash_attn", "aux_loss_alpha", "max_seq_len")


def build_parser(mode: str = "pretrain") -> argparse.ArgumentParser:
    # allow_abbrev=False: a typo such as --warmup must fail, not silently set --warmup_iters.
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, TrainConfig, "training", defaults=MODE_DEFAULTS[mode])
    add_dataclass_flags(parser, ModelConfig, "model (each flag overrides one field of --preset)", override_only=True)
    return parser


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, ModelConfig, Any]:
    """Parse and check every flag before any work starts; user mistakes end in parser.error."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--mode", choices=tuple(MODE_DEFAULTS), default="pretrain")
    mode = pre.parse_known_args(argv)[0].mode
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**take(TrainConfig, args))
    finetune = cfg.mode in PREVIOUS_STAGE
    if finetune:
        check_init_from(parser, cfg)
    elif cfg.preset not in PRESETS:
        parser.error(f"--preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    elif cfg.init_from:
        parser.error(f"--init_from is for the fine-tuning modes ({', '.join(PREVIOUS_STAGE)}); pretraining starts "
                     f"from random weights (--resume continues a pretraining run)")
    if cfg.merge and cfg.mode != "lora":
        parser.error("--merge is for --mode lora (it merges the LoRA adapter into the base model)")
    if cfg.mode == "lora" and not (cfg.lora_rank >= 1 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1):
        parser.error(f"--lora_rank {cfg.lora_rank}, --lora_alpha {cfg.lora_alpha:g}, --lora_dropout "
                     f"{cfg.lora_dropout:g}: need rank >= 1, alpha > 0 and 0 <= dropout < 1")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    foreign = [f for f, modes in MODE_ONLY_FLAGS.items() if cfg.mode not in modes and getattr(cfg, f) != defaults[f]]
    if foreign:
        modes = " and ".join(f"--mode {m}" for m in MODE_ONLY_FLAGS[foreign[0]])
        parser.error(f"--{foreign[0]} is for {modes}; --mode {cfg.mode} would ignore it (drop it)")
    if cfg.mode == "dpo":
        check_dpo_flags(parser, cfg)
    if cfg.fsdp and cfg.dtype == "float16":
        parser.error("--fsdp with --dtype float16: FSDP's sharded gradients have no loss scaler here; use "
                     "--dtype bfloat16 (or float32)")
    if cfg.fsdp and cfg.mode == "grpo":
        parser.error("--fsdp with --mode grpo: sampling stops at a different length on each rank, and FSDP needs every "
                     "rank in each forward; train GRPO with DDP (torchrun without --fsdp)")
    if cfg.mode == "grpo":
        check_grpo_flags(parser, cfg)
    if cfg.precompute_ref_logps and cfg.mode != "dpo":
        parser.error(f"--precompute_ref_logps is for --mode dpo (its pairs are fixed; {cfg.mode} has none to score)")
    for flag in ("ref_model_path", "reward_model_path"):
        path = getattr(cfg, flag)
        if path and not (Path(path) / "config.json").is_file():
            parser.error(f"--{flag} {path}: no model there (config.json + model.safetensors)")
    for flag in ("data_path", "val_data_path", "tokenizer_path"):
        path = getattr(cfg, flag)
        if path and not Path(path).exists():
            # The shipped defaults are relative paths: the usual cause is a run from outside the repository.
            hint = "; the defaults are relative to the repository root: run from there" if (
                path == parser.get_default(flag)) else ""
            parser.error(f"--{flag} {path}: no such file or folder{hint}")
        if path and flag != "tokenizer_path" and Path(path).is_dir():
            parser.error(f"--{flag} {path}: a folder; pass one data file (.jsonl, .txt, or a prepared .bin)")
    below_one = [f for f in ("batch_size", "accumulation_steps", "log_interval") if getattr(cfg, f) < 1]
    if below_one:
        parser.error(f"--{below_one[0]} {getattr(cfg, below_one[0])}: must be >= 1")
    negative = [f for f in NON_NEGATIVE_FLAGS if getattr(cfg, f) < 0]
    if negative:
        parser.error(f"--{negative[0]} {getattr(cfg, negative[0])}: must be >= 0 (0 = {NON_NEGATIVE_FLAGS[negative[0]]})")
    if cfg.max_steps == 0 and cfg.epochs < 1:
        parser.error(f"--epochs {cfg.epochs}: must be >= 1 (or set --max_steps)")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and 0 <= cfg.min_lr_ratio <= 1):
        parser.error(f"--beta1 {cfg.beta1:g}, --beta2 {cfg.beta2:g}, --min_lr_ratio {cfg.min_lr_ratio:g}: need "
                     f"AdamW's betas in [0, 1) and the ratio in [0, 1]")
    if not 0.0 <= cfg.val_fraction < 1.0:
        parser.error(f"--val_fraction {cfg.val_fraction:g}: must be in [0, 1) (0 = no validation carve-off)")
    if cfg.resume == "auto" and latest_checkpoint(cfg.out_dir) is None:
        parser.error(f"--resume: no complete checkpoint in {cfg.out_dir}/checkpoints; start without --resume, "
                     f"or pass a checkpoint folder")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_dir():
        parser.error(f"--resume {cfg.resume}: no such checkpoint folder")
    check_out_dir(parser, cfg.out_dir)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    except (OSError, ValueError) as e:  # an empty folder, a file, a broken tokenizer.json or config.json
        flag = "--tokenizer_path" if cfg.tokenizer_path != cfg.init_from else "--init_from"
        parser.error(f"{flag} {cfg.tokenizer_path}: cannot load a tokenizer there ({str(e).splitlines()[0]}); "
                     f"point --tokenizer_path at a folder with tokenizer.json + tokenizer_config.json")
    overrides = take(ModelConfig, args)
    if finetune:
        model_cfg = finetune_model_config(parser, cfg, overrides)
    else:
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        try:
            model_cfg = config_from_preset(cfg.preset, **overrides)
        except ValueError as e:
            parser.error(str(e))
    if cfg.mode == "grpo" and cfg.max_completion_length >= model_cfg.max_seq_len:
        parser.error(f"--max_completion_length {cfg.max_completion_length}: leaves no room for the prompt in "
                     f"--max_seq_len {model_cfg.max_seq_len}")
    if model_cfg.vocab_size < len(tokenizer):
        source = f"--init_from {cfg.init_from}" if finetune else "--vocab_size"
        parser.error(f"{source}: vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} "
                     f"tokens ({cfg.tokenizer_path})")
    return cfg, model_cfg, tokenizer


def check_init_from(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    """A fine-tuning mode starts from a model folder; its tokenizer is that folder's unless one is given."""
    mode, init = cfg.mode, Path(cfg.init_from)
    if cfg.preset:
        parser.error(f"--preset: --mode {mode} takes the architecture from --init_from ({cfg.init_from}); "
                     f"drop --preset")
    if not cfg.init_from:
        parser.error(f"--mode {mode} fine-tunes a trained model: pass --init_from <model folder>")
    if not (init / "config.json").is_file():
        if (init / "adapter_config.json").is_file():
            hint = "it holds a LoRA adapter, not a full model: use its merged/ folder (train with --merge)"
        elif cfg.init_from == MODE_DEFAULTS[mode]["init_from"]:
            hint = (f"run the previous stage first (python train.py --mode {PREVIOUS_STAGE[mode]}), "
                    f"or point --init_from at a model folder")
        else:
            hint = "point --init_from at a folder with config.json + model.safetensors (a final/ or best/ folder)"
        parser.error(f"--init_from {cfg.init_from}: no model there; {hint}")
    if not cfg.tokenizer_path:
        if not (init / "tokenizer_config.json").is_file():
            parser.error(f"--init_from {cfg.init_from} has no tokenizer files; pass --tokenizer_path")
        cfg.tokenizer_path = cfg.init_from


def check_out_dir(parser: argparse.ArgumentParser, out_dir: str) -> None:
    """--out_dir must be, or be creatable in, a writable folder: found now, not after the data is tokenized."""
    path = Path(out_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        parser.error(f"--out_dir {out_dir}: {existing} is a file, not a folder; choose another --out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out_dir {out_dir}: {existing} is not writable (permissions or a read-only file system); "
                     f"choose another --out_dir")


def check_dpo_flags(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    if not cfg.dpo_beta > 0:
        parser.error(f"--dpo_beta {cfg.dpo_beta:g}: must be > 0")
    if not 0 <= cfg.dpo_label_smoothing < 0.5:
        parser.error(f"--dpo_label_smoothing {cfg.dpo_label_smoothing:g}: must be in [0, 0.5)")
    if cfg.dpo_label_smoothing and cfg.dpo_loss != "sigmoid":
        parser.error(f"--dpo_label_smoothing is for --dpo_loss sigmoid, not {cfg.dpo_loss}")


def check_grpo_flags(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    if cfg.num_generations < 2:
        parser.error(f"--num_generations {cfg.num_generations}: must be >= 2 (a completion's baseline is the mean "
                     f"reward of its group)")
    if cfg.max_completion_length < 1 or cfg.num_iterations < 1:
        bad = "max_completion_length" if cfg.max_completion_length < 1 else "num_iterations"
        parser.error(f"--{bad} {getattr(cfg, bad)}: must be >= 1")
    if not cfg.temperature > 0:
        parser.error(f"--temperature {cfg.temperature:g}: must be > 0 (greedy completions of a prompt are all the "
                     f"same, so their advantages are 0)")
    if cfg.beta < 0 or not 0 <= cfg.epsilon < 1 or (cfg.epsilon_high is not None and cfg.epsilon_high < 0):
        parser.error(f"--beta {cfg.beta:g}, --epsilon {cfg.epsilon:g}, --epsilon_high {cfg.epsilon_high}: need "
                     f"beta >= 0, 0 <= epsilon < 1 and epsilon_high >= 0")


def finetune_model_config(parser: argparse.ArgumentParser, cfg: TrainConfig,
                          overrides: dict[str, Any]) -> ModelConfig:
    """The --init_from folder's architecture; only FINETUNE_MODEL_FLAGS may be changed."""
    fixed = [k for k in overrides if k not in FINETUNE_MODEL_FLAGS]
    if fixed:
        parser.error(f"--{fixed[0]}: --mode {cfg.mode} takes the architecture from --init_from ({cfg.init_from}); "
                     f"only --{', --'.join(FINETUNE_MODEL_FLAGS)} may be changed")
    config_file = Path(cfg.init_from) / "config.json"
    try:
        saved = ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
        model_cfg = dataclasses.replace(saved, **overrides).validate()
    except (KeyError, TypeError, ValueError) as e:
        parser.error(f"{config_file}: {e}")
    limit = rope_range(saved)
    if model_cfg.max_seq_len > limit:
        how = (f"max_position_embeddings {saved.max_seq_len}" if saved.rope_scaling is None else
               f"rope_scaling covers {limit}")
        parser.error(f"--max_seq_len {model_cfg.max_seq_len}: beyond the RoPE range of --init_from {cfg.init_from} "
                     f"({how}, in {config_file}); positions past {limit} were never trained. Use --max_seq_len "
                     f"{limit} or less, or a model whose config has rope_scaling covering {model_cfg.max_seq_len}")
    return model_cfg


def rope_range(config: ModelConfig) -> int:
    """Positions a saved model handles: its max_seq_len, or what its rope_scaling (yarn, llama3) extends it to."""
    scaling = config.rope_scaling or {}
    extended = int(float(scaling.get("factor", 1.0)) * int(scaling.get("original_max_position_embeddings", 0)))
    return max(config.max_seq_len, extended)


def make_export(tokenizer: Any) -> Export:
    def export(model: Transformer, folder: Path, info: dict[str, Any]) -> None:
        """An HF folder: weights + config (transformers loads it as is), tokenizer, training summary."""
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # eval_model.py reads "chat" to choose chat or plain completion for --mode auto.
        summary = {**info, "chat": info["mode"] != "pretrain"}
        (folder / "zero2llm.json").write_text(json.dumps(summary, indent=2))
    return export


def make_lora_export(tokenizer: Any, base_model: str, merge: bool) -> Export:
    def export(model: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
        """The adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors) with the tokenizer;
        with --merge also folder/merged/, the base with the adapter folded in: a full HF folder."""
        save_adapter(model, folder, base_model)
        tokenizer.save_pretrained(folder)
        summary = {**info, "chat": True, "base_model": base_model}
        (folder / "zero2llm.json").write_text(json.dumps(summary, indent=2))
        if merge:
            merged = merge_lora(copy.deepcopy(model))  # a copy: best/ is written mid-training
            make_export(tokenizer)(merged, folder / "merged", {**info, "base_model": base_model})
    return export


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, model_cfg, tokenizer = parse_config(argv)
    env = init_distributed(cfg.device, process_group=cfg.fsdp)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    try:
        job = BUILDERS[cfg.mode](cfg, model_cfg, tokenizer, env)
        if env.is_main:
            source = f"{cfg.preset} preset" if cfg.mode == "pretrain" else f"from {cfg.init_from}"
            print(f"{cfg.mode}: {job.model.num_params() / 1e6:.2f}M parameters ({source}), "
                  f"{len(job.train_data):,} training rows, {env.world_size} process(es) on {env.device}, "
                  f"{str(resolve_dtype(cfg.dtype, env.device)).removeprefix('torch.')} (--dtype {cfg.dtype})",
                  file=sys.stderr)
        trainer = Trainer(cfg, env, job.model, job.objective, job.train_data, job.val_data, job.collate_fn,
                          job.export or make_export(tokenizer))
        return trainer.fit()
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
