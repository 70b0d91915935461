"""Reading records from users' data files, and what to do with a defective one.

A defective record (a line that is not UTF-8, not JSON, lacks a field, ...) raises one DataError naming the
file and line; with skip_bad_records (train.py --skip_bad_records) it is skipped and counted per reason
instead (see BadRecords, the one policy every line reader takes).
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence


class DataError(ValueError):
    """A problem with a user's data file; the message names the file (and line) and what to do."""


class BadRecord(DataError):
    """One defective record (line) of a data file: `reason` is its short category, for the skip counts."""

    def __init__(self, path: str | Path, line_no: int, detail: str, reason: str):
        super().__init__(f"{path} line {line_no}: {detail}")
        self.path, self.line_no, self.detail, self.reason = Path(path), line_no, detail, reason


class BadRecords:
    """What the line readers do with a BadRecord: raise it (the default), or, with skip=True, count it per
    file and reason and go on. One object is passed down to every reader of a run (pretraining .jsonl/.txt,
    SFT, DPO pairs, GRPO prompts), so the policy and the report live in one place.

    A file whose records are ALL bad is an error either way (finish()): skipping must not turn a wrong
    file into an empty run.
    """

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: dict[str, Counter[str]] = {}
        self.first: dict[str, BadRecord] = {}

    def __call__(self, err: BadRecord) -> None:
        if not self.skip:
            raise err
        key = str(err.path)
        self.counts.setdefault(key, Counter())[err.reason] += 1
        self.first.setdefault(key, err)

    def skipped(self, path: str | Path) -> dict[str, int]:
        """reason -> records skipped in `path`, most frequent first."""
        return dict(self.counts.get(str(path), Counter()).most_common())

    def report(self, path: str | Path) -> str | None:
        """One line for stderr, or None when nothing was skipped in `path`."""
        counts = self.skipped(path)
        if not counts:
            return None
        n = sum(counts.values())
        return f"{path}: skipped {n:,} bad record{'s' if n != 1 else ''} ({_reasons(counts)})"

    def finish(self, path: str | Path, n_good: int) -> None:
        """Called by a reader at the end of `path`: raise if records were skipped and none was good."""
        counts = self.skipped(path)
        if n_good == 0 and counts:
            first = self.first[str(path)]
            n = sum(counts.values())
            raise DataError(f"{path}: {'its only record is' if n == 1 else f'all {n:,} records are'} bad "
                            f"({_reasons(counts)}), nothing to train on; line {first.line_no}: {first.detail}")


def _reasons(counts: dict[str, int]) -> str:
    """The skip counts per reason, most frequent first: "2 malformed JSON, 1 not UTF-8"."""
    return ", ".join(f"{k} {reason}" for reason, k in counts.items())


def data_files(spec: str | Path | Sequence[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    """The files a --data_path names, in this order: a file; a folder: its files ending in one of `suffixes`,
    sorted by name (subfolders are not read); a glob pattern ("shards/part-*.jsonl"): its matches, sorted by
    name; or several of these separated by commas, in the order given. A file named twice is read once. A name
    that matches no file is a DataError."""
    if isinstance(spec, (str, Path)):
        spec = str(spec)
        parts = [spec] if Path(spec).exists() else [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = [str(p) for p in spec]
    files: list[Path] = []
    for part in parts:
        path = Path(part)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
            if not found:
                raise DataError(f"{part}: a folder without {' or '.join(suffixes)} files")
        elif path.is_file():
            found = [path]
        elif any(c in part for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(part, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{part}: no file matches this pattern")
        else:
            raise DataError(f"{part}: no such file or folder")
        files += [f for f in found if f not in files]
    if not files:
        raise DataError(f"{spec!r} names no data file")
    return files


def describe_files(paths: Sequence[Path]) -> str:
    """How a summary names the files read: the one file, or how many and which, in the order read."""
    return str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({', '.join(map(str, paths))})"


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    """The line as text; a UTF-8 byte-order mark (Windows editors) on line 1 is dropped."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(path, line_no, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        f"re-save the file as UTF-8", "not UTF-8") from None


def check_text(text: str, path: Path, line_no: int) -> str:
    """`text`, after checking it can be encoded (JSON's "\\ud800" escapes decode to unpaired surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(path, line_no, "text contains an unpaired surrogate escape (e.g. \\ud800), which is not a "
                        "character; fix the JSON escapes", "unpaired surrogate") from None
    return text


def iter_lines(path: Path, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of `path`; a line that is not UTF-8 goes to `bad`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = _decode_line(raw, path, line_no)
            except BadRecord as e:
                bad(e)
                continue
            yield line_no, line


def _json_object(line: str, path: Path, line_no: int, expected: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        reason = e.msg.removesuffix(" at")  # "Invalid control character at" would read "at at column"
        raise BadRecord(path, line_no, f"malformed JSON ({reason} at column {e.colno})", "malformed JSON") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadRecord(path, line_no, f"malformed JSON ({e})", "malformed JSON") from None
    except RecursionError:
        raise BadRecord(path, line_no, "JSON nested too deeply", "malformed JSON") from None
    if not isinstance(row, dict):
        raise BadRecord(path, line_no, f"expected a JSON object {expected}, got {type(row).__name__}",
                        "not a JSON object")
    return row


def iter_jsonl_objects(path: str | Path, expected: str, parse: Callable[[dict, Path, int], object] | None = None,
                       bad: BadRecords | None = None) -> Iterator[tuple[int, object]]:
    """(line number, record) of each non-blank line: the JSON object, or what `parse(row, path, line_no)` makes
    of it. The one reader of JSONL records: every defect (not UTF-8, not a JSON object, or a BadRecord from
    `parse`) goes to `bad`, which raises it (default) or skips and counts it; `expected` describes the format."""
    path, bad = Path(path), bad if bad is not None else BadRecords()
    n_good = 0
    for line_no, line in iter_lines(path, bad):
        if not line.strip():
            continue
        try:
            row = _json_object(line, path, line_no, expected)
            record = parse(row, path, line_no) if parse is not None else row
        except BadRecord as e:
            bad(e)
            continue
        n_good += 1
        yield line_no, record
    bad.finish(path, n_good)


def _text_field(row: dict, path: Path, line_no: int) -> str:
    if "text" not in row:
        raise BadRecord(path, line_no, "missing field 'text' (expected {\"text\": ...})", "missing field 'text'")
    text = row["text"]
    if not isinstance(text, str):
        raise BadRecord(path, line_no, f"field 'text' must be a string, got {type(text).__name__}",
                        "field 'text' not a string")
    return check_text(text, path, line_no)


def iter_jsonl_texts(path: str | Path, bad: BadRecords | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each {"text": ...} line. A defect raises ONE DataError naming the line (or is
    skipped and counted, see BadRecords)."""
    yield from iter_jsonl_objects(path, '{"text": ...}', _text_field, bad)
