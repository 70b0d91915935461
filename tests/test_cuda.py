"""The CUDA paths, where a GPU is (bench/gpu.sh runs them there); without one they skip, and the GPU script is
only checked to parse and plan."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, check_resume_is_exact, train_args, train_losses
from model import ModelConfig, Transformer, generate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_training_learns_in_each_autocast_dtype(corpus, tmp_path, dtype):
    out = tmp_path / dtype
    train.main(train_args(corpus, out, "--device", "cuda", "--dtype", dtype, "--max_steps", "20",
                          "--eval_interval", "0"))
    losses = train_losses(out)
    assert losses[20] < losses[1] - 0.5


@cuda
def test_cuda_resume_is_exact(corpus, tmp_path):
    check_resume_is_exact(lambda out, *extra: train_args(corpus, out, *extra), tmp_path, 6, 3, "--device", "cuda",
                          "--dtype", "bfloat16", "--eval_interval", "0", "--save_interval_steps", "3",
                          "--lr_decay_iters", "6")


@cuda
def test_cuda_greedy_decoding_equals_the_cpus():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                    max_seq_len=64)).eval()
    prompt = torch.randint(3, 320, (2, 8), generator=torch.Generator().manual_seed(1))
    on_cpu = torch.stack(list(generate(model, prompt, 16, temperature=0)), dim=1)
    on_gpu = torch.stack(list(generate(model.cuda(), prompt.cuda(), 16, temperature=0)), dim=1)
    assert torch.equal(on_cpu, on_gpu.cpu())


def test_the_gpu_script_parses_and_plans_without_a_gpu():
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("would run: ") == 3 and "dry run: 3 steps planned" in r.stdout
