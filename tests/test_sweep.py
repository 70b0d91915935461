"""run_sweep.py offline: wandb's sweep engine drives real train.py trials, hyperband stops a lagging
one, failed and diverged trials are recorded while the sweep goes on, an interrupted sweep resumes,
and a bad YAML fails with one line naming the key."""
from __future__ import annotations

import csv
import shutil
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

import run_sweep
from sweep.config import SweepConfigError, check_command, check_schema, check_semantics, load_config
from sweep.trials import ARG_MACROS, Trial, expand_command, format_args, load_trials, trial_command
from trainer.modes import MODES
from conftest import ROOT, TINY, read_metrics

COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # trials resolve train.py's relative defaults (tokenizer/) from here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny trials on a shared CPU: no thread oversubscription


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_train_sweep(tmp_path: Path, corpus: dict[str, Path], parameters: dict, **top) -> Path:
    """A sweep YAML whose trials are tiny train.py runs on the test corpus."""
    fixed = {flag[2:]: {"value": value} for flag, value in zip(TINY[::2], TINY[1::2])}
    fixed.update(data_path={"value": str(corpus["train"])}, val_data_path={"value": str(corpus["val"])})
    config = {"program": "train.py", "command": COMMAND, "method": "grid",
              "metric": {"name": "val_loss", "goal": "minimize"}, **top, "parameters": {**fixed, **parameters}}
    return write_yaml(tmp_path / "sweep.yaml", config)


STEPS = 200


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, Path]) -> tuple[list[str], Path]:
    """One offline grid sweep of two tiny train.py trials at once: a good learning rate and a hopeless
    one, under hyperband (its first band is the first evaluation). Returns (its arguments, its folder).
    200 steps: long enough (a few seconds) that the sweep's 0.5 s poll stops the lagging trial mid-run."""
    tmp = tmp_path_factory.mktemp("tiny_sweep")
    config = tiny_train_sweep(tmp, corpus, {"learning_rate": {"values": [3.0e-3, 1.0e-7]},
                                            "max_steps": {"value": STEPS}, "eval_interval": {"value": 4}},
                              early_terminate={"type": "hyperband", "min_iter": 1, "eta": 3})
    args = ["--config", str(config), "--sweep_dir", str(tmp / "sweep"), "--offline", "--parallel", "2",
            "--kill_grace", "20"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setenv("OMP_NUM_THREADS", "1")
        assert run_sweep.main(args) == 0
    return args, tmp / "sweep"


def test_grid_sweep_runs_two_tiny_trials_and_ranks_them(tiny_sweep, capsys):
    args, out = tiny_sweep
    rows = list(csv.DictReader(open(out / "results.csv")))
    best = {t: min(r["val_loss"] for r in read_metrics(out / "trials" / t) if "val_loss" in r)
            for t in ("trial_001", "trial_002")}
    assert [r["trial"] for r in rows] == sorted(best, key=best.get)  # ranked by best val_loss, from metrics.jsonl
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert float(rows[0]["val_loss"]) == pytest.approx(min(best.values()))
    assert [r["learning_rate"] for r in rows] == ["0.003", "1e-07"]
    for name in best:  # each trial ran train.py with its parameters and its own out_dir
        trial = json.loads((out / "trials" / name / "trial.json").read_text())
        assert trial["command"][2:3] == ["train.py"] and f"--out_dir={out / 'trials' / name}" in trial["command"]
        assert f"--learning_rate={trial['params']['learning_rate']}" in trial["command"]
    assert (out / "trials" / "trial_001" / "final" / "model.safetensors").is_file()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"

    assert run_sweep.main(args) == 2  # the folder holds a sweep: only --resume may continue it
    assert "continue it with --resume" in capsys.readouterr().err


def test_hyperband_stops_the_trial_whose_val_loss_lags(tiny_sweep):
    good, lagging = load_trials(tiny_sweep[1])
    assert good.state == "finished" and max(r["step"] for r in good.records) == STEPS, good
    assert lagging.state == "stopped" and lagging.reason.startswith("hyperband: val_loss "), lagging
    assert max(r["step"] for r in lagging.records) < STEPS, lagging  # killed mid-run
    rows = list(csv.DictReader(open(tiny_sweep[1] / "results.csv")))
    assert [(r["trial"], r["state"], r["note"]) for r in rows] == [("trial_001", "finished", ""),
                                                                   ("trial_002", "stopped", lagging.reason)]


FAKE_TRAIN = '''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--out_dir"); p.add_argument("--outcome")
a = p.parse_args()
os.makedirs(a.out_dir, exist_ok=True)
path = os.path.join(a.out_dir, "metrics.jsonl")
again = os.path.exists(path)
def log(step, value):
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "val_loss": value}) + "\\n")
log(1, 3.0)
if a.outcome == "slow" and not again:
    open(os.path.join(a.out_dir, "pid"), "w").write(str(os.getpid()))
    time.sleep(120)
if a.outcome == "crash":
    sys.exit("boom: simulated crash")
log(2, {"good": 1.0, "worse": 2.0, "slow": 1.5, "nan": None}[a.outcome])
'''


def fake_sweep(tmp_path: Path, outcomes: list[str]) -> Path:
    """A grid sweep whose trials are a stand-in program: instant, and each outcome on demand."""
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE_TRAIN)
    return write_yaml(tmp_path / "fake.yaml", {
        "program": str(program), "command": COMMAND, "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"}, "parameters": {"outcome": {"values": outcomes}}})


def test_failed_and_diverged_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    assert run_sweep.main(["--config", str(fake_sweep(tmp_path, ["worse", "crash", "nan", "good"])),
                           "--sweep_dir", str(out), "--offline"]) == 0
    rows = {r["outcome"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert [(o, rows[o]["state"], rows[o]["rank"]) for o in ("good", "worse", "crash", "nan")] == [
        ("good", "finished", "1"), ("worse", "finished", "2"), ("crash", "failed", ""), ("nan", "failed", "")]
    assert "exit code 1" in rows["crash"]["note"] and "boom: simulated crash" in rows["crash"]["note"]
    assert rows["nan"]["note"] == "diverged: val_loss is not finite at step 2"


def test_a_metric_the_trials_never_log_names_what_they_did_log(tmp_path):
    config = fake_sweep(tmp_path, ["good"])
    config.write_text(config.read_text().replace("name: val_loss", "name: val_los"))
    out = tmp_path / "sweep"
    assert run_sweep.main(["--config", str(config), "--sweep_dir", str(out), "--offline"]) == 0
    (row,) = csv.DictReader(open(out / "results.csv"))
    assert (row["state"], row["note"]) == (
        "failed", "wrote no val_los to metrics.jsonl (it logged val_loss; check the YAML's metric.name)")


def test_resume_keeps_the_sweeps_count(tmp_path, capsys):
    """A random sweep's --count is its length: --resume without it continues to that length (it used to stop with
    "a random sweep never runs out of configurations"), and a larger --count extends it."""
    config, out = fake_sweep(tmp_path, ["good", "worse"]), tmp_path / "sweep"
    config.write_text(config.read_text().replace("method: grid", "method: random"))
    assert run_sweep.main(["--config", str(config), "--sweep_dir", str(out), "--offline", "--count", "1"]) == 0
    assert run_sweep.main(["--resume", "--sweep_dir", str(out), "--offline"]) == 0
    assert len(load_trials(out)) == 1
    assert run_sweep.main(["--resume", "--config", str(config), "--sweep_dir", str(out), "--offline",
                           "--count", "2"]) == 0
    assert len(load_trials(out)) == 2


def test_interrupted_sweep_continues_with_resume(tmp_path):
    config, out = fake_sweep(tmp_path, ["slow", "good"]), tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "run_sweep.py", "--config", str(config), "--sweep_dir", str(out),
                              "--offline", "--kill_grace", "5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    pid_file = out / "trials" / "trial_001" / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)  # the pid is written before the trial sleeps
    sweep.send_signal(signal.SIGINT)
    output = sweep.communicate(timeout=60)[0]
    assert sweep.returncode == 130, output
    assert "continue with --resume" in output
    with pytest.raises(ProcessLookupError):  # the trial was stopped with the sweep, not orphaned
        os.kill(int(pid_file.read_text()), 0)
    interrupted = Trial.load(out / "trials" / "trial_001")
    assert interrupted.state == "running" and interrupted.reason == "interrupted"

    assert run_sweep.main(["--resume", "--sweep_dir", str(out), "--offline"]) == 0
    trials = load_trials(out)
    assert [(t.name, t.params["outcome"], t.state) for t in trials] == [
        ("trial_001", "slow", "finished"), ("trial_002", "good", "finished")]
    assert [v for _, v in trials[0].history("val_loss")] == [3.0, 1.5]  # relaunch re-logged step 1: one value


def test_online_agent_runs_each_trial_and_streams_its_metrics_to_wandb(tmp_path, monkeypatch):
    """No network here: a stand-in wandb module checks the glue (sweep -> agent -> trial -> run.log)."""
    calls: dict = {"logged": {}, "errors": []}

    class Run:
        def __init__(self, run_id: str, outcome: str) -> None:
            self.id, self.config = run_id, {"outcome": outcome}
            calls["logged"][run_id] = []

        def log(self, data: dict, step: int) -> None:
            calls["logged"][self.id].append((step, data))

    runs = iter([Run("run_a", "good"), Run("run_b", "crash")])

    def sweep(config: dict, project: str, entity: str | None) -> str:
        calls["sweep"] = (config["parameters"], project)
        return "sweep1"

    def agent(sweep_id: str, function, project: str, entity: str | None, count: int) -> None:
        for _ in range(count):
            try:
                function()
            except RuntimeError as e:  # wandb's agent records the run as failed and goes on
                calls["errors"].append(str(e))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(sweep=sweep, agent=agent,
                                                                   init=lambda dir: next(runs)))
    out = tmp_path / "online"
    config = fake_sweep(tmp_path, ["good", "crash"])
    assert run_sweep.main(["--config", str(config), "--online", "--project", "p", "--count", "2",
                           "--sweep_dir", str(out)]) == 0
    assert calls["sweep"] == ({"outcome": {"values": ["good", "crash"]}}, "p")
    assert calls["logged"]["run_a"] == [(1, {"val_loss": 3.0}), (2, {"val_loss": 1.0})]
    assert calls["errors"] == ["run_b failed: exit code 1: boom: simulated crash"]
    assert [(t.name, t.state) for t in load_trials(out)] == [("run_a", "finished"), ("run_b", "failed")]


def test_resumed_train_py_trial_continues_from_its_checkpoint(tmp_path):
    config = {"program": "train.py", "command": COMMAND, "parameters": {}}
    trial = Trial(tmp_path / "trial_001", {"learning_rate": 0.01, "save_last": True})
    assert trial_command(config, trial)[2:] == ["train.py", "--learning_rate=0.01", "--save_last=True",
                                                          f"--out_dir={trial.folder}"]
    checkpoint = trial.folder / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert trial_command(config, trial)[-1] == "--resume=auto"


def test_command_macros_format_parameters_as_wandbs_agent_does(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data")
    args = {"learning_rate": 0.001, "use_moe": True, "flash_attn": False, "preset": "tiny"}
    command = ["${env}", "${interpreter}", "${program}", "--data_path=${envvar:DATA_ROOT}/a.jsonl", "${args}"]
    assert expand_command(command, "train.py", args) == [
        "/usr/bin/env", sys.executable, "train.py", "--data_path=/data/a.jsonl", "--learning_rate=0.001",
        "--use_moe=True", "--flash_attn=False", "--preset=tiny"]
    wandb_sweep_utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    theirs = wandb_sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    for macro in ARG_MACROS:
        assert format_args(args, macro) == theirs[macro], macro


BASE = {"method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {"learning_rate": {"values": [1.0e-3, 3.0e-3]}, "max_steps": {"value": 5}}}


def test_a_training_config_is_not_taken_for_a_sweep(tmp_path):
    """LLM_training's config/qwen600m.yaml given to run_sweep.py: one line, not one per missing sweep key."""
    path = write_yaml(tmp_path / "qwen600m.yaml", {"model": {"name": "qwen"}, "training": {"batch_size": 2}})
    with pytest.raises(SweepConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: not a sweep config: a sweep has method, metric and parameters (see "
                            f"sweep_configs/); a training config's keys are train.py's flags, given on its command line")


@pytest.mark.parametrize("change, expected", [
    ({"method": "random", "parameters": {"learning_rate": {"min": 0.01, "max": 0.001}}},
     "parameters.learning_rate: min 0.01 is not less than max 0.001"),
    ({"method": "grdi"}, "method: 'grdi' is not one of"),
    ({"metric": {"name": "val_loss", "goal": "minimise"}}, "metric.goal: 'minimise' is not one of"),
    ({"parameters": {"learning_rate": {"vals": [1, 2]}}}, "parameters.learning_rate: vals: unknown key"),
    ({"method": "random", "parameters": {"learning_rate": {"distribution": "log_uniform_value", "min": 1, "max": 2}}},
     "parameters.learning_rate: distribution: unknown distribution 'log_uniform_value'"),
    ({"method": "random", "parameters": {"learning_rate": {"min": "1e-4", "max": 1.0e-2}}},
     "parameters.learning_rate: min: '1e-4' is not of type 'number' (YAML reads 1e-4 as text"),
    ({"parameters": {"learning_rate": {"min": 1.0e-4, "max": 1.0e-2}}},
     "method (grid): Parameter learning_rate is a disallowed type with grid search"),
    ({"metric": None}, "metric: missing"),
    ({"paramters": BASE["parameters"]}, "paramters: unknown key"),
    ({"early_terminate": {"type": "hyperband"}}, "early_terminate: needs max_iter + s or min_iter"),
    ({"parameters": {"lerning_rate": {"value": 0.1}}}, "parameters.lerning_rate: train.py does not accept "
                                                       "--lerning_rate=0.1"),
    ({"parameters": {"learning_rate": {"values": ["fast"]}}}, "parameters.learning_rate: train.py rejects "
                                                              "--learning_rate=fast"),
    ({"command": ["${env}", "${interpreter}", "${program}"]}, "command: needs ${args}"),
    ({"parameters": {"batch_size": {"values": [8, 16]}, "eval_iters": {"value": 5}}},  # validated on 40 or 80 rows
     "parameters.batch_size: trials of other global batches would be validated on other rows (eval_iters 5 counts "
     "global batches), so their val_loss would not compare: add eval_iters: {value: 0}"),
    ({"parameters": {"accumulation_steps": {"values": [1, 2]}}}, "parameters.accumulation_steps: trials of other "
                                                                 "global batches would be validated on other rows "
                                                                 "(eval_iters 50"),
])
def test_bad_yaml_fails_with_one_line_naming_the_key(tmp_path, change, expected):
    config = {**BASE, "program": "train.py", **change}
    path = write_yaml(tmp_path / "bad.yaml", {k: v for k, v in config.items() if v is not None})
    with pytest.raises(SweepConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {expected}"), str(e.value)


def test_bad_yaml_on_the_command_line_exits_2_with_the_message(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("method: grid\nparameters:\n  learning_rate: {values: [1, 2]\n")
    assert run_sweep.main(["--config", str(path), "--sweep_dir", str(tmp_path / "s"), "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not valid YAML") and f'"{path}", line 3' in err


def test_a_count_below_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_sweep.main(["--config", str(ROOT / "sweep_configs" / "pretrain.yaml"), "--count", "-1", "--offline",
                        "--sweep_dir", str(tmp_path / "s")])
    assert exc.value.code == 2 and "--count must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_config_without_its_flag_is_answered_with_the_flag(tmp_path, capsys):
    """python run_sweep.py sweep_configs/pretrain.yaml, as scripts that take the file as their argument are run."""
    with pytest.raises(SystemExit) as exc:
        run_sweep.main(["sweep_configs/pretrain.yaml", "--sweep_dir", str(tmp_path / "s")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("run_sweep.py: error: sweep_configs/pretrain.yaml: name it "
                                                        "with --config sweep_configs/pretrain.yaml")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["time_budget", "time_budget_shape"])
def test_shipped_recipe_searches_are_valid(name):
    """The time-to-quality searches pass every check; the one that varies the batch validates on the whole
    validation set (eval_iters 0), which the checks require of it."""
    config = load_config(ROOT / "sweep_configs" / f"{name}.yaml")
    batch = config["parameters"].get("batch_size", {"value": "the default"})
    assert "value" in batch or config["parameters"]["eval_iters"] == {"value": 0}


@pytest.mark.parametrize("mode", ["pretrain", "sft", "lora", "dpo", "grpo"])
def test_shipped_sweep_configs_are_valid(mode):
    path = ROOT / "sweep_configs" / f"{mode}.yaml"
    if mode in MODES:  # a mode train.py does not have yet: its flags are checked once it exists
        config = load_config(path)
    else:
        config = yaml.safe_load(path.read_text())
        for check in (check_schema, check_semantics, check_command):
            assert check(config) == [], check.__name__
    # GRPO ranks by its validation reward; its val_loss is the same number negated
    metric = {"name": "val_reward", "goal": "maximize"} if mode == "grpo" else {"name": "val_loss", "goal": "minimize"}
    assert config["metric"] == metric and config["parameters"]["mode"] == {"value": mode}


@pytest.mark.parametrize("name, axis, values", [("time_budget", "optimizer", ["adamw", "muon"]),
                                                 ("time_budget_shape", "dim", [192, 256, 384])])
def test_the_time_budget_sweeps_are_valid(name, axis, values):
    """The recipe searches of a fixed wall time (sweep_configs/time_budget*.yaml): grids of valid pretrain flags."""
    config = load_config(ROOT / "sweep_configs" / f"{name}.yaml")
    assert config["method"] == "grid" and config["metric"] == {"name": "val_loss", "goal": "minimize"}
    assert config["parameters"]["time_budget"] == {"value": "2m"}
    assert config["parameters"][axis] == {"values": values}


def test_a_trial_killed_before_its_first_checkpoint_starts_again_and_one_after_it_resumes(corpus, tmp_path):
    """What a relaunched trial is told: --overwrite when the kill left only the start of a run (train.py refuses a
    folder holding a run otherwise), --resume once it has a checkpoint; both commands then run."""
    config = load_config(tiny_train_sweep(tmp_path, corpus, {"max_steps": {"value": 4}, "eval_interval": {"value": 0},
                                                             "save_interval_steps": {"value": 2}}))
    folder = tmp_path / "trial_001"
    folder.mkdir()
    trial = Trial(folder, {k: spec["value"] for k, spec in config["parameters"].items()})
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')  # killed before its first checkpoint
    command = trial_command(config, trial)
    assert "--overwrite=True" in command and not any(c.startswith("--resume") for c in command)
    subprocess.run(command[1:], check=True, cwd=ROOT, capture_output=True, timeout=300)
    shutil.rmtree(folder / "final")
    shutil.rmtree(folder / "checkpoints" / "step_000004")  # as if killed after step 2's checkpoint
    command = trial_command(config, trial)
    assert "--resume=auto" in command and not any(c.startswith("--overwrite") for c in command)
    subprocess.run(command[1:], check=True, cwd=ROOT, capture_output=True, timeout=300)
    assert [r["step"] for r in read_metrics(folder) if "loss" in r][-1] == 4


# ----------------------------------------------------------------------------- --gpu (Zer02LLM's flag)

GPU_TRAIN = '''
import argparse, json, os, time
p = argparse.ArgumentParser()
p.add_argument("--out_dir"); p.add_argument("--outcome")
a = p.parse_args()
os.makedirs(a.out_dir, exist_ok=True)
start = time.time()
with open(os.path.join(a.out_dir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 1, "val_loss": 2.0}) + "\\n")
time.sleep(0.8)
with open(os.path.join(a.out_dir, "gpu.json"), "w") as f:
    json.dump({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}, f)
'''


def test_gpu_runs_one_trial_per_gpu_at_a_time(tmp_path, monkeypatch):
    """--gpu 0,1 on a machine that reports 2 GPUs: two trials at a time, each with CUDA_VISIBLE_DEVICES one of
    them, and never two trials on one GPU at once."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    program = tmp_path / "gpu_train.py"
    program.write_text(GPU_TRAIN)
    config = write_yaml(tmp_path / "gpu.yaml", {
        "program": str(program), "command": COMMAND, "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"}, "parameters": {"outcome": {"values": list("abcd")}}})
    out = tmp_path / "sweep"
    assert run_sweep.main(["--config", str(config), "--sweep_dir", str(out), "--offline", "--gpu", "0,1"]) == 0
    runs = [json.loads((t.folder / "gpu.json").read_text()) for t in load_trials(out)]
    assert len(runs) == 4 and {r["gpu"] for r in runs} == {"0", "1"}
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            assert a["gpu"] != b["gpu"] or a["end"] <= b["start"] or b["end"] <= a["start"]
    assert max(a["start"] for a in runs[:2]) < min(a["end"] for a in runs[:2])  # two at a time


def test_gpu_without_cuda_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = fake_sweep(tmp_path, ["good"])
    with pytest.raises(SystemExit) as exc:
        run_sweep.main(["--config", str(config), "--sweep_dir", str(tmp_path / "s"), "--gpu", "0,1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "run_sweep.py: error: --gpu 0,1: CUDA is not available here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for flags, message in [(["--gpu", "0,1", "--parallel", "3"], "at most one trial per GPU at a time, so at most 2"),
                           (["--gpu", "2"], "this process sees 2 GPU(s), 0 to 1; there is no GPU 2"),
                           (["--gpu", "0,0"], "expected distinct GPU ids")]:
        with pytest.raises(SystemExit):
            run_sweep.main(["--config", str(config), "--sweep_dir", str(tmp_path / "s"), *flags])
        assert message in capsys.readouterr().err
