"""Reading records from users' data files, and what to do with a defective one.

Records are the lines of .jsonl files (one JSON object each) or the rows of .parquet files (a Hugging Face
dataset's files). A defective record (a line that is not UTF-8, not JSON, lacks a field, ...) raises one
DataError naming the file and line (or row); with skip_bad_records (train.py --skip_bad_records) it is
skipped and counted per reason instead (see BadRecords, the one policy every line reader takes).
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

PARQUET = ".parquet"  # a dataset's rows as the Hugging Face Hub serves them (read with pyarrow)


def record_at(path: str | Path, number: int) -> str:
    """How a message names a record: "line 12" of a text file, "row 12" of a .parquet file."""
    return f"{'row' if Path(path).suffix == PARQUET else 'line'} {number}"


class DataError(ValueError):
    """A problem with a user's data file; the message names the file (and line) and what to do."""


class BadRecord(DataError):
    """One defective record (line) of a data file: `reason` is its short category, for the skip counts."""

    def __init__(self, path: str | Path, line_no: int, detail: str, reason: str):
        super().__init__(f"{path} {record_at(path, line_no)}: {detail}")
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
                            f"({_reasons(counts)}), nothing to train on; {record_at(path, first.line_no)}: "
                            f"{first.detail}")


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
                raise DataError(f"{part}: a folder without {' or '.join(suffixes)} files{_folder_hint(path)}")
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


def check_not_foreign(path: Path) -> None:
    """A DataError saying how to convert a file of a format read nowhere here (CSV, a datasets Arrow file)."""
    if path.suffix.lower() in (".csv", ".tsv"):
        raise DataError(f"{path}: a {path.suffix[1:].upper()} file; data files are JSON Lines (.jsonl, one object "
                        "per line) or .parquet: convert it, e.g. with pandas: read_csv(...)"
                        ".to_json('data.jsonl', orient='records', lines=True, force_ascii=False)")
    if path.suffix == ".arrow":
        raise DataError(arrow_hint(path.parent))


def arrow_hint(folder: Path) -> str:
    """What to do with a `datasets` save_to_disk folder (Arrow files with their dataset_info.json): export Parquet."""
    return (f"{folder} is a datasets save_to_disk folder (Arrow files); write its rows as Parquet, which is read "
            f"here: python -c \"import datasets; d = datasets.load_from_disk('{folder}'); (d['train'] if "
            f"isinstance(d, datasets.DatasetDict) else d).to_parquet('train.parquet')\"")


def _folder_hint(folder: Path) -> str:
    """Why a --data_path folder holds no data file, when its files say (for the error that it holds none)."""
    names = {p.name for p in folder.iterdir()} | {p.name for p in folder.glob("*/*")}
    if any(n.endswith(".arrow") for n in names) or names & {"dataset_dict.json", "dataset_info.json"}:
        return f": {arrow_hint(folder)}"
    if any(n.endswith(".json") for n in names):
        return ": its .json files are read when named one by one (--data_path FILE.json)"
    return ""


def iter_records(path: str | Path, expected: str, parse: Callable[[dict, Path, int], object] | None = None,
                 bad: BadRecords | None = None) -> Iterator[tuple[int, object]]:
    """(line number, record) of each non-blank line of a .jsonl file, or (row number, record) of each row of a
    .parquet file: the object, or what `parse(row, path, line_no)` makes of it. The one reader of records: every
    defect (not UTF-8, not a JSON object, or a BadRecord from `parse`) goes to `bad`, which raises it (default) or
    skips and counts it; `expected` describes the format."""
    path, bad = Path(path), bad if bad is not None else BadRecords()
    check_not_foreign(path)
    rows = parquet_rows(path) if path.suffix == PARQUET else jsonl_rows(path, expected, bad)
    n_good = 0
    for line_no, row in rows:
        try:
            record = parse(row, path, line_no) if parse is not None else row
        except BadRecord as e:
            bad(e)
            continue
        n_good += 1
        yield line_no, record
    bad.finish(path, n_good)


def jsonl_rows(path: Path, expected: str, bad: BadRecords) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object goes to `bad`. A file that
    is one JSON array (as Alpaca's alpaca_data.json), not JSON Lines, is a DataError saying how to convert it."""
    first = True
    for line_no, line in iter_lines(path, bad):
        if not line.strip():
            continue
        try:
            yield line_no, _json_object(line, path, line_no, expected)
        except BadRecord as e:
            if first and _json_array_file(path):
                out = path.with_name(path.stem + (".lines" if path.suffix == ".jsonl" else "") + ".jsonl")
                raise DataError(f"{path} line {line_no}: the file is a JSON array ([...]); data files are JSON Lines, "
                                f"one object per line: convert it with python -c \"import json, sys; "
                                f"[print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]\" "
                                f"{path} > {out}") from None
            bad(e)
        first = False


def _json_array_file(path: Path) -> bool:
    """Whether the file's text starts with "[" and ends with "]", as one JSON array does (read at both ends only)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(max(0, f.seek(0, 2) - 64))
        tail = f.read().rstrip()
    return head.startswith(b"[") and tail.endswith(b"]")


def parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number, row) of a .parquet file (what the Hugging Face Hub serves datasets as), read a batch of rows
    at a time. Arrow gives every row every column, and every object in a column of them every field any of them
    has, None where it had none (an Alpaca row in a file of chats: "conversations" None; a message without
    "tool_calls" among messages with them); those are dropped, so that a row reads as the object it was made from."""
    row_no, file = 0, parquet_file(path)
    try:
        for batch in file.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, _without_nulls(row)
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError and ArrowInvalid: a damaged file
        raise DataError(f"{path}: not a readable Parquet file after row {row_no} ({e})") from None


def source_bytes(path: Path) -> int:
    """How much text a file holds, for progress bars: its size, or a .parquet file's uncompressed size."""
    if path.suffix != PARQUET:
        return path.stat().st_size
    meta = parquet_file(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def parquet_file(path: Path) -> Any:
    """The pyarrow.parquet.ParquetFile of `path`; a file that is not Parquet is a DataError naming it."""
    import pyarrow.parquet as pq  # here: only a .parquet file needs pyarrow

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _text_field(row: dict, path: Path, line_no: int) -> str:
    if "text" not in row:
        other = next((k for k in row if k.lower() == "text"), None)  # a classifier's {"Text", "Label"}
        hint = f"; its '{other}' is not it: field names are case-sensitive" if other else ""
        raise BadRecord(path, line_no, f"missing field 'text' (expected {{\"text\": ...}}){hint}",
                        "missing field 'text'")
    text = row["text"]
    if not isinstance(text, str):
        raise BadRecord(path, line_no, f"field 'text' must be a string, got {type(text).__name__}",
                        "field 'text' not a string")
    return check_text(text, path, line_no)


def iter_record_texts(path: str | Path, bad: BadRecords | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each {"text": ...} line (or row of a .parquet file). A defect raises ONE DataError
    naming the line (or is skipped and counted, see BadRecords)."""
    yield from iter_records(path, '{"text": ...}', _text_field, bad)
