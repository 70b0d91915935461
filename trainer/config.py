"""The flags every mode shares, and the argparse parser generated from a mode's config dataclass.

Every field is a command-line flag of the same name (`--learning_rate 3e-4`); its help string is the field's
`help` metadata, so `python train.py --help` and the code never disagree. A mode's config (trainer/modes/)
subclasses TrainConfig: it adds the flags only it reads, and re-declares a shared field to give it another
default (`learning_rate: float = 5e-4`), which keeps the shared field's help.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data import DataError, data_files
from model.config import flag
from trainer.errors import UsageError
from trainer.schedule import SCHEDULES, parse_duration


OPTIMIZERS = ("adamw", "muon")
SWITCH = ("auto", "on", "off")  # the values of --compile


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are two lines: a short usage naming the command that lists the flags, then
    the error. argparse's own usage spells out every flag (fifty lines for train.py), burying the error under it."""

    def __init__(self, *args: Any, help_command: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help_command = help_command or f"python {self.prog} --help"

    def error(self, message: str) -> typing.NoReturn:
        """Exit with status 2 after the short usage and the error, one line for each of the message's lines."""
        errors = "".join(f"{self.prog}: error: {line}\n" for line in message.split("\n"))
        self.exit(2, f"usage: {self.prog} [flags]; {self.help_command} lists them\n{errors}")


def parse_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def parse_switch(text: str) -> str:
    """auto, on or off; a boolean (true/false, the form sweep tools write, or 1/0, yes/no) means on or off."""
    word = text.lower()
    if word in SWITCH:
        return word
    try:
        return "on" if parse_bool(word) else "off"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


@dataclass
class TrainConfig:
    """Flags shared by every mode: the run, its data, length, optimisation, evaluation, checkpoints and scale."""
    flag_group = "training (every mode)"
    data_suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".parquet", ".txt", ".bin")  # a --data_path folder's files
    sample_val_data: ClassVar[str] = "dataset/pretrain_val.jsonl"  # held out from the shipped --data_path

    mode: str = flag("pretrain", "Training mode; `--mode X --help` lists that mode's flags and defaults.")
    out_dir: str = flag("out/pretrain", "Run folder: checkpoints/, best/, final/, metrics.jsonl.")
    data_path: str = flag("dataset/pretrain.jsonl", "Training data (each mode defaults to its shipped sample). "
                          "Pretraining: .jsonl ({\"text\": ...}), .parquet, .txt, or a prepared .bin token file; the "
                          "other modes: .jsonl or .parquet (a Hugging Face dataset's files). Several: a "
                          "folder (its data files, sorted by name), a glob ('shards/*.jsonl', sorted by name) or "
                          "comma-separated files (in the order given), all read in that order.")
    val_data_path: str = flag("auto", "Held-out data for validation; empty string = carve --val_fraction off the "
                              "training data; auto: the shipped sample's held-out file (dataset/<mode>_val.jsonl) "
                              "when --data_path is the shipped sample, else that carve-off of --data_path.")
    val_fraction: float = flag(0.02, "Share of training rows held out when validation is carved off them.")
    skip_bad_records: bool = flag(False, "Skip malformed data lines (bad JSON or UTF-8, a missing field, a "
                                  "conversation without an assistant turn, ...) and report how many per reason, "
                                  "instead of stopping at the first one with its file and line. A file with no good "
                                  "line still fails.")
    tokenizer_path: str = flag("tokenizer", "Tokenizer folder (Hugging Face format); empty (the default of the "
                               "fine-tuning modes) = the --init_from folder's.")
    epochs: int = flag(1, "Passes over the training data (ignored when --max_steps > 0).")
    max_steps: int = flag(0, "Optimizer steps to run; 0 = derive from --epochs.")
    batch_size: int = flag(16, "Rows per micro-batch per process.")
    accumulation_steps: int = flag(1, "Micro-batches per optimizer step (global batch = batch_size x this x "
                                   "processes).")
    optimizer: str = flag("adamw", "adamw, or muon: Muon on the hidden matrices (at --muon_learning_rate) and AdamW "
                          "on the embeddings, lm_head, norms and biases (at --learning_rate).", choices=OPTIMIZERS)
    learning_rate: float = flag(1e-3, "Peak learning rate of AdamW (with --optimizer muon: of the parameters Muon "
                                "does not take). Pretraining's 3e-3 is tuned with Muon; AdamW alone did best at "
                                "1e-3.")
    muon_learning_rate: float = flag(0.02, "Peak learning rate of Muon's hidden matrices (--optimizer muon).")
    min_lr_ratio: float = flag(0.1, "Where the decay ends, as a fraction of the peak learning rate.")
    warmup_iters: int = flag(30, "Linear warmup steps.")
    lr_schedule: str = flag("auto", "cosine: warmup, then a cosine decay over the run; wsd: warmup, the peak held, "
                            "then a linear decay over the last --decay_fraction of the run; auto: wsd with "
                            "--time_budget, else cosine.", choices=SCHEDULES)
    lr_decay_iters: int = flag(0, "Steps over which the cosine decays; 0 = the run's total steps.")
    decay_fraction: float = flag(0.2, "wsd: the share of the run spent decaying (of its steps, or of its time with "
                                 "--time_budget).")
    time_budget: str = flag("", "Wall-clock budget of the run, such as 90s, 10m or 1.5h, counted from the process's "
                            "start, or torchrun's (tokenizing and compiling count): the run ends on time with its "
                            "schedule complete (wsd's decay starts when the remaining time says so). With --max_steps, "
                            "whichever ends first; without, --epochs is not used.")
    weight_decay: float = flag(0.1, "Weight decay of every matrix (by AdamW, or by Muon for the hidden ones), not "
                               "of norms and biases.")
    beta1: float = flag(0.9, "AdamW beta1.")
    beta2: float = flag(0.95, "AdamW beta2.")
    grad_clip: float = flag(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    max_bad_steps: int = flag(10, "Stop (with a checkpoint from before) after this many consecutive steps with a "
                              "NaN/inf loss or gradient, each of which is skipped; 0 = never stop.")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto (CUDA when available).")
    dtype: str = flag("auto", "Autocast dtype: auto = bfloat16 where the hardware has native bf16 (recent GPUs, "
                      "CPUs with AVX512-BF16/AMX), else float32.", choices=("auto", "float32", "bfloat16", "float16"))
    fsdp: bool = flag(False, "Shard parameters, gradients and optimizer states over the processes (FSDP2, per "
                      "block) instead of replicating them (DDP): for models that do not fit one device. Checkpoints "
                      "are sharded (torch.distributed.checkpoint); best/ and final/ are consolidated HF folders.")
    grad_checkpointing: bool = flag(False, "Activation checkpointing: keep only each block's input and recompute "
                                    "the block in backward (about 1/3 more compute for far less activation memory).")
    compile: str = flag("off", "torch.compile each block: faster steps after a one-off wait to compile (a minute or "
                        "more on a CPU, where it needs a C++ compiler). on (also the bare flag), off, or auto: time "
                        "the first steps eagerly, then compile if the steps still to come are long enough to repay it, "
                        "sooner where an earlier run here compiled blocks of the same shape (Inductor's cache has "
                        "them) (pretraining's default; README, Speed).", choices=SWITCH, type=parse_switch, nargs="?",
                        const="on", negation="off", metavar="auto|on|off")
    peak_tflops: float = flag(0.0, "Peak TFLOP/s that the logged MFU is relative to; 0 = the datasheet figure of a "
                              "known GPU for --dtype, else a matmul measured at startup.")
    seed: int = flag(1337, "Seed for initialisation, data order and dropout.")
    num_workers: int = flag(0, "DataLoader worker processes.")
    log_interval: int = flag(10, "Steps between logged training metrics.")
    eval_interval: int = flag(100, "Steps between validation runs (and always at the end); 0 = only at the end.")
    eval_iters: int = flag(50, "Global batches of validation rows per evaluation: its first eval_iters x "
                           "--batch_size x --accumulation_steps x processes rows, the same rows however a global "
                           "batch is split; 0 = the whole validation set (what runs of different global batches "
                           "are compared on).")
    save_interval_steps: int = flag(200, "Steps between checkpoints in out_dir/checkpoints; 0 = only at the end. "
                                    "--save_interval is the same flag (Zer02LLM's name).",
                                    aliases=("--save_interval",))
    keep_checkpoint_max: int = flag(3, "Newest checkpoints to keep; 0 = keep all.")
    save_best_only: bool = flag(False, "Write checkpoints only at evaluations that improve the validation loss.")
    save_last: bool = flag(True, "Export the final model to out_dir/final (Hugging Face format).")
    resume: str = flag("", "Resume: 'auto' (or the bare flag) = newest complete checkpoint in out_dir, or a "
                       "checkpoint path. What must match and what may change: README, When things go wrong.",
                       nargs="?", const="auto")
    overwrite: bool = flag(False, "Replace an earlier run in --out_dir (its checkpoints/, best/, final/, "
                           "metrics.jsonl) instead of refusing to start there.")
    use_wandb: bool = flag(False, "Log to Weights & Biases (offline unless credentials are configured).")
    wandb_project: str = flag("zero2llm", "wandb project name.")
    wandb_run_name: str = flag("", "wandb run name; empty = derived from mode and out_dir.")
    wandb_log_freq: int = flag(1, "Send every N-th logged training record to wandb (validation records always go); "
                               "metrics.jsonl keeps them all.")
    wandb_log_model: bool = flag(False, "Upload best/ and final/ as wandb model artifacts whenever they are written "
                                 "(offline runs keep them for `wandb sync`).")
    wandb_log_code: bool = flag(False, "Save the repository's Python files with the wandb run.")
    wandb_watch_model: bool = flag(False, "wandb.watch the model: histograms of its gradients (or parameters, see "
                                   "--wandb_watch_log) every --wandb_watch_log_freq backward passes.")
    wandb_watch_log: str = flag("gradients", "What --wandb_watch_model logs; None = only the model graph.",
                                choices=("gradients", "parameters", "all", "None"))
    wandb_watch_log_freq: int = flag(100, "Backward passes between --wandb_watch_model's histograms.")

    def check(self) -> None:
        """Refuse values that mean nothing (UsageError naming the flag), before any work starts."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name} {value}: must be a finite number")
        for name in ("learning_rate", "muon_learning_rate"):
            if getattr(self, name) > MAX_LEARNING_RATE:
                raise UsageError(f"--{name} {getattr(self, name):g}: above {MAX_LEARNING_RATE:g}, a step moves weights "
                                 f"further than their own size and the run diverges; use a value such as 1e-3")
        if self.time_budget:
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                raise UsageError(f"--time_budget {e}") from None
            if self.lr_schedule == "cosine":
                raise UsageError("--lr_schedule cosine needs the run's length up front, and --time_budget leaves it "
                                 "open: use --lr_schedule wsd (or auto), whose decay starts when the remaining time "
                                 "says so")
        if not 0 < self.decay_fraction <= 1:
            raise UsageError(f"--decay_fraction {self.decay_fraction:g}: must be in (0, 1]")
        if self.fsdp and self.optimizer == "muon":
            raise UsageError("--optimizer muon with --fsdp: Muon's Newton-Schulz step needs each whole matrix, and FSDP "
                             "shards them; add --optimizer adamw --learning_rate 1e-3 (Muon is pretraining's default), "
                             "or use Muon under DDP (torchrun without --fsdp)")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --out_dir and --overwrite replaces it: pass one of them")
        below_one = [f for f in ("batch_size", "accumulation_steps", "log_interval", "wandb_log_freq",
                                 "wandb_watch_log_freq") if getattr(self, f) < 1]
        if below_one:
            raise UsageError(f"--{below_one[0]} {getattr(self, below_one[0])}: must be >= 1")
        negative = [f for f in NON_NEGATIVE if getattr(self, f) < 0]
        if negative:
            raise UsageError(f"--{negative[0]} {getattr(self, negative[0])}: must be >= 0 "
                             f"(0 = {NON_NEGATIVE[negative[0]]})")
        if self.max_steps == 0 and self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be >= 1 (or set --max_steps)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.min_lr_ratio <= 1):
            raise UsageError(f"--beta1 {self.beta1:g}, --beta2 {self.beta2:g}, --min_lr_ratio {self.min_lr_ratio:g}: "
                             f"need AdamW's betas in [0, 1) and the ratio in [0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val_fraction {self.val_fraction:g}: must be in [0, 1) (0 = no validation carve-off)")
        if self.fsdp and self.dtype == "float16":
            raise UsageError("--fsdp with --dtype float16: FSDP's sharded gradients have no loss scaler here; use "
                             "--dtype bfloat16 (or float32)")
        if self.fsdp and self.wandb_watch_model:
            raise UsageError("--wandb_watch_model with --fsdp: the gradients are sharded over the processes; watch a "
                             "run without --fsdp")
        if self.val_data_path == "auto":  # the user's own data is validated on its own rows, not on the sample's
            shipped = Path(self.data_path).absolute() == Path(self.default("data_path")).absolute()
            self.val_data_path = self.sample_val_data if shipped else ""
        for name in ("data_path", "val_data_path", "tokenizer_path"):
            path = getattr(self, name)
            # The shipped defaults are relative paths: the usual cause is a run from outside the repository.
            hint = ("; the defaults are relative to the repository root: run from there"
                    if path == self.default(name) else "")
            if path and name == "tokenizer_path" and not Path(path).exists():
                raise UsageError(f"--{name} {path}: no such file or folder{hint}")
            if path and name != "tokenizer_path":
                try:
                    data_files(path, self.data_suffixes)
                except DataError as e:
                    raise UsageError(f"--{name} {e}{hint}") from None
        check_out_dir(self.out_dir)

    @classmethod
    def default(cls, name: str) -> Any:
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)


MAX_LEARNING_RATE = 1.0  # AdamW moves each weight by about lr per step: beyond 1 nothing trains
# Flags where a negative value means nothing: flag -> what 0 means (for the message).
NON_NEGATIVE = {"eval_iters": "the whole validation set", "eval_interval": "only at the end",
                "save_interval_steps": "only at the end", "keep_checkpoint_max": "keep all",
                "max_bad_steps": "never stop", "max_steps": "derive from --epochs", "warmup_iters": "no warmup",
                "lr_decay_iters": "the run's total steps", "num_workers": "load in the main process",
                "weight_decay": "no decay", "grad_clip": "no clipping",
                "learning_rate": "the weights stay as they are", "muon_learning_rate": "the matrices stay as they are",
                "peak_tflops": "the GPU's datasheet figure, or a measured matmul"}


def check_out_dir(out_dir: str) -> None:
    """--out_dir must be, or be creatable in, a writable folder: found now, not after the data is tokenized."""
    path = Path(out_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out_dir {out_dir}: {existing} is a file, not a folder; choose another --out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir {out_dir}: {existing} is not writable (permissions or a read-only file "
                         f"system); choose another --out_dir")


# ----------------------------------------------------------------------------- dataclass -> argparse


def _flag_type(tp: Any) -> Any:
    """The argparse `type` for a dataclass field annotation (Optional[X] -> X)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _declared_fields(cls: type) -> list[tuple[type, dataclasses.Field]]:
    """(the class that first declares it, field) for each field of dataclass `cls`, in field order.

    A subclass that re-declares a field only to change its default keeps the first declaration's help,
    argparse keywords and flag group.
    """
    first: dict[str, tuple[type, dataclasses.Field]] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                first.setdefault(f.name, (klass, f))
    return [first[f.name] for f in dataclasses.fields(cls)]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, only: tuple[str, ...] | None = None,
                        override_only: bool = False, title: str | None = None,
                        choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field of dataclass `cls` (those named in `only`, if given), grouped by the class declaring
    each (its `flag_group`, or `title`).

    With override_only the defaults are None ("keep the preset's" / "keep the loaded model's"); otherwise --help
    shows each default, the one of `cls` itself (a mode's). `choices` sets a flag's choices known only at runtime.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for klass, f in _declared_fields(cls):
        tp = _flag_type(hints[f.name])
        meta = dict(f.metadata)
        if tp not in (int, float, str, bool) or not meta.pop("cli", True) or (only and f.name not in only):
            continue  # structured fields (e.g. rope_scaling) are set through presets, not flags
        group_title = title or getattr(klass, "flag_group", klass.__name__)
        group = groups.get(group_title) or groups.setdefault(group_title, parser.add_argument_group(group_title))
        help_ = meta.pop("help", "")
        aliases = meta.pop("aliases", ())  # other names of the flag (another project's), declared on the field
        if choices and f.name in choices:
            meta["choices"] = choices[f.name]
        default = None if override_only else defaults[f.name]
        if not override_only and default not in (None, ""):
            help_ += " (default: %(default)s)"
        if tp is bool:
            # --flag, --no-flag, and --flag=true/false (the form sweep tools generate).
            group.add_argument(f"--{f.name}", *aliases, type=parse_bool, nargs="?", const=True, default=default,
                               metavar="true|false", help=f"{help_} Off: --no-{f.name}.")
            group.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            negation = meta.pop("negation", None)  # the value --no-flag sets, for a switch that is more than a bool
            group.add_argument(f"--{f.name}", *aliases, **{"type": tp, **meta}, default=default, help=help_)
            if negation is not None:
                group.add_argument(f"--no-{f.name}", dest=f.name, action="store_const", const=negation,
                                   help=argparse.SUPPRESS)


def parsed_fields(cls: type, ns: argparse.Namespace, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The parsed values that belong to dataclass `cls` (those named in `only`, if given), skipping flags left at
    None."""
    names = {f.name for f in dataclasses.fields(cls)} & (set(only) if only is not None else {*vars(ns)})
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}

