"""What happens when things go wrong: signals, divergence, broken checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import ROOT, read_metrics, train_args, train_losses
from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointError
from trainer.loop import TrainingError


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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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


def test_divergence_stops_with_a_checkpoint_from_before(corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="NaN/inf for 2 consecutive steps") as exc:
        train.main(train_args(corpus, out, "--max_steps", "50", "--learning_rate", "1e30", "--max_bad_steps", "2",
                              "--warmup_iters", "0", "--grad_clip", "0", "--eval_interval", "0"))
    assert str(ckpt.latest_checkpoint(out)) in str(exc.value)
    records = [r for r in read_metrics(out) if "skipped_steps" in r]
    assert records[-1]["skipped_steps"] == 2


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
