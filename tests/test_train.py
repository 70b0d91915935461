"""The training loop: schedule, data order, loss going down, checkpoints, exact resume, DDP."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_model
import train
from conftest import ROOT, check_resume_is_exact, read_metrics, train_args, train_losses
from data import DataError
from trainer import checkpoint as ckpt
from trainer import other_flags
from trainer.errors import UsageError
from trainer.modes import MODES
from trainer.sampler import ResumableBatchSampler
from trainer.schedule import lr_multiplier


def test_lr_schedule_warmup_cosine_floor():
    m = [lr_multiplier(s, schedule="cosine", warmup_iters=10, total_steps=200, decay_iters=110, min_lr_ratio=0.1)
         for s in range(200)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert m[60] == pytest.approx(0.1 + 0.9 * 0.5)                    # cosine half way
    assert all(a >= b for a, b in zip(m[9:110], m[10:111]))            # monotone decay
    assert m[110] == m[199] == pytest.approx(0.1)                      # floor after the schedule


def test_sampler_two_ranks_see_what_one_rank_sees():
    one = list(ResumableBatchSampler(50, 4, seed=3, epoch=1))
    r0 = list(ResumableBatchSampler(50, 2, rank=0, world_size=2, seed=3, epoch=1))
    r1 = list(ResumableBatchSampler(50, 2, rank=1, world_size=2, seed=3, epoch=1))
    assert len(one) == len(r0) == len(r1) == 12  # 50 rows, 4 per step: the ragged 2 are dropped
    for step, rows in enumerate(one):
        assert sorted(rows) == sorted(r0[step] + r1[step])
    assert one != list(ResumableBatchSampler(50, 4, seed=3, epoch=2))  # a new order every epoch


def test_sampler_resumes_mid_epoch_and_with_another_world_size():
    full = [i for b in ResumableBatchSampler(64, 4, seed=0) for i in b]
    rest = [i for b in ResumableBatchSampler(64, 4, seed=0, start=24) for i in b]
    assert rest == full[24:]
    # Resumed by 2 processes after 24 rows: together they read exactly the remaining rows.
    two = [i for r in range(2) for b in ResumableBatchSampler(64, 2, r, 2, seed=0, start=24) for i in b]
    assert sorted(two) == sorted(full[24:])


def test_pretrain_loss_falls_and_exports(corpus, tmp_path):
    out = tmp_path / "run"
    result = train.main(train_args(corpus, out, "--max_steps", "60", "--learning_rate", "3e-3",
                                   "--eval_interval", "30"))
    losses = train_losses(out)
    first, last = losses[1], sum(losses[s] for s in range(51, 61)) / 10
    assert first > 6.0            # ~ln(6400) at the start
    assert last < 0.5 * first     # the model learned the small corpus
    assert result["val_loss"] < 0.5 * first
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert (out / "best" / "config.json").is_file()
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]


def test_final_folder_is_a_transformers_model_and_chats(corpus, tmp_path, capsys):
    """What a user does next: load final/ with transformers, and stream text from it with eval_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import eval_model
    from model import Transformer

    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "30", "--learning_rate", "3e-3", "--eval_interval", "0"))
    final = out / "final"
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    ours = Transformer.from_pretrained(final).eval()
    ids = AutoTokenizer.from_pretrained(final)("the king and the queen", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((final / "zero2llm.json").read_text())["chat"] is False
    capsys.readouterr()
    eval_model.main(["--model_path", str(final), "--prompt", "the king", "--max_new_tokens", "8",
                     "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("the king") and len(printed.split()) > 2  # the prompt, then generated words


def test_wandb_runs_offline_without_credentials(corpus, tmp_path, monkeypatch):
    from trainer.logger import wandb_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0", "--use_wandb"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_checkpoints_rotate_and_ignore_incomplete(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "7", "--save_interval_steps", "2",
                          "--keep_checkpoint_max", "2", "--eval_interval", "0"))
    names = [p.name for p in ckpt.list_checkpoints(out)]
    assert names == ["step_000006", "step_000007"]  # 2, 4 rotated away; 7 = the final step
    for name in names:
        files = {p.name for p in (out / "checkpoints" / name).iterdir()}
        assert {"model.safetensors", "config.json", "optimizer.pt", "scaler.pt",
                "rng_state_0.pt", ckpt.STATE_FILE} <= files
    # A half-written checkpoint (killed before its trainer_state.json landed) is never picked.
    half = out / "checkpoints" / "step_000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (out / "checkpoints" / "step_000010.tmp").mkdir()
    assert ckpt.latest_checkpoint(out).name == "step_000007"


def test_resume_continues_with_identical_losses(corpus, tmp_path):
    check_resume_is_exact(lambda out, *extra: train_args(corpus, out, *extra), tmp_path, 10, 5,
                          "--lr_decay_iters", "10", "--eval_interval", "0", "--dropout", "0.1", "--save_interval_steps", "5")


def test_accumulation_matches_a_bigger_batch(corpus, tmp_path):
    big, acc = tmp_path / "big", tmp_path / "acc"
    common = ("--max_steps", "4", "--eval_interval", "0", "--no-save_last")
    train.main(train_args(corpus, big, *common, "--batch_size", "4"))
    train.main(train_args(corpus, acc, *common, "--batch_size", "2", "--accumulation_steps", "2"))
    a, b = train_losses(big), train_losses(acc)
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_bfloat16_autocast_on_cpu_trains(corpus, tmp_path, capsys):
    out = tmp_path / "bf16"
    result = train.main(train_args(corpus, out, "--max_steps", "3", "--eval_interval", "0", "--dtype", "bfloat16"))
    assert math.isfinite(result["val_loss"])
    assert "1 process(es) on cpu, bfloat16 (--dtype bfloat16)" in capsys.readouterr().err  # the run says its dtype


def test_the_start_line_names_the_validation_data_and_a_shape_transformers_lacks(corpus, tmp_path, capsys):
    train.main(train_args(corpus, tmp_path / "a", "--max_steps", "1", "--n_heads", "6", "--n_kv_heads", "2"))
    err = capsys.readouterr().err
    assert f"validation rows ({corpus['val']})" in err
    assert ("transformers has no class for this shape (--dim 64 is not a multiple of --n_heads 6): the model is "
            "saved with model_type \"zero2llm\"") in err
    assert json.loads((tmp_path / "a" / "final" / "config.json").read_text())["model_type"] == "zero2llm"
    own_data = train_args(corpus, tmp_path / "b", "--max_steps", "1")
    del own_data[2:4]  # no --val_data_path: the user's own data is validated on rows carved off it
    train.main(own_data)
    err = capsys.readouterr().err
    assert "validation rows (--val_fraction 0.02 of the training data)" in err and "transformers has no class" not in err


@pytest.mark.parametrize("mode", sorted(MODES))
def test_validation_uses_the_samples_held_out_file_only_with_the_sample(mode, corpus, tmp_path, monkeypatch):
    """--val_data_path auto (the default): the shipped sample is validated on its held-out file; other training
    data on a carve-off of its own rows, never on the sample's file (whose loss would say nothing of the run)."""
    from trainer.config import TrainConfig

    monkeypatch.chdir(ROOT)
    Config = MODES[mode].Config

    def resolved(**flags) -> str:
        cfg = Config(out_dir=str(tmp_path / "out"), **flags)
        TrainConfig.check(cfg)  # the flags every mode shares (the fine-tuning modes' own check wants a model)
        return cfg.val_data_path

    sample = resolved()
    assert sample == f"dataset/{'sft' if mode == 'lora' else mode}_val.jsonl" and (ROOT / sample).is_file()
    assert resolved(data_path=f"./{Config.data_path}") == sample  # the same file, written another way
    assert resolved(data_path=str(corpus["train"])) == ""  # carved off --data_path
    assert resolved(data_path=str(corpus["train"]), val_data_path=str(corpus["val"])) == str(corpus["val"])
    assert resolved(val_data_path="") == ""


@pytest.mark.parametrize("flags, message", [
    (["--n_heads", "4", "--n_kv_heads", "3"], "multiple of n_kv_heads"),
    (["--data_path", "nope.jsonl"], "--data_path nope.jsonl: no such file"),
    (["--val_data_path", str(ROOT / "tokenizer")],
     f"--val_data_path {ROOT / 'tokenizer'}: a folder without .jsonl or .parquet or .txt or .bin files"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--num_experts_per_tok", "5", "--use_moe", "--n_routed_experts", "4"], "num_experts_per_tok"),
    (["--resume"], "--resume: no complete checkpoint"),
    (["--resume", "no/such/ckpt"], "--resume no/such/ckpt: no such checkpoint folder"),
    (["--val_fraction", "1.0"], "--val_fraction 1: must be in [0, 1)"),
    (["--val_fraction", "-0.1"], "--val_fraction -0.1: must be in [0, 1)"),
    (["--eval_iters", "-1"], "--eval_iters -1: must be >= 0 (0 = the whole validation set)"),
    (["--log_interval", "0"], "--log_interval 0: must be >= 1"),
    (["--save_interval_steps", "-5"], "--save_interval_steps -5: must be >= 0"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: must be >= 0"),
    (["--beta2", "1.5"], "--beta2 1.5, --min_lr_ratio 0.1: need AdamW's betas in [0, 1)"),
    (["--epochs", "0"], "--epochs 0: must be >= 1 (or set --max_steps)"),
    (["--lora_rank", "4"], "--lora_rank is for --mode lora, not --mode pretrain (drop it)"),
    (["--init_from", "x"], "--init_from is for the fine-tuning modes"),
    (["--lerning_rate", "1e-3"], "unrecognized argument --lerning_rate"),
    (["--temperature", "0.5"], "--temperature is for --mode grpo"),
    (["--tokenizer_path", str(ROOT / "dataset")], f"--tokenizer_path {ROOT / 'dataset'}: cannot load a tokenizer"),
    (["--out_dir", str(ROOT / "README.md" / "run")], f"{ROOT / 'README.md'} is a file, not a folder"),
])
def test_bad_flags_fail_before_any_work(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(corpus, tmp_path / "x", *flags))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, errors", [
    (["--hidden_size", "256", "--num_hidden_layers=2"],  # MiniMind's train_pretrain.py
     ["--hidden_size is MiniMind's name: use --dim 256", "--num_hidden_layers is MiniMind's name: use --n_layers 2"]),
    (["--mode", "sft", "--per_device_train_batch_size", "4", "--gradient_checkpointing", "--output_dir", "o"],
     ["--per_device_train_batch_size is TRL's and transformers' name: use --batch_size 4",
      "--gradient_checkpointing is TRL's and transformers' name: use --grad_checkpointing",
      "--output_dir is TRL's and transformers' name: use --out_dir o"]),
    # TRL's DPO --beta and --loss_type are --mode grpo's own flags (TRL's GRPO ones): in dpo they are renamed,
    # elsewhere they are grpo's
    (["--mode", "dpo", "--beta", "0.1", "--loss_type", "ipo"],
     ["--beta is TRL's and MiniMind's DPO name: use --dpo_beta 0.1",
      "--loss_type is TRL's DPO name: use --dpo_loss ipo"]),
    (["--beta", "0.1"], ["--beta is for --mode grpo, not --mode pretrain (drop it)"]),
    # a value the renamed flag would refuse: what it takes, not a second error after following the advice
    (["--mode", "dpo", "--loss_type", "hinge", "--num_train_epochs", "0.5"],
     ["--loss_type is TRL's DPO name for --dpo_loss, which takes sigmoid or ipo: hinge is not one",
      "--num_train_epochs is TRL's and transformers' name for --epochs, which takes a whole number: 0.5 is not one"]),
    # TRL's GRPO batch counts completions, ours prompts
    (["--mode", "grpo", "--per_device_train_batch_size", "16"],
     ["--per_device_train_batch_size is TRL's count of completions per device; --batch_size counts prompts, each "
      "sampled --num_generations (8) times: use --batch_size COMPLETIONS / 8"]),
    # LLM_training's settings and MiniMind's --use_compile (0/1: the value converts, as argparse would)
    (["--lr", "1e-3", "--num_epochs", "2", "--eval_iter", "5", "--use_compile", "1", "--drop_rate", "x"],
     ["--lr is many scripts' name: use --learning_rate 1e-3", "--num_epochs is LLM_training's name: use --epochs 2",
      "--eval_iter is LLM_training's name: use --eval_iters 5", "--use_compile is MiniMind's name: use --compile 1",
      "--drop_rate is LLM_training's name for --dropout, which takes a number: x is not one"]),
    # a config file or a folder written without its flag
    (["--mode", "sft", "configs/training/sft.yaml"],
     ["configs/training/sft.yaml: train.py reads no config file: write each of its keys as a flag (max_steps: 10 -> "
      "--max_steps 10)"]),
    (["tokenizer"], ["tokenizer: a folder is named after its flag (--data_path, --out_dir, --resume, ...)"]),
    # TRL's space-separated lists
    (["--mode", "lora", "--lora_target_modules", "q_proj", "v_proj"],
     ["unrecognized arguments: v_proj (a flag takes one value: quote a value with spaces, and join a list with "
      "commas"]),
    # renamed to a flag of another mode, or of none: why it is not this mode's
    (["--model_name_or_path", "m"], ["--model_name_or_path is TRL's name for --init_from; --init_from is for the "
                                     "fine-tuning modes"]),
    (["--mode", "sft", "--hidden_size", "64"], ["--hidden_size is MiniMind's name for --dim; --dim: --mode sft takes "
                                                "the architecture from --init_from"]),
    (["--mode", "lora", "--lora_r", "8", "--use_peft"],
     ["--lora_r is TRL's name: use --lora_rank 8", "--use_peft is TRL's: LoRA is a mode of its own: --mode lora"]),
    # no flag here means the same: a sentence
    (["--mode", "grpo", "--max_gen_len", "64", "--bf16"],
     ["--max_gen_len is MiniMind's name: use --max_completion_length 64", "--bf16 is TRL's and transformers': "
      "--dtype bfloat16"]),
    (["--lerning_rate", "1e-3", "--save_weight", "pretrain"],
     ["unrecognized argument --lerning_rate", "--save_weight is MiniMind's: the model is saved as a Hugging Face "
      "folder"]),
])
def test_other_projects_flags_are_answered_with_what_to_write_here(capsys, argv, errors):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(argv)
    assert exc.value.code == 2
    usage, *lines = capsys.readouterr().err.splitlines()
    mode = argv[1] if argv[0] == "--mode" else "pretrain"
    assert usage == f"usage: train.py [flags]; python train.py --mode {mode} --help lists them"  # not 50 lines of it
    assert len(lines) == len(errors)  # one line per flag, each with what to write here
    for line, error in zip(lines, errors):
        assert line.startswith(f"train.py: error: {error}")


def test_other_projects_names_point_at_flags_that_exist():
    """A rename of our flags, or a flag that the other names' table mentions, fails this when it goes stale."""
    parsers = {mode: train.build_parser(mode)._option_string_actions for mode in MODES}
    ours = set().union(*parsers.values()) | {"--nproc_per_node"}  # torchrun's, in the advice on --deepspeed
    for name, (_, use) in other_flags.TRAIN.items():
        assert set(re.findall(r"--[a-z_]+", use)) <= ours, name
        assert not all(name in flags for flags in parsers.values()), f"{name} is every mode's flag: never answered"
    evals = eval_model.build_parser()._option_string_actions
    for name, (_, use) in other_flags.EVAL.items():
        assert set(re.findall(r"--[a-z_]+", use)) <= set(evals) and name not in evals, name


@pytest.mark.parametrize("device, message", [("tpu", "--device tpu: not a device name"),
                                             ("cuda", "--device cuda: CUDA is not available")])
def test_a_device_this_machine_lacks_is_a_usage_error(corpus, tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match=message):
        train.main(train_args(corpus, tmp_path / "x", "--device", device))


def test_default_data_missing_outside_the_repository_says_where_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train.main(["--max_steps", "1"])
    assert ("--data_path dataset/pretrain.jsonl: no such file or folder; the defaults are relative to the "
            "repository root: run from there") in capsys.readouterr().err


# The defaults each mode had before its flags moved into its own config (trainer/modes/): they must not drift.
_FINETUNE = {"tokenizer_path": "", "optimizer": "adamw", "warmup_iters": 20, "eval_interval": 100, "eval_iters": 0}
MODE_DEFAULTS = {
    "pretrain": {"out_dir": "out/pretrain", "data_path": "dataset/pretrain.jsonl", "preset": "auto",
                 "val_data_path": "auto", "optimizer": "muon", "learning_rate": 3e-3,
                 "warmup_iters": 30},
    "sft": {**_FINETUNE, "out_dir": "out/sft", "data_path": "dataset/sft.jsonl",
            "val_data_path": "auto", "init_from": "out/pretrain/final", "learning_rate": 5e-4,
            "epochs": 2},
    "lora": {**_FINETUNE, "out_dir": "out/lora", "data_path": "dataset/sft.jsonl",
             "val_data_path": "auto", "init_from": "out/sft/final", "learning_rate": 2e-3,
             "epochs": 1, "lora_rank": 8, "lora_alpha": 16.0},
    "dpo": {**_FINETUNE, "out_dir": "out/dpo", "data_path": "dataset/dpo.jsonl",
            "val_data_path": "auto", "init_from": "out/sft/final", "learning_rate": 5e-5,
            "epochs": 1, "eval_interval": 50, "dpo_beta": 0.1},
    "grpo": {**_FINETUNE, "out_dir": "out/grpo", "data_path": "dataset/grpo.jsonl",
             "val_data_path": "auto", "init_from": "out/sft/final", "learning_rate": 5e-5,
             "batch_size": 8, "max_steps": 300, "warmup_iters": 5, "eval_interval": 50, "log_interval": 5,
             "num_generations": 8, "loss_type": "dapo"},
}


def test_help_shows_the_defaults_of_the_chosen_mode():
    assert set(MODE_DEFAULTS) == set(MODES)
    for mode, defaults in MODE_DEFAULTS.items():
        args = train.build_parser(mode).parse_args([])
        assert {k: getattr(args, k) for k in defaults} == defaults
        assert args.mode == mode
    sft_help = " ".join(train.build_parser("sft").format_help().split())
    assert "(default: out/pretrain/final)" in sft_help  # --init_from
    assert "(default: out/sft)" in sft_help and "(default: out/pretrain)" not in sft_help
    assert "(default: )" not in sft_help


def test_each_mode_takes_only_its_own_flags():
    """One parser per mode: a flag of another mode is not in it, and the error says whose flag it is."""
    flags = {mode: set(train.build_parser(mode)._option_string_actions) for mode in MODES}
    assert "--lora_rank" in flags["lora"] and "--lora_rank" not in flags["sft"] | flags["pretrain"]
    assert "--temperature" in flags["grpo"] and "--temperature" not in flags["sft"] | flags["dpo"]
    assert {"--preset", "--dim"} <= flags["pretrain"] and "--init_from" not in flags["pretrain"]
    for finetune in ("sft", "lora", "dpo", "grpo"):
        assert {"--init_from", "--max_seq_len", "--dropout"} <= flags[finetune]
        assert not {"--preset", "--dim", "--n_layers"} & flags[finetune]


def test_batch_larger_than_data_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(UsageError, match="Lower --batch_size"):
        train.main(train_args(corpus, tmp_path / "x", "--batch_size", "100000"))


def test_torchrun_two_processes_match_one(corpus, tmp_path):
    """2 CPU processes (gloo) x batch 2 must give the losses of 1 process x batch 4."""
    common = ("--max_steps", "4", "--eval_interval", "0", "--no-save_last", "--save_interval_steps", "0")
    one = tmp_path / "one"
    train.main(train_args(corpus, one, *common, "--batch_size", "4"))
    two, fresh = tmp_path / "two", tmp_path / "fresh"  # a copy of the corpus that no run has tokenized yet
    fresh.mkdir()
    copies = {name: Path(shutil.copy(path, fresh)) for name, path in corpus.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *train_args(copies, two, *common, "--batch_size", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("train", "val"):  # rank 0 tokenizes each file once; rank 1 reads its cache
        assert proc.stderr.count(f"{fresh / '.cache' / name}.") == 1, proc.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    seen = [[r["tokens_seen"] for r in read_metrics(run) if "tokens_seen" in r][-1] for run in (one, two)]
    assert seen[0] == seen[1] == 4 * 4 * 32  # 4 steps x 4 rows x 32 tokens, counted over both ranks
    val = [[r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1] for run in (one, two)]
    assert val[1] == pytest.approx(val[0], rel=1e-4)  # --eval_iters 4 global batches: the same 16 rows


def test_skip_bad_records_trains_and_reports_per_reason(corpus, tmp_path, capsys):
    """A strict run stops at the first bad line; --skip_bad_records trains on the rest and says what it skipped."""
    lines = corpus["train"].read_bytes().splitlines()
    bad = [b'{"text": "cut', b'{"txt": "typo"}', b'{"text": "caf\xe9"}', b'{"text": "cut again']
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines[:5] + bad[:2] + lines[5:] + bad[2:]) + b"\n")
    corpus = {**corpus, "train": src}
    with pytest.raises(DataError, match=rf"{src} line 6: malformed JSON"):
        train.main(train_args(corpus, tmp_path / "strict", "--max_steps", "1"))
    capsys.readouterr()
    out = tmp_path / "skip"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0", "--no-save_last",
                          "--skip_bad_records"))
    err = capsys.readouterr().err
    assert f"{src}: skipped 4 bad records (2 malformed JSON, 1 missing field 'text', 1 not UTF-8)" in err
    assert train_losses(out).keys() == {1, 2}
    (sidecar,) = (tmp_path / ".cache").glob("mixed.*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["n_bad_skipped"] == 4 and meta["skip_bad_records"] is True
    assert meta["sources"][0]["bad_skipped"] == {"malformed JSON": 2, "missing field 'text'": 1, "not UTF-8": 1}
    assert meta["n_docs"] == len(lines)


# ----------------------------------------------------------------------------- other projects' command lines

# Zer02LLM's README commands, with its script's name replaced by train.py (the flags are typed as it prints them).
ZER02LLM_PRETRAIN = [
    "--mode pretrain --device cpu --batch_size 2 --epochs 1 --dim 128 --n_layers 2 --max_seq_len 128 --n_heads 4",
    "--mode pretrain --batch_size 32 --epochs 1 --learning_rate 5e-4 --dim 512 --n_layers 8 --accumulation_steps 8 "
    "--save_interval 1000 --save_best_only --save_last --save_interval_steps 1000 --keep_checkpoint_max 5",
    "--mode pretrain --batch_size 32 --epochs 1 --learning_rate 5e-4 --dim 512 --n_layers 8 --accumulation_steps 8 "
    "--use_wandb --wandb_project Zer02LLM --wandb_log_model --wandb_log_code --wandb_watch_model --save_best_only "
    "--save_last",
    "--mode pretrain --ddp --batch_size 16 --accumulation_steps 8 --save_interval 1000 --save_best_only --save_last",
]


@pytest.mark.parametrize("command", ZER02LLM_PRETRAIN)
def test_zer02llm_pretrain_commands_parse_as_typed(corpus, tmp_path, command, capsys):
    flags = command.split()
    mode, cfg, model_cfg, _ = train.parse_config(flags + ["--data_path", str(corpus["train"]), "--val_data_path",
                                                          str(corpus["val"]), "--out_dir", str(tmp_path / "out")])
    assert mode.name == "pretrain" and cfg.save_last
    if "--n_layers" in flags:
        assert model_cfg.n_layers == int(flags[flags.index("--n_layers") + 1])
    if "--save_interval" in flags:
        assert cfg.save_interval_steps == 1000
    if "--ddp" in flags:
        assert "--ddp without torchrun: one process" in capsys.readouterr().err


@pytest.mark.parametrize("flags, shape, source", [
    ([], (256, 6), "small preset"),  # the quick start's one epoch
    (["--time_budget", "2m"], (192, 4), "mini preset, --preset auto's choice for a --time_budget of 10 minutes or less"),
    (["--time_budget", "10m"], (192, 4), "mini preset, --preset auto's choice for a --time_budget of 10 minutes or less"),
    (["--time_budget", "20m"], (256, 6), "small preset, --preset auto's choice for a --time_budget over 10 minutes"),
    (["--time_budget", "2m", "--preset", "small"], (256, 6), "small preset"),  # a preset asked for is kept
    (["--time_budget", "2m", "--n_layers", "6"], (192, 6), None),  # a model flag overrides one field of mini
])
def test_preset_auto_takes_the_short_budgets_shape(corpus, tmp_path, flags, shape, source):
    """--preset auto (the default): mini, which won the model-shape searches at 2-10 minute budgets, under such a
    --time_budget; small otherwise."""
    mode, cfg, model_cfg, _ = train.parse_config(["--data_path", str(corpus["train"]), "--val_data_path",
                                                  str(corpus["val"]), "--out_dir", str(tmp_path / "out"), *flags])
    assert (model_cfg.dim, model_cfg.n_layers) == shape
    assert (model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.max_seq_len) == (8, 2, 256)
    if source:
        assert mode.source(cfg) == source


def test_a_resumed_run_keeps_the_preset_auto_gave_its_first_start(corpus, tmp_path):
    """A 2-minute run (mini) resumed with a 20-minute budget (which would start small) resumes mini; a run begun
    with an explicit preset keeps that one."""
    out = tmp_path / "run"
    common = ["--data_path", str(corpus["train"]), "--val_data_path", str(corpus["val"]), "--out_dir", str(out),
              "--max_seq_len", "32", "--batch_size", "2", "--device", "cpu", "--dtype", "float32", "--eval_iters", "1",
              "--warmup_iters", "1", "--log_interval", "1"]
    train.main(common + ["--time_budget", "2m", "--max_steps", "1", "--save_interval_steps", "1"])
    mode, cfg, model_cfg, _ = train.parse_config(common + ["--resume", "auto", "--time_budget", "20m"])
    assert (model_cfg.dim, model_cfg.n_layers) == (192, 4)
    assert mode.source(cfg) == "mini preset, the model the resumed run began with (--preset auto)"
    assert train.main(common + ["--resume", "auto", "--time_budget", "20m", "--max_steps", "2"])["step"] == 2

    state = ckpt.latest_checkpoint(out) / "trainer_state.json"
    began = json.loads(state.read_text())
    began["config"]["preset"] = "small"  # as a run from before --preset auto recorded its default
    state.write_text(json.dumps(began))
    assert train.parse_config(common + ["--resume", str(state.parent), "--time_budget", "2m"])[2].n_layers == 6


def test_zer02llm_sft_command_says_the_shape_comes_from_init_from(base_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--mode", "sft", "--init_from", str(base_model), "--batch_size", "16", "--dim", "512",
                            "--n_layers", "8", "--max_seq_len", "512", "--save_interval", "1000", "--save_best_only"])
    errors = capsys.readouterr().err.splitlines()[1:]  # after the usage line, one line per flag it cannot take
    assert [e.split(" (")[0] for e in errors] == [f"train.py: error: --{flag}: --mode sft takes the architecture from "
                                                  "--init_from" for flag in ("dim", "n_layers")]


def test_save_interval_is_save_interval_steps(corpus, tmp_path):
    """One flag with two names, declared once on the field: --help shows both, the last one given wins."""
    args = train_args(corpus, tmp_path / "x")
    assert train.parse_config(args + ["--save_interval", "7"])[1].save_interval_steps == 7
    assert train.parse_config(args + ["--save_interval", "7", "--save_interval_steps", "9"])[1].save_interval_steps == 9
    action = train.build_parser("sft")._option_string_actions["--save_interval"]
    assert action.dest == "save_interval_steps" and action.option_strings == ["--save_interval_steps", "--save_interval"]


@pytest.mark.parametrize("flags, value", [
    ([], "auto"), (["--compile"], "on"), (["--no-compile"], "off"), (["--compile", "off"], "off"),
    (["--compile=true"], "on"), (["--compile=False"], "off"), (["--compile", "auto"], "auto"),
])
def test_compile_is_a_three_way_switch_that_still_takes_the_boolean_forms(corpus, tmp_path, flags, value):
    """--compile was a boolean: the bare flag, --no-compile and the --flag=true/false of sweep tools keep working."""
    assert train.parse_config(train_args(corpus, tmp_path / "x") + flags)[1].compile == value


def test_compile_auto_is_only_pretrainings_default(base_model, tmp_path, capsys):
    sft = ["--mode", "sft", "--init_from", str(base_model), "--out_dir", str(tmp_path / "x")]
    assert train.parse_config(sft)[1].compile == "off"  # fine-tuning batches vary in length: a graph per length
    with pytest.raises(SystemExit):
        train.parse_config(sft + ["--compile", "sometimes"])
    assert "argument --compile: expected auto, on or off, got 'sometimes'" in capsys.readouterr().err


def test_mode_test_names_what_to_use_instead(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--mode", "test"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("train.py: error: --mode test:") and "eval_model.py" in line and \
        "scripts/pipeline_check.py" in line


def test_ddp_alone_runs_one_process_and_local_rank_sets_local_rank(corpus, tmp_path, capsys, monkeypatch):
    for var in ("LOCAL_RANK", "WORLD_SIZE"):  # set, then removed: the test's own LOCAL_RANK is undone after it
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    result = train.main(train_args(corpus, tmp_path / "run", "--max_steps", "2", "--eval_interval", "0", "--ddp",
                                   "--local_rank", "0"))
    assert result["step"] == 2 and os.environ["LOCAL_RANK"] == "0"
    err = capsys.readouterr().err
    assert err.count("--ddp without torchrun: one process") == 1 and "1 process(es)" in err
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's own variable wins over a launcher's flag
    train.parse_config(train_args(corpus, tmp_path / "x", "--local-rank=3"))
    assert os.environ["LOCAL_RANK"] == "0"


class FakeWandb:
    """A stand-in wandb module: records what the run sends, with no network and no files."""

    def __init__(self) -> None:
        self.config, self.logged, self.watched, self.code, self.artifacts = None, [], None, None, []

    def init(self, config: dict, **kwargs):
        self.config, wandb = config, self

        class Run:
            id = "run1"

            def log(self, data: dict, step: int) -> None:
                wandb.logged.append(step)

            def watch(self, model, log, log_freq: int) -> None:
                wandb.watched = (type(model).__name__, log, log_freq)

            def log_code(self, root: str, include_fn) -> None:
                wandb.code = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                                    for f in files if include_fn(os.path.join(d, f), root))

            def log_artifact(self, artifact, aliases: list[str]) -> None:
                wandb.artifacts.append((artifact.name, sorted(os.listdir(artifact.folder)), aliases))

            def finish(self) -> None:
                pass

        return Run()

    class Artifact:
        def __init__(self, name: str, type: str, metadata: dict) -> None:
            self.name, self.type, self.metadata = name, type, metadata

        def add_dir(self, folder: str) -> None:
            self.folder = folder


def test_wandb_flags_of_zer02llm(corpus, tmp_path, monkeypatch):
    """The architecture is in the run's config; every 2nd training record goes (validation ones always), and the
    run's last, so that the run's summary is its end; best/ and final/ become artifact versions; the model is
    watched; the repository's Python files are saved."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "6", "--eval_interval", "3", "--use_wandb",
                          "--wandb_log_freq", "2", "--wandb_log_model", "--wandb_log_code", "--wandb_watch_model",
                          "--wandb_watch_log", "all", "--wandb_watch_log_freq", "5"))
    assert (fake.config["model"]["dim"], fake.config["model"]["n_layers"]) == (64, 2)
    assert fake.config["wandb_log_freq"] == 2 and fake.config["learning_rate"] == 3e-3
    assert fake.logged == [1, 3, 3, 5, 6, 6]  # training records of steps 1, 3, 5 and the last, 6; validation at 3, 6
    assert fake.watched == ("Transformer", "all", 5)
    assert "train.py" in fake.code and "trainer/loop.py" in fake.code and not any(
        c.startswith((".", "out/")) or not c.endswith(".py") for c in fake.code)
    names = {a[2][0] for a in fake.artifacts}
    assert names <= {"best", "final"} and fake.artifacts[-1][2] == ["final", "step-6"]
    assert all(a[0] == "model-run1" and "model.safetensors" in a[1] and "config.json" in a[1] for a in fake.artifacts)


def test_wandb_flags_run_offline(corpus, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0", "--use_wandb", "--wandb_log_model",
                          "--wandb_log_code", "--wandb_watch_model", "--wandb_log_freq", "2"))
    (run,) = (out / "wandb").glob("offline-run-*")
    record = next(run.glob("*.wandb")).read_bytes()  # what `wandb sync` will upload: config, code, artifacts
    assert b'"dim":64,"n_layers":2' in record and b"source-zero2llm" in record
    assert b"model-" + run.name.rsplit("-", 1)[1].encode() in record and b'{"folder":"final","step":2}' in record


def test_data_path_takes_a_folder_and_a_raw_bin_with_its_dtype(corpus, tmp_path, capsys):
    """A folder of corpus files trains on all of them; a .bin without its sidecar needs --bin_dtype."""
    import data as data_lib
    from data import load_tokenizer

    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = corpus["train"].read_text().splitlines()
    (folder / "part-1.jsonl").write_text("\n".join(lines[:150]) + "\n")
    (folder / "part-2.jsonl").write_text("\n".join(lines[150:]) + "\n")
    train.main(train_args(corpus, tmp_path / "folder", "--max_steps", "2", "--eval_interval", "0",
                          "--data_path", str(folder)))
    assert "part-1+1." in capsys.readouterr().err  # one cache, prepared from both files
    raw = tmp_path / "raw.bin"
    data_lib.prepare_pretrain(corpus["train"], load_tokenizer(ROOT / "tokenizer"), raw, show_progress=False)
    raw.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="raw.bin: no sidecar raw.json .* pass --bin_dtype uint16 or uint32"):
        train.main(train_args(corpus, tmp_path / "raw", "--data_path", str(raw), "--max_steps", "2"))
    result = train.main(train_args(corpus, tmp_path / "raw", "--data_path", str(raw), "--bin_dtype", "uint16",
                                   "--max_steps", "2", "--eval_interval", "0"))
    assert result["step"] == 2
    # Another tokenizer's ids: a larger --vocab_size gives them embeddings, but the tokenizer still has no tokens for
    # them (the exported model could neither read nor write its data)
    foreign = tmp_path / "foreign.bin"
    np.arange(7_000, 7_200, dtype=np.uint32).tofile(foreign)
    with pytest.raises(DataError, match=r"token id 7000 at offset 0 is beyond the 6,400 tokens of the tokenizer "
                                        r"\(--tokenizer_path tokenizer\)"):
        train.main(train_args(corpus, tmp_path / "foreign", "--data_path", str(foreign), "--bin_dtype", "uint32",
                              "--vocab_size", "100000", "--max_steps", "1"))


@pytest.mark.parametrize("argv", [["--mode", "sft", "--init_from", "{pth}"], ["--resume", "{pth}"],
                                  ["--mode", "dpo", "--ref_model_path", "{pth}"]])
def test_a_bare_weights_file_is_named_as_one(tmp_path, capsys, argv):
    """MiniMind's full_sft_512.pth where a model folder goes: said to be a weights file without its architecture,
    not "no model there" (the file is there)."""
    pth = tmp_path / "full_sft_512.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, pth)
    with pytest.raises(SystemExit):
        train.parse_config([a.format(pth=pth) for a in argv] + ["--out_dir", str(tmp_path / "out")])
    assert f"{pth} is a file, not a model folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="full_sft_512.pth is a file, not a model folder .* a bare weights file"):
        eval_model.load_model(pth)


def test_validation_scores_the_same_rows_however_the_global_batch_is_split(corpus, tmp_path):
    """--eval_iters counts global batches: batch 4, and batch 2 x 2 accumulation steps (or x 2 processes), score the
    same validation rows, so the same weights get the same val_loss (it used to count one process's batches)."""
    still = ("--max_steps", "1", "--learning_rate", "0", "--muon_learning_rate", "0", "--eval_iters", "2",
             "--save_interval_steps", "0")
    whole = train.main(train_args(corpus, tmp_path / "a", *still, "--batch_size", "4"))
    split = train.main(train_args(corpus, tmp_path / "b", *still, "--batch_size", "2", "--accumulation_steps", "2"))
    half = train.main(train_args(corpus, tmp_path / "c", *still, "--batch_size", "2"))  # another global batch
    assert split["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    assert half["val_loss"] != pytest.approx(whole["val_loss"], rel=1e-4)  # fewer rows: another mean
