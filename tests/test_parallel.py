"""Scale: FSDP2 (2 CPU processes with gloo match 1 process; sharded checkpoints resume, also with another process
count, from and to DDP checkpoints, and with LoRA), activation checkpointing and torch.compile."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, check_resume_is_exact, sft_args, train_args, train_losses
from model import Transformer
from model.config import config_from_preset
from trainer import checkpoint as ckpt
from trainer.distributed import DistEnv
from trainer.parallel import parallelize

# Muon, pretraining's default, needs whole matrices and is refused under --fsdp (tests/test_optim.py)
ADAMW = ("--optimizer", "adamw", "--learning_rate", "1e-3")
COMMON = ("--max_steps", "6", "--eval_interval", "0", "--save_interval_steps", "3", "--eval_iters", "0", *ADAMW)


def torchrun(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def test_a_refused_out_dir_stops_every_process_with_its_line(corpus, tmp_path):
    """Rank 0 refuses an --out_dir holding a run: the other process stops with the same line, where it used to
    wait at a barrier until rank 0's exit broke the connection (a gloo traceback before the line)."""
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "1", "--eval_interval", "0"))
    proc = torchrun(*train_args(corpus, out, "--max_steps", "1"), check=False)
    line = f"train.py: error: --out_dir {out} holds an earlier run"
    assert proc.returncode != 0 and proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "gloo" not in proc.stderr


def final_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(40).view(2, 20) * 7 % 300).logits


def test_fsdp_two_processes_match_one_and_resume_with_one(corpus, tmp_path):
    """2 processes x batch 1 x 2 accumulation steps, sharded (--fsdp): the losses and the consolidated final/ of 1
    process x batch 4 without FSDP. Its sharded step-3 checkpoint resumes in 1 process, with --fsdp (resharded)
    and without, and a DDP-style checkpoint resumes under --fsdp: the same losses again. (The 45 validation rows
    leave rank 1 no row in the last evaluation step: it must still join the FSDP forward, or rank 0 hangs.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(train_args(corpus, one, *COMMON, "--batch_size", "4"))
    proc = torchrun(*train_args(corpus, two, *COMMON, "--batch_size", "1", "--accumulation_steps", "2", "--fsdp"))
    assert "returned a view tensor" not in proc.stderr  # FSDP2's warning about in-place ops on the logits: none
    a, b = train_losses(one), train_losses(two)
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert (two / "checkpoints" / "step_000003" / ckpt.SHARDED).is_dir()
    assert not (two / "checkpoints" / "step_000003" / "model.safetensors").exists()
    reference = final_logits(one / "final")
    torch.testing.assert_close(final_logits(two / "final"), reference, atol=1e-4, rtol=0)
    # eval_model reads a sharded checkpoint whole: the model of the unsharded run's checkpoint of the same step
    import eval_model

    ids = torch.arange(40).view(2, 20) * 7 % 300
    sharded, whole = (eval_model.load_model(run / "checkpoints" / "step_000003") for run in (two, one))
    torch.testing.assert_close(sharded(ids).logits, whole(ids).logits, atol=1e-4, rtol=0)
    assert (two / "checkpoints" / "step_000003" / "tokenizer.json").is_file()

    for name, source, flags in (("fsdp_1", two, ("--fsdp",)), ("plain_1", two, ()), ("ddp_to_fsdp", one, ("--fsdp",))):
        out = tmp_path / name
        shutil.copytree(source / "checkpoints" / "step_000003", out / "checkpoints" / "step_000003")
        train.main(train_args(corpus, out, *COMMON, "--batch_size", "4", "--resume", *flags))
        resumed = train_losses(out)
        assert sorted(resumed) == [4, 5, 6], name
        for step in resumed:
            assert resumed[step] == pytest.approx(a[step], rel=1e-5), (name, step)
        torch.testing.assert_close(final_logits(out / "final"), reference, atol=1e-4, rtol=0)


def test_fsdp_resume_is_exact(corpus, tmp_path):
    """Straight vs interrupted + --resume under --fsdp (sharded checkpoints through the tmp + rename scheme):
    identical losses, with dropout."""
    check_resume_is_exact(lambda out, *extra: train_args(corpus, out, *extra), tmp_path, 6, 3, "--fsdp", *ADAMW,
                          "--lr_decay_iters", "6", "--eval_interval", "0", "--dropout", "0.1",
                          "--save_interval_steps", "3", "--no-save_last")


def test_fsdp_lora_resumes_exactly_and_exports_the_adapter(base_model, tmp_path):
    files = {"train": ROOT / "dataset" / "sft_val.jsonl", "val": ROOT / "dataset" / "sft_val.jsonl"}
    args = lambda out, *extra: sft_args(files, base_model, out, "--mode", "lora", "--lora_rank", "4", *extra)  # noqa: E731
    check_resume_is_exact(args, tmp_path, 4, 2, "--fsdp", "--lr_decay_iters", "4", "--eval_interval", "0",
                          "--save_interval_steps", "2", "--lora_dropout", "0.0")
    assert (tmp_path / "straight" / "final" / "adapter_model.safetensors").is_file()
    # eval_model reads the sharded checkpoint of the last step as the exported adapter on its base, merged
    import eval_model

    ids = torch.arange(40).view(2, 20) * 7 % 300
    sharded, final = (eval_model.load_model(tmp_path / "straight" / folder) for folder in
                      ("checkpoints/step_000004", "final"))
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids).logits, final(ids).logits, atol=1e-5, rtol=0)


def test_fsdp_dpo_shards_the_reference_too(base_model, tmp_path):
    """DPO under --fsdp (policy and frozen reference both sharded; every rank runs the reference in step):
    the losses of the plain run."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in (ROOT / "dataset" / "dpo.jsonl").read_text().splitlines()[:40]
                             if "<think>" not in line))
    losses = []
    for name, flags in (("plain", ()), ("fsdp", ("--fsdp",))):
        train.main(["--mode", "dpo", "--init_from", str(base_model), "--data_path", str(pairs), "--val_data_path",
                    str(pairs), "--out_dir", str(tmp_path / name), "--max_steps", "3", "--batch_size", "4",
                    "--learning_rate", "1e-3", "--warmup_iters", "0", "--log_interval", "1", "--eval_interval", "0",
                    "--no-save_last", "--save_interval_steps", "0", "--device", "cpu", "--dtype", "float32", *flags])
        losses.append(train_losses(tmp_path / name))
    assert sorted(losses[1]) == [1, 2, 3] and losses[0][3] != losses[0][1]
    for step in (1, 2, 3):
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-5), step


def test_fsdp_flag_errors(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(train_args(corpus, tmp_path / "x", "--fsdp", *ADAMW, "--dtype", "float16"))
    assert "--fsdp with --dtype float16" in capsys.readouterr().err


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", [{}, dict(use_moe=True, qk_norm=True)])
def test_grad_checkpointing_gives_the_same_loss_and_grads(variant):
    torch.manual_seed(0)
    model = Transformer(config_from_preset("tiny", dropout=0.1, **variant)).train()
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(model, x)
    checkpointed = parallelize(copy.deepcopy(model), DistEnv(0, 1, torch.device("cpu")), fsdp=False,
                               dtype=torch.float32, grad_checkpointing=True, compile=False)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, x)
    assert loss_ckpt == loss  # dropout masks replayed exactly in the recomputation
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        loss_and_grads(model, x)
    kept_ckpt, kept_plain = sum(n for n in saved if n > 0), -sum(n for n in saved if n < 0)
    assert kept_ckpt < kept_plain / 2  # what it is for: far fewer activations kept for backward
