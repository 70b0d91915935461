"""A run owns its out_dir, resumes by a stated policy, and loses no evaluation: the cases users and clusters hit.

Kills are simulated by raising Killed (a BaseException, like the KeyboardInterrupt of a signal: no `except
Exception` catches it) from a patched function at the moment named, never by sleeping and hoping.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import train
from conftest import ROOT, TOKENIZER, read_metrics, sft_args, train_args, train_losses, write_jsonl
from trainer import checkpoint as ckpt
from trainer import loop, rundir
from trainer.checkpoint import CheckpointError
from trainer.errors import TrainingError, UsageError


class Killed(BaseException):
    """The process dies here (nothing after this point runs)."""


def kill_at_call(monkeypatch, owner, name: str, n: int) -> None:
    """Make the n-th call of owner.name die (the calls before it run as usual)."""
    real, calls = getattr(owner, name), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed(f"{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


def kill_when(monkeypatch, owner, name: str, dies) -> None:
    """Make owner.name die at the first call whose arguments satisfy `dies(*args)`."""
    real = getattr(owner, name)

    def dying(*args, **kwargs):
        if dies(*args):
            raise Killed(f"{name}{args}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


class FullDisk:
    """open() for a file whose writes fail as on a full disk (patched in as a module's `open`)."""
    def __init__(self, path, mode="r", *args, **kwargs):
        self.name = str(path)
        self.file = open(path, mode, *args, **kwargs)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def val_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out_dir) if "val_loss" in r]


def summary(folder: Path) -> dict:
    return json.loads((folder / "zero2llm.json").read_text())


# ----------------------------------------------------------------------------- data.py prepare


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_prepare_refuses_an_output_that_is_its_input(corpus, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(corpus["val"].read_bytes())
    before = src.read_bytes()
    r = run_prepare("--input", str(src), "--tokenizer", str(TOKENIZER), "--output", str(src))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"prepare would write {src}, which is the input {src}" in r.stderr
    assert src.read_bytes() == before


def test_prepare_replaces_only_what_it_wrote(corpus, tmp_path, tok):
    out = tmp_path / "corpus.bin"
    out.write_bytes(b"my own file")
    with pytest.raises(data.DataError, match="exists, and is not a token file prepare wrote"):
        data.prepare_pretrain(corpus["val"], tok, out, show_progress=False)
    assert out.read_bytes() == b"my own file"
    out.unlink()
    (tmp_path / "corpus.json").write_text('{"my": "notes"}')  # where the sidecar would go
    with pytest.raises(data.DataError, match="its sidecar's place .*corpus.json holds a file prepare did not write"):
        data.prepare_pretrain(corpus["val"], tok, out, show_progress=False)
    (tmp_path / "corpus.json").unlink()
    first = data.prepare_pretrain(corpus["val"], tok, out, show_progress=False).read_bytes()
    assert data.prepare_pretrain(corpus["val"], tok, out, show_progress=False).read_bytes() == first  # ours: redone


def test_a_document_of_megabytes_on_one_line_is_tokenized_in_pieces_with_the_same_tokens(tmp_path, tok, monkeypatch):
    from data import pretrain

    text = " ".join(f"word{i % 97} 数学{i % 13}，更多 text." for i in range(3000))  # ~70 kB, Chinese included
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    pieces = []
    real_cut = pretrain.cut_long_text
    monkeypatch.setattr(pretrain, "CHUNK_BYTES", 4000)
    monkeypatch.setattr(pretrain, "cut_long_text", lambda t, p, limit: pieces.extend(real_cut(t, p, limit)) or pieces)
    out = data.prepare_pretrain(src, tok, tmp_path / "long.bin", show_progress=False)
    ids = list(map(int, data.PackedDataset(out, 8).tokens))
    assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(pieces) > 10 and max(map(len, pieces)) < 4000 + 4096  # never the whole document at once


def test_temporary_files_a_killed_tokenization_left_are_removed(corpus, tmp_path, tok):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = cache / f"train.0123456789ab.bin.{dead.pid}.tmp"
    orphan_sidecar = cache / f"train.0123456789ab.{dead.pid}.json.tmp"
    running = cache / f"train.0123456789ab.bin.{os.getpid()}.tmp"  # a prepare still running (this process)
    for f in (orphan, orphan_sidecar, running):
        f.write_bytes(b"\0" * 10)
    data.pretrain_bin(corpus["train"], tok, cache_dir=cache, show_progress=False)
    assert not orphan.exists() and not orphan_sidecar.exists() and running.exists()


@pytest.mark.parametrize("sidecar, message", [
    ("{not json", "unreadable sidecar"),
    ('{"format": "something-else"}', "not a zero2llm-tokens-v1 sidecar"),
])
def test_a_corrupt_sidecar_is_one_clear_error(corpus, tmp_path, tok, sidecar, message):
    out = data.prepare_pretrain(corpus["val"], tok, tmp_path / "v.bin", show_progress=False)
    out.with_suffix(".json").write_text(sidecar)
    with pytest.raises(data.DataError, match=message):
        data.pretrain_bin(out, tok)


def test_a_sidecar_that_does_not_match_its_bin_is_refused(corpus, tmp_path, tok):
    out = data.prepare_pretrain(corpus["val"], tok, tmp_path / "v.bin", show_progress=False)
    with open(out, "ab") as f:
        f.write(b"\0\0" * 7)  # the .bin grew (or was swapped) after its sidecar was written
    with pytest.raises(data.DataError, match="v.bin"):
        data.pretrain_bin(out, tok)


def test_a_full_disk_while_preparing_leaves_no_file_behind(corpus, tmp_path, tok, monkeypatch):
    from data import pretrain

    first = data.prepare_pretrain(corpus["val"], tok, tmp_path / "v.bin", show_progress=False).read_bytes()
    monkeypatch.setattr(pretrain, "open", FullDisk, raising=False)  # the open() of data/pretrain.py
    with pytest.raises(data.DataError, match=r"could not write .*v.bin: No space left on device \(\d+ MiB free "
                                             r"there\); nothing was replaced"):
        data.prepare_pretrain(corpus["val"], tok, tmp_path / "v.bin", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.bin", "v.json"]  # no temporary file left
    assert (tmp_path / "v.bin").read_bytes() == first  # the earlier output is intact


def test_a_full_disk_while_writing_the_sidecar_replaces_nothing(corpus, tmp_path, tok, monkeypatch):
    from pathlib import Path as P

    first = data.prepare_pretrain(corpus["val"], tok, tmp_path / "v.bin", show_progress=False).read_bytes()
    real_write_text = P.write_text

    def write_text(self, *args, **kwargs):
        if self.name.endswith(".json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(P, "write_text", write_text)
    with pytest.raises(data.DataError, match="nothing was replaced"):
        data.prepare_pretrain(corpus["train"], tok, tmp_path / "v.bin", show_progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.bin", "v.json"]
    assert (tmp_path / "v.bin").read_bytes() == first


def test_a_tokenizer_json_of_another_schema_is_one_line(corpus, tmp_path, capsys):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text((TOKENIZER / "tokenizer_config.json").read_text())
    (bad / "tokenizer.json").write_text('{"version": "1.0", "added_tokens": [], "model": {"type": "nonsense"}}')
    with pytest.raises(SystemExit):
        train.main(train_args(corpus, tmp_path / "x", "--tokenizer_path", str(bad)))
    err = capsys.readouterr().err
    assert f"--tokenizer_path {bad}: cannot load a tokenizer there" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the out_dir is owned


def test_a_new_run_into_an_earlier_runs_out_dir_is_refused_unless_told(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0"))
    final = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match=r"holds an earlier run \(checkpoints, best, final, metrics.jsonl, curves.png\): "
                                         r"continue it "
                                         r"with --resume, replace it with --overwrite"):
        train.main(train_args(corpus, out, "--max_steps", "3", "--seed", "7"))
    assert (out / "final" / "model.safetensors").read_bytes() == final  # nothing of it was touched
    (out / "notes.txt").write_text("mine")
    train.main(train_args(corpus, out, "--max_steps", "3", "--seed", "7", "--overwrite", "--eval_interval", "0"))
    assert "--overwrite: removed the earlier run" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]  # no records of the old run
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes what runs write, nothing else


def test_an_out_dir_with_other_files_is_not_a_run(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README").write_text("experiments go here")
    assert train.main(train_args(corpus, out, "--max_steps", "1"))["step"] == 1


def test_resume_and_overwrite_together_are_refused(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(train_args(corpus, tmp_path / "x", "--resume", "--overwrite"))
    assert "pass one of them" in capsys.readouterr().err


def test_a_second_run_on_a_running_out_dir_is_refused_naming_the_first(corpus, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(corpus, out, "--max_steps", "100000",
                                                                                  "--eval_interval", "0")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / rundir.LOCK).is_file() or not (out / rundir.LOCK).read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        with pytest.raises(UsageError, match=rf"is in use by process {first.pid} on .*wait for it to finish"):
            train.main(train_args(corpus, out, "--max_steps", "2", "--overwrite"))
    finally:
        first.kill()
        first.wait()
    # Killed with -9 it could not clean up: its lock file stays, but the lock itself died with it.
    assert json.loads((out / rundir.LOCK).read_text())["pid"] == first.pid


def test_the_lock_of_a_killed_run_is_taken_over_and_said(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK).write_text(json.dumps({"pid": 99999999, "host": "gone", "started": "yesterday"}))
    train.main(train_args(corpus, out, "--max_steps", "1"))
    assert "took over the lock of process 99999999 on gone (started yesterday), which is gone" in capsys.readouterr().err
    assert not (out / rundir.LOCK).exists()  # released at the end


def test_a_lock_half_written_by_a_kill_is_taken_over(tmp_path):
    (tmp_path / rundir.LOCK).write_text('{"pid": 12')
    with rundir.RunLock(tmp_path) as lock:
        assert "took over the lock of process ?" in lock.note
        with pytest.raises(UsageError, match="is in use by process"):  # held now: a second holder is refused
            rundir.RunLock(tmp_path).__enter__()


def test_a_kill_between_the_renames_of_best_loses_no_best(corpus, tmp_path, monkeypatch, capsys):
    """replace_folder renames best/ aside, then best.tmp into place: a kill between the two is mended at start."""
    out = tmp_path / "run"
    common = ("--max_steps", "6", "--eval_interval", "2", "--save_interval_steps", "2")
    renames = {"n": 0}
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith("best.tmp"):
            renames["n"] += 1
            if renames["n"] == 2:  # the second best/ export: best/ is already best.old
                raise Killed("between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, *common))
    assert not (out / "best").exists() and (out / "best.old").is_dir() and (out / "best.tmp").is_dir()
    monkeypatch.setattr(rundir.os, "rename", real_rename)
    train.main(train_args(corpus, out, *common, "--resume"))
    assert "best: finished replacing it" in capsys.readouterr().err
    assert (out / "best" / "model.safetensors").is_file()
    assert not (out / "best.old").exists() and not (out / "best.tmp").exists()


def export_failing_at(folder: str, failure: BaseException):
    """An hf_export that writes part of `folder`.tmp and then fails (a kill, a full disk); other folders as usual."""
    from trainer.modes import base

    def make(tokenizer):
        write = base.hf_export(tokenizer)

        def export(model, path, info):
            if path.name == f"{folder}.tmp":
                model.save_pretrained(path)  # half of the export is written
                raise failure
            write(model, path, info)
        return export
    return make


def test_a_kill_while_best_is_written_keeps_the_previous_best(corpus, tmp_path, monkeypatch):
    from trainer.modes import pretrain

    out = tmp_path / "run"
    common = ("--max_steps", "4", "--eval_interval", "2", "--save_interval_steps", "2", "--learning_rate", "3e-3")
    train.main(train_args(corpus, out, *common, "--max_steps", "2"))
    best = (out / "best" / "model.safetensors").read_bytes()
    monkeypatch.setattr(pretrain, "hf_export", export_failing_at("best", Killed("mid-export")))
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, *common, "--resume"))
    assert (out / "best" / "model.safetensors").read_bytes() == best and (out / "best.tmp").is_dir()
    monkeypatch.undo()
    train.main(train_args(corpus, out, *common, "--resume"))
    assert not (out / "best.tmp").exists() and summary(out / "best")["step"] == 4


@pytest.mark.parametrize("folder", ["best", "final"])
def test_a_full_disk_while_exporting_is_one_error_and_leaves_no_half_folder(corpus, tmp_path, monkeypatch, folder):
    from trainer.modes import pretrain

    monkeypatch.setattr(pretrain, "hf_export",
                        export_failing_at(folder, OSError(errno.ENOSPC, "No space left on device")))
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"could not write .*{folder}: No space left on device; there is no "
                                            rf".*{folder} yet. Free disk space, then --resume"):
        train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "2"))
    assert not (out / f"{folder}.tmp").exists()


def test_a_full_disk_while_logging_is_one_error(corpus, tmp_path, monkeypatch):
    from trainer import logger

    monkeypatch.setattr(logger, "open", FullDisk, raising=False)  # metrics.jsonl
    with pytest.raises(TrainingError, match="could not write .*metrics.jsonl: No space left on device; free disk"):
        train.main(train_args(corpus, tmp_path / "run", "--max_steps", "5"))


def test_a_full_disk_while_marking_the_evaluation_done_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ("--max_steps", "4", "--eval_interval", "2", "--save_interval_steps", "2")
    kill_at_call(monkeypatch, ckpt, "update_state", 2)  # the mark of step 4's checkpoint never lands
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, *common))
    assert ckpt.read_state(ckpt.latest_checkpoint(out))["eval_pending"]  # still the state saved before the eval
    monkeypatch.undo()
    assert train.main(train_args(corpus, out, *common, "--resume"))["val_loss"] is not None


def test_a_kill_during_rotation_leaves_no_half_deleted_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ("--max_steps", "8", "--eval_interval", "0", "--save_interval_steps", "2", "--keep_checkpoint_max", "1")
    # Rotation renames a checkpoint to .tmp, then deletes it: die in that deletion, the folder half gone.
    real_rmtree = ckpt.shutil.rmtree

    def half_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.endswith(".tmp") and (path / ckpt.STATE_FILE).is_file():
            (path / "model.safetensors").unlink()
            raise Killed("mid-rotation")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", half_rmtree)
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, *common))
    monkeypatch.undo()
    listed = ckpt.list_checkpoints(out)
    assert all((c / "model.safetensors").is_file() and (c / "optimizer.pt").is_file() for c in listed)
    train.main(train_args(corpus, out, *common, "--resume"))
    assert [c.name for c in ckpt.list_checkpoints(out)] == ["step_000008"]
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_kill_during_the_final_export_is_mended_by_resume(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_when(monkeypatch, loop, "replace_folder", lambda tmp, dest: dest.name == "final")
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0", "--save_interval_steps", "1"))
    monkeypatch.undo()
    assert not (out / "final").exists()
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0", "--resume"))
    assert summary(out / "final")["step"] == 2


# ----------------------------------------------------------------------------- evaluation is part of the step


def test_a_kill_during_evaluation_is_evaluated_on_resume(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ("--max_steps", "6", "--eval_interval", "2", "--save_interval_steps", "2")
    kill_at_call(monkeypatch, loop.Trainer, "evaluate", 2)  # step 4's evaluation
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, *common))
    assert val_steps(out) == [2]
    monkeypatch.undo()
    train.main(train_args(corpus, out, *common, "--resume"))
    assert val_steps(out) == [2, 4, 6]


def test_a_kill_during_the_last_evaluation_still_records_it(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_at_call(monkeypatch, loop.Trainer, "evaluate", 1)
    with pytest.raises(Killed):
        train.main(train_args(corpus, out, "--max_steps", "3", "--eval_interval", "0"))
    monkeypatch.undo()
    result = train.main(train_args(corpus, out, "--max_steps", "3", "--eval_interval", "0", "--resume"))
    assert result["val_loss"] is not None and summary(out / "final")["val_loss"] == pytest.approx(result["val_loss"])


def test_a_signal_at_an_evaluating_step_defers_the_evaluation_to_resume(corpus, tmp_path, monkeypatch):
    from trainer import interrupt

    out = tmp_path / "run"
    common = ("--max_steps", "6", "--eval_interval", "2", "--save_interval_steps", "0")
    polls = {"n": 0}

    def poll(self, device):
        polls["n"] += 1
        return signal.SIGTERM if polls["n"] == 4 else 0  # after step 4, an evaluating step

    monkeypatch.setattr(interrupt.StopOnSignal, "poll", poll)
    assert train.main(train_args(corpus, out, *common))["signal"] == signal.SIGTERM
    assert val_steps(out) == [2] and ckpt.read_state(ckpt.latest_checkpoint(out))["eval_pending"]
    monkeypatch.undo()
    train.main(train_args(corpus, out, *common, "--resume"))
    assert val_steps(out) == [2, 4, 6]


def test_resuming_a_finished_run_changes_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    first = train.main(train_args(corpus, out, "--max_steps", "3"))
    before = (out / "final" / "zero2llm.json").read_text()
    again = train.main(train_args(corpus, out, "--max_steps", "3", "--resume"))
    assert "the run already ended at step 3" in capsys.readouterr().out
    assert (out / "final" / "zero2llm.json").read_text() == before
    assert again["val_loss"] == first["val_loss"] and summary(out / "final")["val_loss"] == first["val_loss"]


# ----------------------------------------------------------------------------- no validation, no metric


def test_no_validation_data_logs_no_validation_metric(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    result = train.main(["--data_path", str(corpus["train"]), "--val_data_path", "", "--val_fraction", "0",
                         "--out_dir", str(out), *train_args(corpus, out)[6:], "--max_steps", "4", "--eval_interval", "2"])
    assert val_steps(out) == [] and not (out / "best").exists() and result["val_loss"] is None
    assert "no validation data to score" in capsys.readouterr().out
    assert summary(out / "final")["val_loss"] is None


def test_validation_rows_truncated_to_no_reply_give_no_metric(sft_files, base_model, tmp_path):
    long_system = "You are a very careful assistant. " * 30  # more than --max_seq_len tokens before any reply
    val = write_jsonl(tmp_path / "val.jsonl", [{"conversations": [{"role": "system", "content": long_system},
                                                                   {"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}] * 4)
    out = tmp_path / "run"
    train.main(sft_args({"train": sft_files["train"], "val": val}, base_model, out, "--max_steps", "2",
                        "--max_seq_len", "48"))
    assert val_steps(out) == [] and not (out / "best").exists()


def test_a_sweep_whose_metric_no_trial_can_report_is_refused(tmp_path):
    from sweep.config import SweepConfigError, load_config

    path = tmp_path / "s.yaml"
    path.write_text("method: grid\nmetric: {name: val_loss, goal: minimize}\nparameters:\n"
                    "  val_data_path: {value: ''}\n  val_fraction: {value: 0}\n  learning_rate: {values: [0.001]}\n")
    with pytest.raises(SweepConfigError, match="no trial can report val_loss: val_data_path '' with val_fraction 0"):
        load_config(path)


# ----------------------------------------------------------------------------- the resume policy


def test_resume_with_another_learning_rate_takes_it_from_the_next_step(corpus, tmp_path, capsys):
    from trainer.schedule import lr_multiplier

    out = tmp_path / "run"
    common = ("--eval_interval", "0", "--warmup_iters", "2", "--lr_decay_iters", "20")
    train.main(train_args(corpus, out, *common, "--max_steps", "10", "--learning_rate", "1e-3"))
    train.main(train_args(corpus, out, *common, "--max_steps", "12", "--resume", "--learning_rate", "1e-5"))
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    cosine = dict(schedule="cosine", warmup_iters=2, total_steps=12, decay_iters=20, min_lr_ratio=0.1)
    assert lrs[11] == pytest.approx(1e-5 * lr_multiplier(10, **cosine))
    assert lrs[10] == pytest.approx(1e-3 * lr_multiplier(9, **cosine))
    said = capsys.readouterr().out
    assert "changed since the checkpoint, from step 11 on: " in said
    assert "--learning_rate 0.001 -> 1e-05" in said and "--max_steps 10 -> 12" in said


def test_resume_applies_a_changed_weight_decay(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--eval_interval", "0", "--max_steps", "2", "--weight_decay", "0.1"))
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["weight_decay"])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        train.main(train_args(corpus, out, "--eval_interval", "0", "--max_steps", "3", "--weight_decay", "0.3",
                              "--resume"))
    assert seen == [0.3]


def test_resume_with_another_tokenizer_is_refused(corpus, tmp_path, tok):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--max_steps", "2", "--eval_interval", "0"))
    other = tmp_path / "tok"
    tok.save_pretrained(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "the", "Ġthe"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="the tokenizer differs from the one it was trained with"):
        train.main(train_args(corpus, out, "--max_steps", "4", "--resume", "--tokenizer_path", str(other)))


def test_resume_with_another_seed_or_split_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    carve = ("--val_data_path", "", "--val_fraction", "0.2", "--eval_interval", "0")
    args = lambda *extra: ["--data_path", str(corpus["train"]), "--out_dir", str(out), *train_args(corpus, out)[6:],
                           *carve, *extra]
    train.main(args("--max_steps", "2"))
    with pytest.raises(CheckpointError, match="it ran with --seed 1337, which decides the order its rows are read in "
                                              "and the validation rows carved off them"):
        train.main(args("--max_steps", "4", "--resume", "--seed", "1"))
    with pytest.raises(CheckpointError, match="carved off the training rows by --val_fraction 0.2; 0.3 would move"):
        train.main(args("--max_steps", "4", "--resume", "--val_fraction", "0.3"))


def test_resume_on_a_changed_data_file_is_refused(corpus, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_bytes(corpus["train"].read_bytes())
    out = tmp_path / "run"
    args = lambda *extra: ["--data_path", str(src), "--val_data_path", str(corpus["val"]), "--out_dir", str(out),
                           *train_args(corpus, out)[6:], "--eval_interval", "0", *extra]
    train.main(args("--max_steps", "2"))
    src.write_bytes(src.read_bytes() + b'{"text": "one more document"}\n')
    with pytest.raises(CheckpointError, match="--data_path is not the data it was trained on"):
        train.main(args("--max_steps", "4", "--resume"))


def test_resume_in_another_mode_is_refused(sft_files, base_model, tmp_path):
    out = tmp_path / "run"
    train.main(sft_args(sft_files, base_model, out, "--max_steps", "2", "--eval_interval", "0"))
    with pytest.raises(CheckpointError, match="(it is a --mode sft run, this is --mode lora|does not fit)"):
        train.main(sft_args(sft_files, base_model, out, "--mode", "lora", "--max_steps", "4", "--resume"))


def test_length_grouped_resume_with_another_global_batch_is_refused(sft_files, base_model, tmp_path):
    out = tmp_path / "run"
    train.main(sft_args(sft_files, base_model, out, "--max_steps", "2", "--eval_interval", "0"))
    with pytest.raises(CheckpointError, match="its global batch was 8 rows .* this run's is 16"):
        train.main(sft_args(sft_files, base_model, out, "--max_steps", "4", "--resume", "--accumulation_steps", "2"))
    # The same global batch cut differently reads the same rows: allowed.
    train.main(sft_args(sft_files, base_model, out, "--max_steps", "3", "--resume", "--batch_size", "4",
                        "--accumulation_steps", "2", "--eval_interval", "0"))


def test_resuming_an_older_checkpoint_starts_a_new_timeline(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--eval_interval", "0", "--save_interval_steps", "5", "--lr_decay_iters", "20")
    train.main(train_args(corpus, out, *common, "--max_steps", "20", "--keep_checkpoint_max", "0"))
    old = train_losses(out)
    train.main(train_args(corpus, out, *common, "--max_steps", "20", "--keep_checkpoint_max", "2",
                          "--resume", str(out / "checkpoints" / "step_000005")))
    said = capsys.readouterr().out
    moved = out / "abandoned" / "after_step_000005"
    assert "a new timeline starts there" in said and str(moved) in said
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["step_000010", "step_000015", "step_000020"]
    assert [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()][0] == 6
    assert [c.name for c in ckpt.list_checkpoints(out)] == ["step_000015", "step_000020"]  # the new timeline's
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == sorted(set(steps))  # one record per step: the abandoned ones moved out
    assert train_losses(out) == pytest.approx(old, rel=1e-6)  # the same data and seed: the same losses again


def test_a_refused_resume_leaves_the_run_folder_as_it_was(corpus, tmp_path, capsys):
    """A checkpoint that cannot be loaded is refused before anything moves: a resume from an older, damaged checkpoint
    used to send the run's newer checkpoints and final/ to abandoned/ first, then stop."""
    out = tmp_path / "run"
    common = ("--eval_interval", "0", "--save_interval_steps", "5", "--max_steps", "10")
    train.main(train_args(corpus, out, *common))
    (out / "checkpoints" / "step_000005" / "optimizer.pt").write_bytes(b"cut short")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: cannot be read .*; the checkpoint is damaged"):
        train.main(train_args(corpus, out, *common, "--resume", str(out / "checkpoints" / "step_000005")))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_resume_after_a_kill_logs_each_step_once(corpus, tmp_path):
    """Steps an interrupted run logged after its last checkpoint are run and logged again by the resume: their old
    records are taken out, so metrics.jsonl keeps one record per step, the resumed run's."""
    out = tmp_path / "run"
    common = ("--eval_interval", "0", "--save_interval_steps", "5", "--lr_decay_iters", "10")
    train.main(train_args(corpus, out, *common, "--max_steps", "8"))
    shutil.rmtree(out / "checkpoints" / "step_000008")  # as if killed after step 8's record, before its checkpoint
    shutil.rmtree(out / "final")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # and a line cut short
    train.main(train_args(corpus, out, *common, "--max_steps", "10", "--resume"))
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 11))


# ----------------------------------------------------------------------------- values that mean nothing


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number"),
    (["--weight_decay", "nan"], "--weight_decay nan: must be a finite number"),
    (["--learning_rate", "1e30"], "--learning_rate 1e+30: above 1"),
    (["--dim", "1048576"], "more than this machine's"),
    (["--vocab_size", "1000000000000"], "more than this machine's"),
])
def test_non_finite_or_absurd_values_are_refused_before_any_work(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(corpus, tmp_path / "x", *flags))
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_nan_weights_are_never_saved_as_the_weights_from_before(corpus, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):  # an update that leaves the weights NaN (finite gradients, huge step)
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="the weights are already NaN/inf, so no checkpoint was written"):
        train.main(train_args(corpus, out, "--max_steps", "30", "--max_bad_steps", "2", "--eval_interval", "0",
                              "--save_interval_steps", "0"))
    assert ckpt.latest_checkpoint(out) is None


def test_a_step_with_no_target_token_changes_nothing(sft_files, base_model, tmp_path, tok, monkeypatch):
    """A batch whose rows all lost their replies to max_seq_len is a step without a target. A training set of only
    such rows is refused up front (SFTDataset.check_trainable); here it is let through, so every step is one."""
    from data import SFTDataset

    monkeypatch.setattr(SFTDataset, "check_trainable", lambda self: None)
    long_system = "You are a very careful assistant. " * 30
    rows = [{"conversations": [{"role": "system", "content": long_system}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]}] * 16
    empty = write_jsonl(tmp_path / "empty.jsonl", rows)
    out = tmp_path / "run"
    train.main(sft_args({"train": empty, "val": sft_files["val"]}, base_model, out, "--max_steps", "2",
                        "--max_seq_len", "48", "--eval_interval", "0"))
    from safetensors.torch import load_file

    before, after = load_file(str(base_model / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # not even weight decay moved them
    records = [r for r in read_metrics(out) if "empty_steps" in r]
    assert records[-1]["empty_steps"] == 2 and all("loss" not in r for r in records)
