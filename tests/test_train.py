"""The training loop: schedule, data order, loss going down, checkpoints, exact resume, DDP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, check_resume_is_exact, read_metrics, train_args, train_losses
from data import DataError
from trainer import checkpoint as ckpt
from trainer.config import UsageError
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


@pytest.mark.parametrize("flags, message", [
    (["--n_heads", "4", "--n_kv_heads", "3"], "multiple of n_kv_heads"),
    (["--data_path", "nope.jsonl"], "--data_path nope.jsonl: no such file"),
    (["--val_data_path", str(ROOT / "dataset")], f"--val_data_path {ROOT / 'dataset'}: a folder; pass one data file"),
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
_FINETUNE = {"tokenizer_path": "", "warmup_iters": 20, "eval_interval": 100, "eval_iters": 0}
MODE_DEFAULTS = {
    "pretrain": {"out_dir": "out/pretrain", "data_path": "dataset/pretrain.jsonl", "preset": "small",
                 "val_data_path": "dataset/pretrain_val.jsonl", "learning_rate": 1e-3, "warmup_iters": 30},
    "sft": {**_FINETUNE, "out_dir": "out/sft", "data_path": "dataset/sft.jsonl",
            "val_data_path": "dataset/sft_val.jsonl", "init_from": "out/pretrain/final", "learning_rate": 5e-4,
            "epochs": 2},
    "lora": {**_FINETUNE, "out_dir": "out/lora", "data_path": "dataset/sft.jsonl",
             "val_data_path": "dataset/sft_val.jsonl", "init_from": "out/sft/final", "learning_rate": 2e-3,
             "epochs": 1, "lora_rank": 8, "lora_alpha": 16.0},
    "dpo": {**_FINETUNE, "out_dir": "out/dpo", "data_path": "dataset/dpo.jsonl",
            "val_data_path": "dataset/dpo_val.jsonl", "init_from": "out/sft/final", "learning_rate": 5e-5,
            "epochs": 1, "eval_interval": 50, "dpo_beta": 0.1},
    "grpo": {**_FINETUNE, "out_dir": "out/grpo", "data_path": "dataset/grpo.jsonl",
             "val_data_path": "dataset/grpo_val.jsonl", "init_from": "out/sft/final", "learning_rate": 2e-5,
             "batch_size": 8, "max_steps": 200, "warmup_iters": 5, "eval_interval": 25, "log_interval": 5,
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
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *train_args(corpus, two, *common, "--batch_size", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    seen = [[r["tokens_seen"] for r in read_metrics(run) if "tokens_seen" in r][-1] for run in (one, two)]
    assert seen[0] == seen[1] == 4 * 4 * 32  # 4 steps x 4 rows x 32 tokens, counted over both ranks


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
