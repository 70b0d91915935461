"""The README is a test: its commands run as a new user types them, in order, in a copy of the repository.

Every ```bash and ```python block of README.md runs, unless an HTML comment just above it says why not:

    <!-- readme-test: skip (why) -->        not run (it installs packages, needs a GPU or a download, ...)
    <!-- readme-test: file my_rewards.py --> a python block the README asks you to save: written to that file

Each shell line runs as typed, with one change: `--max_steps` is appended to train.py lines, so that the whole
pipeline takes minutes. `make` lines are dry runs (`make -n`): .ci/run runs `make test` itself. Commands share
one copy of the repository, so later stages start from earlier stages' models and the tokenized data is cached
once. Each must exit 0 (pipeline_check.py may give its "did not work" verdict, exit 1) without a traceback and
print what a user expects: a generated answer, "final model written to ...".
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(\S+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
# Optimizer steps appended to train.py lines: enough for every stage to run, evaluate and export.
MAX_STEPS = {"grpo": 2}  # each GRPO step samples 64 completions
DEFAULT_MAX_STEPS = 8
INTERACTIVE_INPUT = "Once upon a time\n"  # what a user types at an eval_model.py prompt (then Ctrl-D)


@dataclass
class Block:
    lang: str
    code: str
    line: int  # README line of the first line of code
    marker: tuple[str, str] | None  # ("skip", why) or ("file", name)


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with the readme-test marker just above each, if any."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(above)
        if marker and marker.group(1) not in ("skip", "file"):
            raise ValueError(f"README.md:{i}: unknown marker {marker.group(0)}; use readme-test: skip (why) or file NAME")
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(opening.group(1), "\n".join(lines[i + 1:end]), i + 2,
                            (marker.group(1), marker.group(2)) if marker else None))
        i = end + 1
    return blocks


@dataclass
class Step:
    """One thing to do in the copy: run a shell line, run a python snippet, or write a file."""
    kind: str  # "shell", "python" or "file"
    text: str
    line: int
    name: str = ""  # the file of a "file" step

    def __str__(self) -> str:
        first = strip_comment(self.text.splitlines()[0]) if self.kind == "shell" else self.text.splitlines()[0]
        return f"README.md:{self.line} {first[:90] if self.kind != 'file' else 'write ' + self.name}"


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """(README line, command) of a shell block: continuation lines joined, blank and comment-only lines dropped."""
    out, parts, start = [], [], 0
    for offset, raw in enumerate(block.code.splitlines()):
        if not parts:
            start = block.line + offset
        line = raw.strip()
        parts.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        command, parts = " ".join(p for p in parts if p), []
        if command and not command.startswith("#"):
            out.append((start, command))
    return out


def readme_steps() -> list[Step]:
    steps = []
    for block in readme_blocks(README.read_text()):
        if block.lang not in ("bash", "python") or (block.marker and block.marker[0] == "skip"):
            continue
        if block.marker and block.marker[0] == "file":
            steps.append(Step("file", block.code, block.line, block.marker[1]))
        elif block.lang == "python":
            steps.append(Step("python", block.code, block.line))
        else:
            steps += [Step("shell", command, line) for line, command in shell_lines(block)]
    return steps


STEPS = readme_steps()


def strip_comment(command: str) -> str:
    """The command without its trailing `# comment` (a # outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


def as_run(command: str) -> str:
    """The command as the test runs it: train.py lines get --max_steps; make lines are dry runs."""
    command = strip_comment(command)
    words = shlex.split(command)
    if "train.py" in words:
        mode = words[words.index("--mode") + 1] if "--mode" in words else "pretrain"
        return f"{command} --max_steps {MAX_STEPS.get(mode, DEFAULT_MAX_STEPS)}"
    if words[0] == "make":
        return "make -n " + command.removeprefix("make ")
    return command


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the repository as a fresh clone has it: the tracked (and new, unignored) files, nothing built."""
    dest = tmp_path_factory.mktemp("readme") / "zero2llm"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # not a git checkout: the tree, without what runs and installs leave behind
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", "out", ".cache", "wandb",
                                                                 "__pycache__", ".pytest_cache", ".hypothesis"))
    return dest


def run_env() -> dict[str, str]:
    """The user's shell: `python` (and torchrun) are this interpreter's, wandb stays offline."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "WANDB_MODE": "disabled"}


def check_output(command: str, result: subprocess.CompletedProcess) -> None:
    """What a user expects to see from each kind of command."""
    words = shlex.split(strip_comment(command))
    script = next((Path(w).name for w in words if w.endswith(".py")), words[0])
    out, err = result.stdout, result.stderr
    assert "Traceback" not in out + err, err[-3000:]
    if script == "pipeline_check.py":  # on minutes of training the verdict may well be "did not work"
        verdict = re.search(r"^PASS: ", out, re.M) if result.returncode == 0 else re.search(r"^FAIL: ", err, re.M)
        assert result.returncode in (0, 1) and verdict, (out + err)[-3000:]
        return
    assert result.returncode == 0, (out + err)[-3000:]
    if script == "train.py":
        assert "final model written to" in out + err, (out + err)[-3000:]
    elif script == "eval_model.py" and "--prompt" in words:
        prompt = words[words.index("--prompt") + 1]
        assert out.removeprefix(prompt).strip("\n"), f"no answer was printed: {out!r}"
    elif script == "eval_model.py":
        answer = out.split("> ", 1)[1].rsplit("\n", 2)[0]  # between the first prompt and the last one
        assert answer.strip("\n"), f"no answer was printed: {out!r}"
    elif script == "make":
        assert {"pretrain": "train.py --mode pretrain", "test": "-m pytest"}[words[1]] in out, out


@pytest.mark.parametrize("step", STEPS, ids=str)
def test_readme_command(step: Step, clone: Path) -> None:
    if step.kind == "file":
        (clone / step.name).write_text(step.text + "\n")
        return
    if step.kind == "python":
        result = subprocess.run([sys.executable, "-c", step.text], cwd=clone, env=run_env(), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    command = as_run(step.text)
    interactive = "eval_model.py" in command and "--prompt" not in command  # the user types one line, then Ctrl-D
    result = subprocess.run(["bash", "-c", command], cwd=clone, env=run_env(), capture_output=True, text=True,
                            input=INTERACTIVE_INPUT if interactive else "", timeout=600)
    check_output(step.text, result)


def test_the_readme_runs_the_whole_quick_start() -> None:
    """The markers cannot quietly turn the README test off: the quick start and every mode's examples run."""
    commands = [s.text for s in STEPS if s.kind == "shell"]
    for mode in ("pretrain", "sft", "lora", "dpo", "grpo"):
        assert any(f"train.py --mode {mode}" in c for c in commands), mode
    assert sum("eval_model.py" in c for c in commands) >= 4
    assert sum("pipeline_check.py" in c for c in commands) >= 2
    assert any(s.kind == "python" for s in STEPS)


def test_shell_lines_join_continuations_and_drop_comments() -> None:
    block = Block("bash", "# a comment\npython a.py \\\n    --x 1   # why\n\npython b.py", 10, None)
    assert shell_lines(block) == [(11, "python a.py --x 1   # why"), (14, "python b.py")]
    assert as_run("python train.py --mode sft  # a comment") == "python train.py --mode sft --max_steps 8"
    assert as_run("python eval_model.py --prompt 'a # b'  # why") == "python eval_model.py --prompt 'a # b'"
    assert as_run("make pretrain  # set up, then train") == "make -n pretrain"


def readme_flag_table() -> dict[str, set[str]]:
    """mode -> the flags the README's Training table lists for it (its `| group | modes | flags |` rows)."""
    import train

    lines = README.read_text().splitlines()
    start = lines.index("| group | modes | flags |") + 2
    listed: dict[str, set[str]] = {mode: set() for mode in train.MODES}
    for row in lines[start:]:
        if not row.startswith("|"):
            break
        _, modes, flags = (cell.strip() for cell in row.strip("|").split("|"))
        names = {f for f in re.findall(r"`(--[a-z_0-9-]+)", flags) if not f.startswith("--no-")}
        for mode in train.MODES if modes == "every mode" else modes.split(", "):
            listed[mode] |= names
    return listed


def test_the_flag_tables_list_what_each_modes_help_lists() -> None:
    import argparse

    import train

    for mode, listed in readme_flag_table().items():
        parser = train.build_parser(mode)
        shown = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings
                 if s.startswith("--") and s != "--help"}
        assert listed == shown, (mode, "missing in README:", shown - listed, "not a flag:", listed - shown)


def test_the_readmes_transcripts_of_refused_flags_are_what_train_py_prints(capsys) -> None:
    """The README shows what a command with other projects' flags prints (a plain block: a transcript, not run as a
    step): it must be what train.py prints now, line for line."""
    import train

    transcripts = [b for b in readme_blocks(README.read_text())
                   if b.lang == "" and b.code.startswith("$ python train.py")]
    assert transcripts, "the README's section on other projects' flags shows no transcript"
    for block in transcripts:
        command, *printed = block.code.splitlines()
        with pytest.raises(SystemExit) as exc:
            train.parse_config(shlex.split(command)[3:])  # after "$ python train.py"
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines() == printed, f"README.md:{block.line}"
