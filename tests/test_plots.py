"""Training curves (trainer/plots.py): curves.png at the end of every run and on demand, its panels drawn from
metrics.jsonl (the data checked, not only that a picture exists)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from conftest import ROOT, read_metrics, train_args, write_jsonl
from trainer import plots
from trainer.plots import plot_runs, smoothed


def lines(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (x, y) of each line of an axes."""
    return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata())) for line in ax.get_lines()}


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def pretrain_records() -> list[dict]:
    """A run's records: training steps 1..40 (losses falling with noise), validation every 10 steps, and steps 31..40
    logged twice, as after a resume from step 30 (the later records are the ones that count)."""
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, 41):
        rows.append({"step": step, "loss": 8 - 0.1 * step + rng.normal(0, 0.2), "lr": 1e-3 * min(1, step / 5),
                     "tokens_seen": 512 * step, "grad_norm": 1.0})
        if step % 10 == 0:
            rows.append({"step": step, "val_loss": 8 - 0.1 * step, "val_ppl": 100.0})
    for step in range(31, 41):
        rows.append({"step": step, "loss": 3.0 + 0.01 * step, "lr": 1e-4, "tokens_seen": 512 * step})
    return rows


def test_the_loss_panels_hold_the_logged_values_and_their_smoothing(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "metrics.jsonl", pretrain_records())
    fig = plot_runs([tmp_path])
    shown = panels(fig)
    assert list(shown) == ["loss", "loss against tokens seen", "learning rate"]  # no DPO/GRPO panels for pretraining
    loss = shown["loss"]
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("step", "loss")
    latest = {}
    for r in pretrain_records():  # a later record of a step wins
        if "loss" in r:
            latest[r["step"]] = r["loss"]
    steps, values = np.array(sorted(latest), dtype=float), np.array([latest[s] for s in sorted(latest)])
    drawn = lines(loss)
    np.testing.assert_array_equal(drawn["_train (as logged)"][0], steps)
    np.testing.assert_allclose(drawn["_train (as logged)"][1], values)
    np.testing.assert_allclose(drawn["train (smoothed)"][1], smoothed(values))
    np.testing.assert_allclose(drawn["validation"][1], [7.0, 6.0, 5.0, 4.0])
    raw = next(line for line in loss.get_lines() if line.get_label() == "_train (as logged)")
    assert raw.get_alpha() < 0.5  # faint behind the smoothed line
    by_tokens = lines(shown["loss against tokens seen"])
    assert shown["loss against tokens seen"].get_xlabel() == "tokens seen"
    np.testing.assert_allclose(by_tokens["train (smoothed)"][0], steps * 512)
    np.testing.assert_allclose(by_tokens["validation"][0], [5120, 10240, 15360, 20480])  # from the training records
    ((_, lr),) = lines(shown["learning rate"]).values()
    assert lr[0] == pytest.approx(2e-4) and lr[-1] == pytest.approx(1e-4)


def test_the_smoothing_follows_the_trend_and_keeps_the_first_value() -> None:
    trend = np.linspace(13, 3, 100)
    noisy = trend + np.array([2.0, -2.0] * 50)
    out = smoothed(noisy)
    assert out[0] == pytest.approx(noisy[0])
    assert np.abs(out[20:] - trend[20:]).max() < np.abs(noisy - trend).max() / 2  # closer to the trend than the raw
    assert smoothed(np.array([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]  # a handful of points: drawn as they are


def test_dpo_and_grpo_runs_get_their_panels(tmp_path: Path) -> None:
    dpo, grpo = tmp_path / "dpo", tmp_path / "grpo"
    dpo.mkdir(), grpo.mkdir()
    write_jsonl(dpo / "metrics.jsonl", [
        {"step": s, "loss": 0.69 - 0.01 * s, "lr": 1e-5, "tokens_seen": 100 * s, "rewards/margin": 0.1 * s,
         "rewards/accuracy": 0.5 + 0.05 * s} for s in range(1, 6)] + [
        {"step": 5, "val_loss": 0.6, "val_rewards/margin": 0.4, "val_rewards/accuracy": 0.7}])
    write_jsonl(grpo / "metrics.jsonl", [
        {"step": s, "loss": 0.01, "lr": 1e-6, "tokens_seen": 50 * s, "reward": 0.2 * s, "kl": 0.001 * s,
         "completion_length": 60 - s} for s in range(1, 5)] + [
        {"step": 4, "val_loss": 0.0, "val_reward": 0.5, "val_completion_length": 40.0}])
    shown = panels(plot_runs([dpo]))
    assert {"DPO reward margin", "DPO accuracy"} <= set(shown) and "GRPO reward" not in shown
    np.testing.assert_allclose(lines(shown["DPO reward margin"])["_train (as logged)"][1], [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(lines(shown["DPO accuracy"])["validation"][1], [0.7])
    shown = panels(plot_runs([grpo]))
    assert {"GRPO reward", "GRPO KL to the reference", "GRPO completion length"} <= set(shown)
    assert "DPO accuracy" not in shown
    np.testing.assert_allclose(lines(shown["GRPO reward"])["_train (as logged)"][1], [0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(lines(shown["GRPO completion length"])["validation"][1], [40.0])


def test_a_muon_run_gets_a_panel_of_muons_learning_rate(tmp_path: Path) -> None:
    muon, adamw = tmp_path / "muon", tmp_path / "adamw"
    muon.mkdir(), adamw.mkdir()
    write_jsonl(muon / "metrics.jsonl", [{"step": s, "loss": 5.0, "lr": 3e-3 * s / 4, "lr_muon": 0.02 * s / 4,
                                          "tokens_seen": 100 * s} for s in range(1, 5)])
    write_jsonl(adamw / "metrics.jsonl", [{"step": s, "loss": 5.0, "lr": 1e-3, "tokens_seen": 100 * s}
                                          for s in range(1, 5)])
    shown = panels(plot_runs([muon]))
    np.testing.assert_allclose(lines(shown["Muon learning rate (hidden matrices)"])["_train"][1],
                               [0.005, 0.01, 0.015, 0.02])
    np.testing.assert_allclose(lines(shown["learning rate"])["_train"][1], [7.5e-4, 1.5e-3, 2.25e-3, 3e-3])
    assert "Muon learning rate (hidden matrices)" not in panels(plot_runs([adamw]))


def test_several_runs_overlay_one_colour_each(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for run, offset in ((a, 0.0), (b, 1.0)):
        run.mkdir()
        write_jsonl(run / "metrics.jsonl", [{"step": s, "loss": 5 + offset - 0.1 * s, "lr": 1e-3, "tokens_seen": 10 * s}
                                            for s in range(1, 11)])
    fig = plot_runs([a, b], labels=["a", "b"])
    drawn = lines(panels(fig)["loss"])
    np.testing.assert_allclose(drawn["_b: train (as logged)"][1] - drawn["_a: train (as logged)"][1], 1.0)
    colours = {line.get_label(): line.get_color() for line in panels(fig)["loss"].get_lines()}
    assert colours["a: train (smoothed)"] != colours["b: train (smoothed)"]
    assert [t.get_text() for t in panels(fig)["loss"].get_legend().get_texts()] == ["a: train (smoothed)",
                                                                                   "b: train (smoothed)"]


def test_a_run_ends_with_its_curves(corpus, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "6", "--eval_interval", "3"))
    assert f"training curves written to {out / 'curves.png'}" in "".join(capsys.readouterr())
    from matplotlib.image import imread

    picture = imread(out / "curves.png")
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 600  # a real, drawn PNG
    logged = [r["loss"] for r in read_metrics(out) if "loss" in r]
    drawn = lines(panels(plot_runs([out]))["loss"])
    np.testing.assert_allclose(drawn["_train (as logged)"][1], logged)
    assert len(logged) == 6 and len(drawn["validation"][1]) == 2


def test_a_plotting_failure_never_fails_the_run(corpus, tmp_path: Path, monkeypatch, capsys) -> None:
    def broken(run_dir: Path) -> Path:
        raise RuntimeError("matplotlib is broken")

    monkeypatch.setattr(plots, "write_curves", broken)
    out = tmp_path / "run"
    result = train.main(train_args(corpus, out, "--max_steps", "2"))
    assert result["step"] == 2 and (out / "final" / "model.safetensors").is_file()
    assert "training curves not written (RuntimeError: matplotlib is broken)" in "".join(capsys.readouterr())
    assert not (out / "curves.png").exists()


def test_plot_metrics_script(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        run.mkdir()
        write_jsonl(run / "metrics.jsonl", pretrain_records())
    script = [sys.executable, str(ROOT / "scripts" / "plot_metrics.py")]
    r = subprocess.run([*script, str(a)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (a / "curves.png").is_file() and f"wrote {a / 'curves.png'}" in r.stdout
    r = subprocess.run([*script, str(a), str(b), "--out", str(tmp_path / "both.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and (tmp_path / "both.png").is_file()
    r = subprocess.run([*script, str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: {tmp_path / 'nothing'}: no metrics.jsonl (is it a run's out_dir?)" in r.stderr
    (b / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n{oops\n")
    r = subprocess.run([*script, str(b)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "metrics.jsonl line 2: not JSON" in r.stderr
