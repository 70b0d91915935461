"""What happens when things go wrong: signals, divergence, broken checkpoints."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, read_metrics, train_args, train_losses
from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointError
from trainer.loop import TrainingError


def same_threads() -> dict[str, str]:
    """A child's environment with this process's thread count: the losses it logs are compared bit for bit with
    runs in this process, and Muon's bf16 Newton-Schulz matmuls round differently at another thread count."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _wait_for_step(out_dir, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out_dir / "metrics.jsonl"
        if metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics(out_dir)):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {out_dir} after {timeout}s")


def test_sigterm_checkpoints_and_resume_continues_exactly(corpus, tmp_path):
    common = ("--max_steps", "400", "--eval_interval", "0", "--save_interval_steps", "0")
    env = same_threads()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(corpus, out, *common)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume" in stdout + stderr
    stopped = ckpt.latest_checkpoint(out)
    step = int(stopped.name.split("_")[1])
    assert 3 <= step < 400 and not (out / "final").exists()

    train.main(train_args(corpus, out, *common, "--max_steps", str(step + 3), "--resume", "--lr_decay_iters", "400"))
    straight = tmp_path / "straight"
    train.main(train_args(corpus, straight, *common, "--max_steps", str(step + 3), "--lr_decay_iters", "400"))
    a, b = train_losses(straight), train_losses(out)
    for s in range(1, step + 4):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), s


def test_divergence_stops_with_a_checkpoint_from_before(corpus, tmp_path, monkeypatch):
    from trainer.objectives import CausalLMObjective

    real_call, calls = CausalLMObjective.__call__, {"n": 0}

    def diverging(self, model, batch):  # from step 4 on the loss (and so every gradient) is NaN
        calls["n"] += 1
        loss, metrics = real_call(self, model, batch)
        return (loss * float("nan") if calls["n"] >= 4 else loss), metrics

    monkeypatch.setattr(CausalLMObjective, "__call__", diverging)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="NaN/inf for 2 consecutive steps") as exc:
        train.main(train_args(corpus, out, "--max_steps", "50", "--max_bad_steps", "2", "--eval_interval", "0"))
    assert str(ckpt.latest_checkpoint(out)) in str(exc.value) and "the weights from before were saved" in str(exc.value)
    records = [r for r in read_metrics(out) if "skipped_steps" in r]
    assert records[-1]["skipped_steps"] == 2
    saved = ckpt.latest_checkpoint(out)
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(saved / "model.safetensors")).values())


def test_checkpoint_of_another_architecture_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0"))
    with pytest.raises(CheckpointError, match=r"different model: dim=64 \(this run: 128\)"):
        train.main(train_args(corpus, out, "--max_steps", "4", "--resume", "--dim", "128"))


def test_truncated_checkpoint_is_a_clear_error(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0"))
    weights = ckpt.latest_checkpoint(out) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the weights"):
        train.main(train_args(corpus, out, "--max_steps", "4", "--resume"))
    (ckpt.latest_checkpoint(out) / "optimizer.pt").write_bytes(b"\x00" * 10)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train.main(train_args(corpus, out, "--max_steps", "4", "--resume"))


def test_trainer_state_without_its_fields_is_a_clear_error(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0", "--no-save_last"))
    (ckpt.latest_checkpoint(out) / ckpt.STATE_FILE).write_text('{"world_size": 1}')
    with pytest.raises(CheckpointError, match="trainer_state.json: lacks step, epoch"):
        train.main(train_args(corpus, out, "--max_steps", "4", "--resume"))


@pytest.mark.parametrize("disk_full, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    # What torch.save really raises when a full disk cuts its zip archive (seen on a 10 MiB tmpfs).
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1643584 vs 1643472"), "unexpected pos"),
])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, disk_full, reason):
    real_save, calls = torch.save, {"n": 0}

    def save_until_disk_full(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint's 3 torch.save calls succeed, then the disk is full
            raise disk_full
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_disk_full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=rf"{reason}.* MiB free there\); the previous checkpoint .*step_000002 is "
                                              rf"intact"):
        train.main(train_args(corpus, out, "--max_steps", "6", "--save_interval_steps", "2", "--eval_interval", "0"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]  # no half-written step_000004
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert train.main(train_args(corpus, out, "--max_steps", "6", "--resume", "--eval_interval", "0"))["step"] == 6


def test_out_of_memory_names_the_flags_that_help(corpus, tmp_path, monkeypatch):
    from trainer.objectives import CausalLMObjective

    def oom(self, model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(CausalLMObjective, "__call__", oom)
    with pytest.raises(TrainingError, match="out of memory at step 1. Reduce memory with --batch_size"):
        train.main(train_args(corpus, tmp_path / "run", "--max_steps", "2"))


def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(corpus, tmp_path):
    """SIGKILL (no chance to clean up) at random points, mid-step or mid-checkpoint, four times.

    Each kill lands within 0.05 s of a new checkpoint; 64 steps leave room for four kills at any step speed
    a tiny model reaches on CPU (~40-100 steps/s), so the run is really interrupted."""
    steps = 64
    common = ("--max_steps", str(steps), "--lr_decay_iters", str(steps), "--save_interval_steps", "1",
              "--keep_checkpoint_max", "2", "--eval_interval", "0", "--dropout", "0.1")
    straight = tmp_path / "straight"
    train.main(train_args(corpus, straight, *common))
    out = tmp_path / "killed"
    rng = random.Random(1234)
    env = same_threads()
    for _ in range(4):
        resume = ("--resume",) if ckpt.latest_checkpoint(out) else ()
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(corpus, out, *common, *resume)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = ckpt.latest_checkpoint(out)
        while ckpt.latest_checkpoint(out) == before and proc.poll() is None:  # let it make progress first
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        assert proc.wait() in (0, -signal.SIGKILL), proc.stderr.read()[-2000:]
    killed_at = int(ckpt.latest_checkpoint(out).name.split("_")[1])
    assert killed_at < steps  # the kills really interrupted the run
    train.main(train_args(corpus, out, *common, "--resume"))
    a, b = train_losses(straight), train_losses(out)
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), s


def test_resume_with_fewer_processes_continues_the_same_data(corpus, tmp_path):
    """2 processes x batch 2 for 3 steps, then 1 process x batch 4: the losses of a 1-process run."""
    common = ("--lr_decay_iters", "6", "--eval_interval", "0", "--save_interval_steps", "3")
    out = tmp_path / "two_then_one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *train_args(corpus, out, *common, "--max_steps", "3", "--batch_size", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train.main(train_args(corpus, out, *common, "--max_steps", "6", "--batch_size", "4", "--resume"))
    straight = tmp_path / "one"
    train.main(train_args(corpus, straight, *common, "--max_steps", "6", "--batch_size", "4"))
    a, b = train_losses(straight), train_losses(out)
    for s in range(1, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-4), s


def test_first_signal_is_recorded_second_ctrl_c_stops_at_once():
    from trainer.interrupt import StopOnSignal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.poll(torch.device("cpu")) == signal.SIGTERM  # recorded: the loop finishes its step first
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored afterwards
