"""A run owns its out_dir: one writer at a time, no silent mix with an earlier run, folders replaced atomically.

    out_dir/.lock          held (flock) by the run writing here, naming its pid, host and start; a second run is
                           refused, naming it; a lock whose process is gone (killed) is taken over, and said
    out_dir/abandoned/     what an older checkpoint's resume moved aside: the checkpoints (and final/, best/,
                           metric records) of the timeline it leaves, never deleted

Only rank 0 touches these; the other ranks write inside checkpoints that rank 0 created.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from trainer.distributed import DistEnv, from_main
from trainer.errors import UsageError

LOCK = ".lock"
# What a run writes into its out_dir (--overwrite removes these and nothing else).
RUN_ARTIFACTS = ("checkpoints", "best", "final", "metrics.jsonl", "completions.jsonl", "curves.png", "wandb",
                 "abandoned")


def earlier_run(out_dir: Path) -> list[str]:
    """The artefacts of a run already in out_dir (empty: nothing a run wrote is there)."""
    return [name for name in RUN_ARTIFACTS if (out_dir / name).exists()]


def clear_earlier_run(out_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Refuse to start a new run where one already is, unless --resume continues it or --overwrite replaces it.

    Returns what --overwrite removed, to be said. Nothing else in out_dir is touched.
    """
    found = earlier_run(out_dir)
    if not found or resume:
        return None
    if not overwrite:
        raise UsageError(f"--out_dir {out_dir} holds an earlier run ({', '.join(found)}): continue it with --resume, "
                         f"replace it with --overwrite, or choose another --out_dir")
    for name in found:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return f"--overwrite: removed the earlier run in {out_dir} ({', '.join(found)})"


class RunLock:
    """out_dir/.lock, held while a run writes there (a context manager; `note` says a stale lock was taken over).

    The lock is an flock on the file, which the kernel drops when its process dies (even by kill -9), so a lock
    left by a killed run is free; the file's content, the owner's pid and host, is what the messages name.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.note: str | None = None
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                raise UsageError(f"--out_dir {self.path.parent} is in use by process {owner.get('pid', '?')} on "
                                 f"{owner.get('host', '?')} (started {owner.get('started', '?')}); wait for it to "
                                 f"finish or choose another --out_dir") from None
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)  # the file was replaced between open and flock: lock the one now at the path
        previous = self._owner(fd)
        if previous:
            self.note = (f"{self.path}: took over the lock of process {previous.get('pid')} on "
                         f"{previous.get('host')} (started {previous.get('started')}), which is gone")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as e:  # a full disk: the lock is held all the same, only its label is missing
            self.note = f"{self.path}: could not write this run's pid into it ({e.strerror})"
        return self

    @staticmethod
    def _owner(fd: int) -> dict:
        try:
            owner = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:  # half written by a killed run
            return {"pid": "?", "host": "?", "started": "?"}
        return owner if isinstance(owner, dict) else {}

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def owned_out_dir(out_dir: Path, env: DistEnv, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """The run's hold on out_dir: rank 0 takes the lock for the whole run, refuses (or, with --overwrite, clears)
    an earlier run, and mends a best/ or final/ whose replacement a kill interrupted; the other ranks wait, and
    stop with rank 0's error when it refuses (not with a broken connection when it exits)."""
    if not env.is_main:
        refused = from_main(None)
        if refused:
            raise UsageError(refused)
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            lock = held.enter_context(RunLock(out_dir))
            notes = [lock.note, clear_earlier_run(out_dir, resume, overwrite),
                     *(recover_folder(out_dir / name) for name in ("best", "final"))]
        except (UsageError, OSError) as e:
            from_main(str(e))
            raise
        from_main(None)
        for note in filter(None, notes):
            print(note, file=sys.stderr)
        yield


# ----------------------------------------------------------------------------- replacing a folder atomically


def replace_folder(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` in place of `dest`. The old `dest` is renamed aside first and removed last,
    so at every moment either `dest`, or `dest.old` and a complete `tmp`, exist (recover_folder mends the latter)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(dest: Path) -> str | None:
    """Finish or undo a replace_folder that a kill interrupted; returns what was done, to be said.

    `dest.tmp` is complete only if `dest.old` exists (replace_folder renames the old folder aside only once the
    new one is written); without it, a `dest.tmp` is a half-written export and is removed.
    """
    tmp, old = dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")
    note = None
    if not dest.exists() and old.exists():
        if tmp.exists():
            os.rename(tmp, dest)
            note = f"{dest}: finished replacing it (a kill had stopped it halfway)"
        else:
            os.rename(old, dest)
            note = f"{dest}: restored the previous one (a kill had stopped its replacement halfway)"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return note


# ----------------------------------------------------------------------------- a new timeline


def abandon_timeline(out_dir: Path, from_step: int, newer: list[Path]) -> Path:
    """Resuming from step `from_step` while checkpoints `newer` (after it) exist: they, the final/ and best/ of that
    timeline, and the metric records after `from_step`, move to out_dir/abandoned/after_step_N/ (a new folder
    each time), so the resumed run neither mixes with nor deletes them."""
    root = out_dir / "abandoned"
    dest = root / f"after_step_{from_step:06d}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"after_step_{from_step:06d}_{n}"
    (dest / "checkpoints").mkdir(parents=True)
    for ckpt in newer:
        os.rename(ckpt, dest / "checkpoints" / ckpt.name)
    for name in ("final", "best"):
        folder = out_dir / name
        if folder.is_dir() and _export_step(folder) > from_step:
            os.rename(folder, dest / name)
    if (out_dir / "metrics.jsonl").is_file():
        (dest / "metrics.jsonl").write_text(cut_metrics(out_dir, from_step))
    return dest


def cut_metrics(out_dir: Path, from_step: int) -> str:
    """Takes the records after `from_step` out of out_dir/metrics.jsonl (a resumed run logs those steps again, so
    the file stays one record per step and evaluation) and returns them; drops a line cut short by a kill."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        return ""
    kept, cut = [], []
    for line in metrics.read_text().splitlines(keepends=True):
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut by a kill: it belongs to no timeline
            continue
        (cut if step > from_step else kept).append(line)
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, metrics)
    return "".join(cut)


def _export_step(folder: Path) -> int:
    """The step an exported folder (best/, final/) was written at, from its zero2llm.json; unknown: newest."""
    try:
        return int(json.loads((folder / "zero2llm.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 62
