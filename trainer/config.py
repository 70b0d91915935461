"""Training configuration: one dataclass, one argparse parser generated from it.

Every field is a command-line flag of the same name (`--learning_rate 3e-4`); its help string is
the field's `help` metadata, so `python train.py --help` and this file never disagree.
Model flags (dim, n_layers, ...) come from model.ModelConfig the same way and override the preset.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

MODES = ("pretrain", "sft", "lora", "dpo", "grpo")

# Defaults that differ by mode; a flag given on the command line always wins.
# Fine-tuning modes start from the previous stage's final/ (the pipeline pretrain -> sft -> lora); their
# model comes from that folder, so they have no preset, and their tokenizer is that folder's ("").
_FINETUNE = {"preset": "", "tokenizer_path": "", "warmup_iters": 20, "eval_interval": 100, "eval_iters": 0}
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"out_dir": "out/pretrain", "data_path": "dataset/pretrain.jsonl",
                 "val_data_path": "dataset/pretrain_val.jsonl"},
    "sft": {**_FINETUNE, "out_dir": "out/sft", "data_path": "dataset/sft.jsonl",
            "val_data_path": "dataset/sft_val.jsonl", "init_from": "out/pretrain/final", "learning_rate": 5e-4,
            "epochs": 2},
    "lora": {**_FINETUNE, "out_dir": "out/lora", "data_path": "dataset/sft.jsonl",
             "val_data_path": "dataset/sft_val.jsonl", "init_from": "out/sft/final", "learning_rate": 2e-3,
             "epochs": 1},
    # DPO moves a model that already chats; a tiny LR (5e-7..5e-6 for billion-parameter models) keeps it
    # close to the reference. The shipped 6M-parameter models tolerate more.
    "dpo": {**_FINETUNE, "out_dir": "out/dpo", "data_path": "dataset/dpo.jsonl",
            "val_data_path": "dataset/dpo_val.jsonl", "init_from": "out/sft/final", "learning_rate": 5e-5,
            "epochs": 1, "eval_interval": 50},
    # GRPO: batch_size is prompts per micro-batch; each gets num_generations completions (8 x 8 = 64 rows).
    # RL gradients are noisy: on the shipped 6M model, learning rates of 5e-5 and more gained less or lost
    # held-out accuracy, 2e-5 gained steadily (README, GRPO).
    "grpo": {**_FINETUNE, "out_dir": "out/grpo", "data_path": "dataset/grpo.jsonl",
             "val_data_path": "dataset/grpo_val.jsonl", "init_from": "out/sft/final", "learning_rate": 2e-5,
             "batch_size": 8, "max_steps": 200, "warmup_iters": 5, "eval_interval": 25, "log_interval": 5},
}
# The stage whose output a mode's default --init_from is (for the "run it first" message).
PREVIOUS_STAGE = {"sft": "pretrain", "lora": "sft", "dpo": "sft", "grpo": "sft"}


class UsageError(ValueError):
    """A problem the user can fix by changing flags or files; train.py prints it without a traceback."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its flag's help; `modes` names the only modes that read it (train.py refuses it elsewhere),
    any other keyword goes to argparse's add_argument."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    mode: str = _f("pretrain", "Training objective.", choices=MODES)
    out_dir: str = _f("out/pretrain", "Run folder: checkpoints/, best/, final/, metrics.jsonl.")
    data_path: str = _f("dataset/pretrain.jsonl", "Training data (each mode defaults to its shipped sample). "
                        "Pretraining: .jsonl ({\"text\": ...}), .txt, or a prepared .bin token file.")
    val_data_path: str = _f("dataset/pretrain_val.jsonl", "Held-out data for validation (each mode defaults to its "
                            "shipped sample); empty string = carve --val_fraction off the training data.")
    val_fraction: float = _f(0.02, "Share of training rows held out when --val_data_path is empty.")
    skip_bad_records: bool = _f(False, "Skip malformed data lines (bad JSON or UTF-8, a missing field, a conversation "
                                "without an assistant turn, ...) and report how many per reason, instead of "
                                "stopping at the first one with its file and line. A file with no good line still "
                                "fails.")
    tokenizer_path: str = _f("tokenizer", "Tokenizer folder (Hugging Face format); empty (the default "
                             "of the fine-tuning modes) = the --init_from folder's.")
    preset: str = _f("small", "Model size preset; model flags below override single fields of it (pretrain only: "
                     "the fine-tuning modes take the architecture from --init_from).")
    init_from: str = _f("", "Model folder to start from (sft: out/pretrain/final; lora, dpo, grpo: out/sft/final); its "
                        "config.json fixes the architecture (only --dropout, --flash_attn, --aux_loss_alpha and "
                        "--max_seq_len, the conversation truncation length, may be changed).")
    epochs: int = _f(1, "Passes over the training data (ignored when --max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run; 0 = derive from --epochs.")
    batch_size: int = _f(16, "Rows per micro-batch per process.")
    accumulation_steps: int = _f(1, "Micro-batches per optimizer step (global batch = batch_size x this x processes).")
    learning_rate: float = _f(1e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = _f(0.1, "Cosine decay floor as a fraction of the peak learning rate.")
    warmup_iters: int = _f(30, "Linear warmup steps.")
    lr_decay_iters: int = _f(0, "Steps over which the cosine decays; 0 = the run's total steps.")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to matrices only (not norms).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    max_bad_steps: int = _f(10, "Stop (with a checkpoint from before) after this many consecutive steps with a "
                            "NaN/inf loss or gradient, each of which is skipped; 0 = never stop.")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (CUDA when available).")
    dtype: str = _f("auto", "Autocast dtype: auto = bfloat16 where the hardware has native bf16 (recent GPUs, CPUs "
                    "with AVX512-BF16/AMX), else float32.",
                    choices=("auto", "float32", "bfloat16", "float16"))
    fsdp: bool = _f(False, "Shard parameters, gradients and optimizer states over the processes (FSDP2, per "
                    "block) instead of replicating them (DDP): for models that do not fit one device. Checkpoints "
                    "are sharded (torch.distributed.checkpoint); best/ and final/ are consolidated HF folders.")
    grad_checkpointing: bool = _f(False, "Activation checkpointing: keep only each block's input and recompute the "
                                  "block in backward (about 1/3 more compute for far less activation memory).")
    compile: bool = _f(False, "torch.compile each block: faster steps after a one-off compile of tens of seconds "
                       "(on GPU; on CPU too, with a C++ compiler: ~15%% off a bf16 step, bench/RESULTS.md).")
    peak_tflops: float = _f(0.0, "Peak TFLOP/s that the logged MFU is relative to; 0 = the datasheet figure of a "
                            "known GPU for --dtype, else a matmul measured at startup.")
    seed: int = _f(1337, "Seed for initialisation, data order and dropout.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    log_interval: int = _f(10, "Steps between logged training metrics.")
    eval_interval: int = _f(100, "Steps between validation runs (and always at the end); 0 = only at the end.")
    eval_iters: int = _f(50, "Validation batches per process per evaluation; 0 = the whole validation set.")
    save_interval_steps: int = _f(200, "Steps between checkpoints in out_dir/checkpoints; 0 = only at the end.")
    keep_checkpoint_max: int = _f(3, "Newest checkpoints to keep; 0 = keep all.")
    save_best_only: bool = _f(False, "Write checkpoints only at evaluations that improve the validation loss.")
    save_last: bool = _f(True, "Export the final model to out_dir/final (Hugging Face format).")
    resume: str = _f("", "Resume: 'auto' (or the bare flag) = newest complete checkpoint in out_dir, or a checkpoint path.",
                     nargs="?", const="auto")
    use_wandb: bool = _f(False, "Log to Weights & Biases (offline unless credentials are configured).")
    wandb_project: str = _f("zero2llm", "wandb project name.")
    wandb_run_name: str = _f("", "wandb run name; empty = derived from mode and out_dir.")
    lora_rank: int = _f(8, "LoRA rank r of the update B @ A (lora mode).", modes=("lora",))
    lora_alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / rank (lora mode).", modes=("lora",))
    lora_dropout: float = _f(0.05, "Dropout on the input of LoRA's A (lora mode).", modes=("lora",))
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                  "Comma-separated linear layers that get LoRA (lora mode; default: all attention "
                                  "and MLP projections).", modes=("lora",))
    dpo_beta: float = _f(0.1, "DPO beta: strength of the pull towards the reference model (higher = stay closer); "
                         "IPO: the target log-ratio margin is 1 / (2 beta) (dpo mode).", modes=("dpo",))
    dpo_label_smoothing: float = _f(0.0, "Assumed share of flipped preference labels, in [0, 0.5) (conservative "
                                    "DPO; sigmoid loss only; dpo mode).", modes=("dpo",))
    dpo_loss: str = _f("sigmoid", "Preference loss: sigmoid (DPO) or ipo (dpo mode).", choices=("sigmoid", "ipo"),
                       modes=("dpo",))
    ref_model_path: str = _f("", "Frozen reference model folder for DPO, and for GRPO's KL penalty; empty = the "
                             "--init_from folder (dpo and grpo modes).", modes=("dpo", "grpo"))
    precompute_ref_logps: bool = _f(False, "Compute the reference model's log-probs of every train/val pair once "
                                    "up front and free it: less memory and one forward per step instead of two "
                                    "(dpo mode).")
    num_generations: int = _f(8, "Completions sampled per prompt: the group whose mean reward is each one's "
                              "baseline (grpo mode; --batch_size counts prompts).", modes=("grpo",))
    max_completion_length: int = _f(64, "Most tokens sampled per completion; prompts get --max_seq_len minus this "
                                    "(grpo mode).", modes=("grpo",))
    temperature: float = _f(0.7, "Sampling temperature of the rollouts; below 1 the samples stay near what the model "
                            "answers greedily, so the rewards sort its likely answers (grpo mode; validation answers "
                            "greedily).", modes=("grpo",))
    beta: float = _f(0.04, "Weight of the KL penalty to the frozen reference (k3 estimator); 0 = no penalty and no "
                     "reference model in memory (grpo mode).", modes=("grpo",))
    epsilon: float = _f(0.2, "Clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high] (grpo mode).",
                        modes=("grpo",))
    epsilon_high: float | None = _f(None, "Upper clip of the policy ratio, 1 + epsilon_high (DAPO's clip-higher, "
                                    "e.g. 0.28; cispo caps its ratio weights there); default: --epsilon (grpo mode).",
                                    modes=("grpo",))
    num_iterations: int = _f(1, "Policy updates (optimizer steps) per batch of rollouts; > 1 reuses them with the "
                             "clipped ratio to the sampling policy, and multiplies the steps per epoch (grpo mode).",
                             modes=("grpo",))
    loss_type: str = _f("dapo", "GRPO loss normalisation: grpo (mean over each completion's tokens, then over "
                        "completions), dr_grpo (sum / (completions x max_completion_length)), dapo (mean over all "
                        "completion tokens), cispo (dapo's, with clipped-ratio weights instead of clipping) "
                        "(grpo mode).", choices=("grpo", "dr_grpo", "dapo", "cispo"), modes=("grpo",))
    scale_rewards: bool | None = _f(None, "Divide advantages by their group's reward std; default: on, off for "
                                    "--loss_type dr_grpo (grpo mode).", modes=("grpo",))
    reward_funcs: str = _f("accuracy,format", "Comma-separated reward functions: built-in accuracy, format, length, or "
                           "your own as module:function or path/to/file.py:function (see trainer/rewards.py) "
                           "(grpo mode).", modes=("grpo",))
    reward_weights: str = _f("", "Comma-separated weights of --reward_funcs (then of --reward_model_path); empty = "
                             "all 1 (grpo mode).", modes=("grpo",))
    reward_model_path: str = _f("", "A Hugging Face sequence-classification model folder whose first logit is one "
                                "more reward (loaded offline; grpo mode).", modes=("grpo",))
    log_completions_interval: int = _f(50, "Steps between sample completions shown on the console and appended to "
                                       "out_dir/completions.jsonl (and at step 1); 0 = never (grpo mode).",
                                       modes=("grpo",))
    merge: bool = _f(False, "lora mode: also export the adapter merged into the base, a full model, to "
                     "best/merged/ and final/merged/.")


def _flag_type(tp: Any) -> Any:
    """The argparse `type` for a dataclass field annotation (Optional[X] -> X)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _parse_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str,
                        override_only: bool = False, defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of `cls`. With override_only, defaults are None ("keep the preset's").

    `defaults` replaces field defaults (a mode's), so `--help` shows the values that mode really uses.
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _flag_type(hints[f.name])
        if tp not in (int, float, str, bool):
            continue  # structured fields (e.g. rope_scaling) are set through presets, not flags
        meta = dict(f.metadata)
        if not meta.pop("cli", True):
            continue
        help_ = meta.pop("help", "")
        meta.pop("modes", None)
        default = None if override_only else (defaults or {}).get(f.name, f.default)
        if not override_only and default not in (None, ""):
            help_ += " (default: %(default)s)"
        if tp is bool:
            # --flag, --no-flag, and --flag=true/false (the form sweep tools generate).
            group.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=default,
                               metavar="true|false", help=f"{help_} Off: --no-{f.name}.")
            group.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            group.add_argument(f"--{f.name}", type=tp, default=default, help=help_, **meta)


def take(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The parsed values that belong to dataclass `cls`, skipping flags left at None."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}
