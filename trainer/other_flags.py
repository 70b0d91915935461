"""Other projects' names for train.py's, eval_model.py's and tokenizer/train_tokenizer.py's flags.

A command line brought from MiniMind's scripts (trainer/train_*.py, eval_llm.py) or from TRL / transformers'
TrainingArguments is answered, before any work starts, with one line per such flag saying what to write here. A
name that means exactly what a flag here means, values included, is an alias declared on that flag instead
(`aliases=`, model/config.py's `flag`) and simply works.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

MINIMIND, TRL, HF, HF_CONFIG = "MiniMind's", "TRL's", "TRL's and transformers'", "transformers' config"
LLM_TRAINING = "LLM_training's"  # the names of its training scripts' settings

# flag -> (whose name it is, what to use here): a flag of ours (the value given is carried over, "use --dim 512"),
# or a sentence where no flag here means the same.
TRAIN: dict[str, tuple[str, str]] = {
    # MiniMind's trainer/train_*.py
    "--hidden_size": (MINIMIND, "--dim"),
    "--num_hidden_layers": (MINIMIND, "--n_layers"),
    "--save_dir": (MINIMIND, "--out_dir"),
    "--save_weight": (MINIMIND, "the model is saved as a Hugging Face folder, final/ (and best/) in --out_dir: name "
                                "the run with --out_dir"),
    "--from_weight": (MINIMIND, "the fine-tuning modes start from a model folder, --init_from (sft's default: "
                                "out/pretrain/final); pretraining starts from random weights"),
    "--from_resume": (MINIMIND, "--resume continues from --out_dir's newest checkpoint"),
    "--lora_name": (MINIMIND, "the adapter is saved in --out_dir: name it with --out_dir"),
    "--max_gen_len": (MINIMIND, "--max_completion_length"),
    "--reasoning": (MINIMIND, "start from the model you mean with --init_from (the reasoning model's folder or the "
                              "SFT model's)"),
    "--scoring_func": ("DeepSeek-MoE's", "the router scores the experts with a softmax, the only scoring here: "
                                         "drop it"),
    "--use_compile": (MINIMIND, "--compile"),
    # LLM_training's settings, and names common to many training scripts
    "--lr": ("many scripts'", "--learning_rate"),
    "--num_epochs": (LLM_TRAINING, "--epochs"),
    "--eval_freq": (LLM_TRAINING, "--eval_interval"),
    "--eval_iter": (LLM_TRAINING, "--eval_iters"),
    "--save_step": (LLM_TRAINING, "--save_interval_steps"),
    "--context_length": (LLM_TRAINING, "--max_seq_len"),
    "--emb_dim": (LLM_TRAINING, "--dim"),
    "--drop_rate": (LLM_TRAINING, "--dropout"),
    "--stride": (LLM_TRAINING, "pretraining cuts the token stream into consecutive rows of --max_seq_len tokens (a "
                               "stride of the row length): drop it"),
    "--config": ("many scripts'", "train.py reads no config file: write each of its keys as a flag (max_steps: 10 "
                                  "-> --max_steps 10); a sweep's YAML goes to run_sweep.py"),
    # transformers' config.json names of the model flags
    "--num_attention_heads": (HF_CONFIG, "--n_heads"),
    "--num_key_value_heads": (HF_CONFIG, "--n_kv_heads"),
    "--intermediate_size": (HF_CONFIG, "--hidden_dim"),
    # transformers' TrainingArguments (which TRL's configs extend), and TRL's own
    "--output_dir": (HF, "--out_dir"),
    "--model_name_or_path": (TRL, "--init_from"),
    "--dataset_name": (TRL, "--data_path takes local files: a downloaded dataset's folder of .parquet files, "
                            ".jsonl files, a glob"),
    "--per_device_train_batch_size": (HF, "--batch_size"),
    "--per_device_eval_batch_size": (HF, "validation runs at --batch_size too: drop it"),
    "--gradient_accumulation_steps": (HF, "--accumulation_steps"),
    "--num_train_epochs": (HF, "--epochs"),
    "--max_grad_norm": (HF, "--grad_clip"),
    "--adam_beta1": (HF, "--beta1"),
    "--adam_beta2": (HF, "--beta2"),
    "--warmup_steps": (HF, "--warmup_iters"),
    "--warmup_ratio": (HF, "the warmup is counted in steps: --warmup_iters N"),
    "--lr_scheduler_type": (HF, "--lr_schedule cosine or wsd"),
    "--logging_steps": (HF, "--log_interval"),
    "--logging_strategy": (HF, "metrics are logged every --log_interval steps"),
    "--save_steps": (HF, "--save_interval_steps"),
    "--save_strategy": (HF, "checkpoints are saved every --save_interval_steps steps (0 = only at the end)"),
    "--save_total_limit": (HF, "--keep_checkpoint_max"),
    "--eval_steps": (HF, "--eval_interval"),
    "--eval_strategy": (HF, "validation runs every --eval_interval steps (0 = only at the end)"),
    "--evaluation_strategy": (HF, "validation runs every --eval_interval steps (0 = only at the end)"),
    "--resume_from_checkpoint": (HF, "--resume"),
    "--bf16": (HF, "--dtype bfloat16 (the default --dtype auto picks it where the hardware has bf16)"),
    "--fp16": (HF, "--dtype float16"),
    "--torch_dtype": (TRL, "--dtype"),
    "--gradient_checkpointing": (HF, "--grad_checkpointing"),
    "--report_to": (HF, "--use_wandb logs to wandb (metrics.jsonl and curves.png are written either way)"),
    "--run_name": (HF, "--wandb_run_name"),
    "--max_length": (TRL, "--max_seq_len"),
    "--max_seq_length": (TRL, "--max_seq_len"),
    "--max_prompt_length": (TRL, "a prompt may take what --max_seq_len leaves (in grpo, --max_seq_len minus "
                                 "--max_completion_length): there is no separate limit"),
    "--packing": (TRL, "pretraining packs its rows always, and SFT batches rows of similar length: drop it"),
    "--use_peft": (TRL, "LoRA is a mode of its own: --mode lora, with --lora_rank, --lora_alpha, ..."),
    "--lora_r": (TRL, "--lora_rank"),
    "--beta": ("TRL's and MiniMind's DPO", "--dpo_beta"),  # --mode grpo's --beta is TRL's GRPO one, the same
    "--loss_type": ("TRL's DPO", "--dpo_loss"),  # --mode grpo's --loss_type is TRL's GRPO one, the same
    "--label_smoothing": ("TRL's DPO", "--dpo_label_smoothing"),
    "--precompute_ref_log_probs": (TRL, "--precompute_ref_logps"),
    "--use_vllm": (TRL, "rollouts are sampled by the policy itself, in the training process: drop it"),
    "--deepspeed": (HF, "a model too large for one GPU is sharded with FSDP2: torchrun --nproc_per_node=N "
                         "train.py ... --fsdp"),
}

# MiniMind's eval_llm.py
EVAL: dict[str, tuple[str, str]] = {
    "--load_from": (MINIMIND, "use --model_path FOLDER, a model folder as train.py writes it (config.json + "
                              "model.safetensors)"),
    "--weight": (MINIMIND, "name the model's folder with --model_path (out/pretrain/final, out/sft/final, ...)"),
    "--save_dir": (MINIMIND, "name the model's folder with --model_path (out/pretrain/final, out/sft/final, ...)"),
    "--lora_weight": (MINIMIND, "pass the adapter's folder as --model_path (out/lora/final): its base model is "
                                "loaded and the adapter merged into it"),
    "--hidden_size": (MINIMIND, "the shape comes from the model folder's config.json: drop it"),
    "--num_hidden_layers": (MINIMIND, "the shape comes from the model folder's config.json: drop it"),
    "--use_moe": (MINIMIND, "the shape comes from the model folder's config.json: drop it"),
    "--inference_rope_scaling": (MINIMIND, "RoPE scaling is the model's own (rope_scaling in its config.json)"),
    "--historys": (MINIMIND, "a chat keeps its earlier turns (the oldest dropped only to fit the model's "
                             "context); --prompt answers one prompt on its own"),
    "--show_speed": (MINIMIND, "python bench/decode.py measures decoding speed"),
    "--out_dir": (MINIMIND, "name the model's folder with --model_path (out/pretrain/final, out/sft/final, ...)"),
    "--history_cnt": (MINIMIND, "a chat keeps its earlier turns (the oldest dropped only to fit the model's "
                                "context): drop it"),
    "--max_seq_len": (MINIMIND, "--max_new_tokens"),
    "--model_name_or_path": (TRL, "use --model_path FOLDER, a local model folder (config.json + model.safetensors)"),
    "--open_thinking": (MINIMIND, "the prompt is the chat template's as it is (no thinking switch): drop it"),
}

# SentencePiece's spm_train, and the tokenizer scripts built on it
SPM = "SentencePiece's"
TOKENIZER: dict[str, tuple[str, str]] = {
    "--input": (SPM, "--data"),
    "--corpus_path": (SPM, "--data"),
    "--model_prefix": (SPM, "--out_dir, a folder (tokenizer.json, tokenizer_config.json, ...)"),
    "--output_path_prefix": (SPM, "--out_dir, a folder (tokenizer.json, tokenizer_config.json, ...)"),
    "--model_type": (SPM, "the tokenizer is byte-level BPE (every text encodes, no unknown token): drop it"),
    "--character_coverage": (SPM, "byte-level BPE covers every character: drop it"),
}


def refuse(parser: argparse.ArgumentParser, unknown: list[str], answer_one: Callable[[str, str | None], str]
           ) -> NoReturn:
    """Stop on argparse's unknown arguments: one line per flag among them, `answer_one(flag, value)`."""
    flags = given(unknown)
    if not flags:
        parser.error(_stray_words(parser, unknown))
    parser.error("\n".join(answer_one(flag, value) for flag, value in flags))


def _stray_words(parser: argparse.ArgumentParser, words: list[str]) -> str:
    """Words that follow no flag: a config file or a folder written as another script takes them (this one takes
    every value after its flag), or else a value with spaces not quoted, or a list written TRL's way."""
    config = next((w for w in words if w.endswith((".yaml", ".yml", ".json", ".toml"))), None)
    if config is not None and "--config" in parser._option_string_actions:
        return f"{config}: name it with --config {config}"
    if config is not None:
        return (f"{config}: {parser.prog} reads no config file: write each of its keys as a flag (max_steps: 10 -> "
                f"--max_steps 10)")
    folder = next((w for w in words if Path(w).is_dir()), None)
    if folder is not None:
        names = [f for f in ("--model_path", "--data_path", "--init_from", "--out_dir", "--resume")
                 if f in parser._option_string_actions]
        return f"{folder}: a folder is named after its flag ({', '.join(names)}, ...)"
    return (f"unrecognized arguments: {' '.join(words)} (a flag takes one value: quote a value with spaces, and join "
            "a list with commas, a,b)")


def refuse_unknown(parser: argparse.ArgumentParser, unknown: list[str], table: dict[str, tuple[str, str]]
                   ) -> NoReturn:
    """refuse() for a script with one set of flags: each of `table`'s flags answered, any other unrecognized."""
    refuse(parser, unknown, lambda flag, value: answer(flag, value, table, parser._option_string_actions.get)
           or f"unrecognized argument {flag}")


def given(unknown: list[str]) -> list[tuple[str, str | None]]:
    """The flags among argparse's unknown arguments, each with the value written after it (or after "="), if any."""
    flags = []
    for i, arg in enumerate(unknown):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if not eq:
            following = unknown[i + 1] if i + 1 < len(unknown) else ""
            value = following if following and not following.startswith("--") else None
        flags.append((name, value))
    return flags


def answer(flag: str, value: str | None, table: dict[str, tuple[str, str]],
           action: Callable[[str], argparse.Action | None] = lambda name: None,
           elsewhere: Callable[[str], str] = str) -> str | None:
    """What to write here instead of another project's `flag` (None: not in `table`).

    `action(ours)`: this parser's action for the flag `flag` is renamed to, None when it lacks it; `elsewhere(ours)`:
    why it lacks it (another mode's flag)."""
    if flag not in table:
        return None
    whose, use = table[flag]
    if not (use.startswith("--") and " " not in use):  # no flag here means the same: a sentence
        return f"{flag} is {whose}: {use}"
    ours = action(use)
    if ours is None:
        return f"{flag} is {whose} name for {use}; {elsewhere(use)}"
    if value is not None and (takes := _refuses(ours, value)):  # e.g. TRL's fractional epochs, or its hinge loss
        return f"{flag} is {whose} name for {use}, which takes {takes}: {value} is not one"
    return f"{flag} is {whose} name: use {use}{'' if value is None else ' ' + value}"


def _refuses(action: argparse.Action, value: str) -> str | None:
    """What `action` takes, when it would refuse `value` (its choices, or its int or float type); else None. The
    value is converted first, as argparse does (MiniMind's `--use_compile 1` is `--compile 1`, which means on)."""
    choices = None if action.choices is None else " or ".join(map(str, action.choices))
    if callable(action.type):
        try:
            value = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return {int: "a whole number", float: "a number"}.get(action.type, choices)
    return choices if action.choices is not None and value not in action.choices else None
