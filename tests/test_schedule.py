"""Learning-rate schedules (cosine, warmup-stable-decay), a run that ends on a time budget with its schedule
complete, and --compile auto, which compiles a run whose steps to come repay it. Time is a fake clock: every
training step takes exactly one second of it (or as many as a test says)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, read_metrics, train_args
from trainer import loop, parallel
from trainer.schedule import budget_plan, lr_multiplier, parse_duration


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("600", 600), ("2 min", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "-5m", "0s", "5d"])
def test_not_durations(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor():
    lrs = [lr_multiplier(step, schedule="wsd", warmup_iters=2, total_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
           for step in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:8] == [1.0] * 6  # warmup, then the stable phase
    assert lrs[8] == pytest.approx(0.55) and lrs[9] == pytest.approx(0.1)  # the last 20%: linear to the floor
    assert lr_multiplier(50, schedule="wsd", warmup_iters=2, total_steps=None, min_lr_ratio=0.1) == 1.0  # unknown end


def test_cosine_is_unchanged_by_the_new_schedule():
    lrs = [lr_multiplier(s, schedule="cosine", warmup_iters=2, total_steps=10, min_lr_ratio=0.1) for s in range(12)]
    assert lrs[1] == 1.0 and lrs[2] == pytest.approx(1.0) and lrs[10:] == [0.1, 0.1]
    assert all(a > b for a, b in zip(lrs[2:10], lrs[3:10]))


class Killed(BaseException):
    pass


class FakeClock:
    """loop.clock that moves only when a training step runs: one second per step (or `seconds`); the process started
    5 s ago."""

    def __init__(self, monkeypatch, seconds: float = 1.0):
        self.now = 100.0
        real_step = loop.Trainer._train_step

        def step(trainer, batches):
            self.now += seconds
            return real_step(trainer, batches)

        monkeypatch.setattr(loop, "clock", lambda: self.now)
        monkeypatch.setattr(loop, "process_age", lambda: 5.0)
        monkeypatch.setattr(loop.Trainer, "_train_step", step)


def test_a_time_budget_ends_the_run_on_time_with_its_decay_complete(corpus, tmp_path, monkeypatch, capsys):
    FakeClock(monkeypatch)
    out = tmp_path / "run"
    result = train.main(train_args(corpus, out, "--time_budget", "60s", "--eval_interval", "0", "--eval_iters", "1",
                                   "--warmup_iters", "3"))
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    said = capsys.readouterr().out
    # 5 s of start-up, then 1 s a step: the stable part (80% of 60 s) is spent at step 43, and what is left, less
    # the final evaluation's estimate (one batch: a third of a step), holds 11 more steps.
    assert "--time_budget 60s: 48s spent by step 43; the learning rate decays from here to the run's end at step 54" \
        in said
    assert result["step"] == 54 and max(lrs) == 54
    assert lrs[4] == lrs[43] == pytest.approx(3e-3)  # the peak (pretraining's default), held
    assert all(a > b for a, b in zip([lrs[s] for s in range(44, 55)], [lrs[s] for s in range(45, 55)]))
    assert lrs[54] == pytest.approx(3e-4)  # the schedule is complete: the last step at the floor


def test_a_time_budget_counts_the_evaluations_still_to_come(corpus, tmp_path, monkeypatch):
    """Evaluations of 2 s every 10 steps of 1 s: the steps left after the plan pause for them too, and the run
    still ends within its 60 s."""
    clock = FakeClock(monkeypatch)
    real_evaluate = loop.Trainer.evaluate

    def evaluate(trainer):
        clock.now += 2.0
        return real_evaluate(trainer)

    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--time_budget", "60s", "--eval_interval", "10", "--eval_iters", "1",
                          "--warmup_iters", "3", "--save_interval_steps", "0"))
    assert 56.0 <= clock.now - 95.0 <= 60.0  # the process started at 95 on the fake clock


def test_every_rank_plans_the_same_length_from_the_slowest_ranks_clock(corpus, tmp_path, monkeypatch, capsys):
    """The plan is made from the ranks' largest time spent (an all-reduced max; here another rank 5 s ahead of this
    one's clock): every rank then stops at the same step, where each deciding on its own could differ by one."""
    FakeClock(monkeypatch)
    monkeypatch.setattr(loop, "all_reduce_max", lambda t: t.add_(torch.tensor([5.0, 0.0, 0.0], dtype=t.dtype)))
    out = tmp_path / "run"
    result = train.main(train_args(corpus, out, "--time_budget", "60s", "--eval_interval", "0", "--eval_iters", "1",
                                   "--warmup_iters", "3"))
    # 48 s of the other rank's clock by step 38 (43 on this one's), then 11 steps in what is left
    assert "--time_budget 60s: 48s spent by step 38;" in capsys.readouterr().out and result["step"] == 49


def test_under_torchrun_the_budget_counts_from_the_launchers_start():
    """A worker (TORCHELASTIC_RUN_ID set, as torchrun sets it) counts from its parent's start: here a launcher that
    waited 2 s before starting it."""
    worker = ("import time, psutil; from trainer.loop import process_age; "
              "print(process_age() - (time.time() - psutil.Process().create_time()))")
    launcher = (f"import os, subprocess, sys, time; time.sleep(2); subprocess.run([sys.executable, '-c', {worker!r}], "
                f"env={{**os.environ, 'TORCHELASTIC_RUN_ID': 'run'}}, check=True)")
    proc = subprocess.run([sys.executable, "-c", launcher], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 2.0 <= float(proc.stdout) < 10.0  # the launcher's 2 s (and its start) before the worker's own age


def test_a_time_budget_with_max_steps_never_raises_the_learning_rate_again(corpus, tmp_path, monkeypatch, capsys):
    """--max_steps 50 within a 60 s budget: wsd's decay over steps 41-50 began before the budget planned (step 43),
    and the budget's plan used to restart it from the peak there."""
    FakeClock(monkeypatch)
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--time_budget", "60s", "--max_steps", "50", "--eval_interval", "0",
                          "--eval_iters", "1", "--warmup_iters", "3", "--lr_schedule", "wsd"))
    assert "--max_steps 50 ends the run first, on its own schedule" in capsys.readouterr().out
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    assert len(lrs) == 50 and lrs[39] == pytest.approx(3e-3) and lrs[40] < lrs[39]  # steps 40 (the peak), 41
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(3e-4)


def test_the_budget_plan_continues_a_decay_that_began():
    # no --max_steps: the decay starts where the budget planned
    assert budget_plan(43, 54, None, warmup_iters=3, decay_fraction=0.2) == (54, 43)
    # --max_steps ends the run first: its own schedule, whatever the budget holds
    assert budget_plan(43, 54, 50, warmup_iters=3, decay_fraction=0.2) == (50, None)
    # the budget ends the run first (the steps turned slower) after --max_steps 50's decay began at step 40
    total, start = budget_plan(45, 47, 50, warmup_iters=3, decay_fraction=0.2)
    assert (total, start) == (47, 40)
    before = [lr_multiplier(s, schedule="wsd", warmup_iters=3, total_steps=50, min_lr_ratio=0.1) for s in range(45)]
    after = [lr_multiplier(s, schedule="wsd", warmup_iters=3, total_steps=total, min_lr_ratio=0.1, decay_start=start)
             for s in range(45, 47)]
    lrs = before[3:] + after  # after the warmup
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    # not yet begun: the decay starts where the budget planned
    assert budget_plan(43, 54, 100, warmup_iters=3, decay_fraction=0.2) == (54, 43)


def test_a_time_budget_resumes_its_decided_length(corpus, tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)
    common = ("--time_budget", "60s", "--eval_interval", "0", "--eval_iters", "1", "--warmup_iters", "3",
              "--save_interval_steps", "5")
    straight = tmp_path / "straight"
    train.main(train_args(corpus, straight, *common))
    out = tmp_path / "run"

    real_step = loop.Trainer._train_step

    def dying(trainer, batches):
        if trainer.state.step == 47:
            raise Killed  # after the length was decided (step 43) and saved (step 45), before the end
        return real_step(trainer, batches)

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "_train_step", dying)
        with pytest.raises(Killed):
            train.main(train_args(corpus, out, *common))
    clock.now += 1000.0  # the resume starts much later: the decided length stands
    assert train.main(train_args(corpus, out, *common, "--resume"))["step"] == 54
    a = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(straight) if "loss" in r}
    b = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(out) if "loss" in r}
    for step in range(41, 55):
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


@pytest.mark.parametrize("flags, message", [
    (["--time_budget", "soon"], "--time_budget 'soon' is not a duration"),
    (["--time_budget", "5m", "--lr_schedule", "cosine"], "--lr_schedule cosine needs the run's length up front"),
    (["--decay_fraction", "0"], "--decay_fraction 0: must be in (0, 1]"),
])
def test_bad_schedule_flags(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train.main(train_args(corpus, tmp_path / "x", *flags))
    assert message in capsys.readouterr().err


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """The models parallel.compile_blocks was given (it compiles nothing here: that is tested in test_fast_paths.py),
    with an Inductor cache folder of the test's own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    calls = []
    monkeypatch.setattr(parallel, "can_compile", lambda device: True)
    monkeypatch.setattr(parallel, "compile_blocks", lambda model, device: calls.append(model) or model)
    return calls


def test_compile_auto_compiles_once_the_first_steps_say_the_rest_repays_it(corpus, tmp_path, monkeypatch, compiles,
                                                                          capsys):
    """Pretraining's default: 10 eager steps timed (a minute each here), then 30 minutes of steps to come, whose
    saving beats the one-off cost: the blocks are compiled, in place, once; and a resume compiles them again at its
    start, for the same numerics as the run it continues."""
    FakeClock(monkeypatch, seconds=60.0)
    common = ("--max_steps", "40", "--eval_interval", "0", "--eval_iters", "1", "--save_interval_steps", "20")
    out = tmp_path / "run"
    real_step = loop.Trainer._train_step

    def dying(trainer, batches):
        if trainer.state.step == 25:
            raise Killed
        return real_step(trainer, batches)

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "_train_step", dying)
        with pytest.raises(Killed):
            train.main(train_args(corpus, out, *common))
    assert len(compiles) == 1 and type(compiles[0]).__name__ == "Transformer"  # the model itself, not a wrapper
    assert ("--compile auto: about 30 minutes of steps to come at 60.00 s a step: compiling each block during the "
            "next step") in capsys.readouterr().out
    assert json.loads((out / "checkpoints" / "step_000020" / "trainer_state.json").read_text())["compiled"] is True

    assert train.main(train_args(corpus, out, *common, "--resume"))["step"] == 40
    assert len(compiles) == 2
    assert "--compile auto: the run resumed had compiled its blocks; compiling them again" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--max_steps", "18"], ["--max_steps", "40", "--compile", "off"],
                                   ["--time_budget", "20m"]])
def test_compile_auto_leaves_eager_what_would_not_repay_it(corpus, tmp_path, monkeypatch, compiles, capsys, flags):
    """8 minutes of steps to come, or --compile off, or a budget whose remaining ~10 minutes at a minute a step save
    less than compiling costs: no compilation, and nothing said about it."""
    FakeClock(monkeypatch, seconds=60.0)
    train.main(train_args(corpus, tmp_path / "run", *flags, "--eval_interval", "0", "--eval_iters", "1"))
    assert compiles == [] and "--compile auto" not in capsys.readouterr().out


def test_compile_auto_compiles_shorter_runs_where_an_earlier_run_compiled_such_blocks(corpus, tmp_path, monkeypatch,
                                                                                      compiles, capsys):
    """About 7 minutes of steps to come save less than a first compilation costs, but more than compiling again
    from Inductor's cache: once a run of the same shape has compiled (--compile on here), such a run compiles too.
    Another shape (more rows a micro-batch) has nothing in the cache, and stays eager."""
    FakeClock(monkeypatch, seconds=20.0)
    run = ("--max_steps", "30", "--eval_interval", "0", "--eval_iters", "1", "--batch_size", "2")
    train.main(train_args(corpus, tmp_path / "first", *run))
    assert compiles == []
    train.main(train_args(corpus, tmp_path / "compiled", *run, "--compile", "on", "--max_steps", "2"))
    assert len(compiles) == 1
    capsys.readouterr()
    train.main(train_args(corpus, tmp_path / "again", *run))
    assert len(compiles) == 2
    assert ("--compile auto: about 7 minutes of steps to come at 20.00 s a step: compiling each block during the next "
            "step (a wait of seconds: an earlier run here compiled blocks like these") in capsys.readouterr().out
    train.main(train_args(corpus, tmp_path / "wider", *run, "--batch_size", "3"))
    assert len(compiles) == 2


def test_the_step_that_compiles_is_no_measure_of_a_time_budgets_rate(corpus, tmp_path, monkeypatch, compiles,
                                                                      capsys):
    """--compile on: the first step also compiles (30 s more here). The budget counts that time, but the steps after
    run at a second each, and the run's length is planned at that rate, not at one bent by the compiling step."""
    clock = FakeClock(monkeypatch)
    real_step = loop.Trainer._train_step

    def compiling_first(trainer, batches):
        clock.now += 30.0 if trainer.state.step == 0 else 0.0
        return real_step(trainer, batches)

    monkeypatch.setattr(loop.Trainer, "_train_step", compiling_first)
    result = train.main(train_args(corpus, tmp_path / "run", "--time_budget", "60s", "--compile", "on",
                                   "--eval_interval", "0", "--eval_iters", "1", "--warmup_iters", "3"))
    assert len(compiles) == 1
    # On the fake clock: start-up, the longer first step, then a second a step, reach 80% of the budget at step 13;
    # the rest, less the final evaluation's third of a step, holds 11 more steps.
    said = capsys.readouterr().out
    assert "48s spent by step 13; the learning rate decays from here to the run's end at step 24" in said
    assert result["step"] == 24
