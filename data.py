"""Datasets and collators: text files -> batches of tensors.

(Named data.py, not datasets.py: that name would shadow Hugging Face's `datasets` package.)

A batch is a dict of tensors. Language-model batches are {"input_ids": Long[B,T], "labels": Long[B,T]}
with labels ALREADY shifted (labels[:, t] is the target of position t) and -100 = ignored; variable-length
batches add "attention_mask" (1 = real token).

Pretraining data is prepared once into a flat token file (.bin, uint16, or uint32 when the vocabulary
needs it) plus a .json sidecar; training reads it through np.memmap, so corpora larger than RAM work:

    python data.py prepare --input corpus.jsonl --tokenizer tokenizer --output corpus.bin

Input formats:
  .jsonl  one JSON object per line, {"text": "..."}: one document per line (blank lines are skipped).
  .txt    plain UTF-8 text. Documents are separated by a line holding exactly <|endoftext|> (the tokenizer's
          eos token); a file without such a line is one document. Read line by line, never whole.
Every document is followed by eos in the token stream. Empty documents are skipped and counted.

A defective record (a line that is not UTF-8, not JSON, lacks a field, ...) raises one DataError naming the
file and line; with skip_bad_records (train.py --skip_bad_records) it is skipped and counted per reason
instead (see BadRecords, the one policy every line reader takes).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

IGNORE_INDEX = -100
SIDECAR_FORMAT = "zero2llm-tokens-v1"
CHUNK_BYTES = 4 << 20  # text tokenized per batch_encode call: bounded memory, whatever the corpus size


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
    SFT, and any later format such as DPO pairs), so the policy and the report live in one place.

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
        reasons = ", ".join(f"{k} {reason}" for reason, k in counts.items())
        return f"{path}: skipped {n:,} bad record{'s' if n != 1 else ''} ({reasons})"

    def finish(self, path: str | Path, n_good: int) -> None:
        """Called by a reader at the end of `path`: raise if records were skipped and none was good."""
        counts = self.skipped(path)
        if n_good == 0 and counts:
            first = self.first[str(path)]
            reasons = ", ".join(f"{k} {reason}" for reason, k in counts.items())
            n = sum(counts.values())
            raise DataError(f"{path}: {'its only record is' if n == 1 else f'all {n:,} records are'} bad ({reasons}), "
                            f"nothing to train on; line {first.line_no}: {first.detail}")


# ----------------------------------------------------------------------------- tokenizer helpers


def load_tokenizer(tokenizer):
    """A transformers tokenizer from a folder path (offline), or the tokenizer itself."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition: a cached .bin is only valid for the tokenizer that made it."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use; ids >= 65536 need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ----------------------------------------------------------------------------- reading documents


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    """The line as text; a UTF-8 byte-order mark (Windows editors) on line 1 is dropped."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(path, line_no, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        f"re-save the file as UTF-8", "not UTF-8") from None


def _check_text(text: str, path: Path, line_no: int) -> str:
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
    return _check_text(text, path, line_no)


def iter_jsonl_texts(path: str | Path, bad: BadRecords | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each {"text": ...} line. A defect raises ONE DataError naming the line (or is
    skipped and counted, see BadRecords)."""
    yield from iter_jsonl_objects(path, '{"text": ...}', _text_field, bad)


def iter_txt_pieces(path: str | Path, doc_separator: str, stats: dict | None = None,
                    bad: BadRecords | None = None) -> Iterator[str | None]:
    r"""Pieces of text of a .txt file; None ends a document. Empty documents are skipped (counted in
    stats["n_empty"]).

    A long document is cut into pieces of ~CHUNK_BYTES only where the pre-tokenizer splits anyway:
    after a line ending in "<non-space>\n" and before a line starting with a non-space character.
    So the tokens are exactly those of the whole document (a cut after "\n\n" would not be: the
    regex splits "\n\nX" as "\n", "\n" but a piece ending in "\n\n" as one "\n\n").
    """
    path = Path(path)
    lines: list[str] = []  # lines of the current piece
    held: list[str] = []  # earlier pieces of the current document, while it is all whitespace so far
    size, has_text, n_good = 0, False, 0
    bad = bad if bad is not None else BadRecords()
    for _, line in iter_lines(path, bad):
        n_good += 1
        is_separator = line.rstrip("\r\n") == doc_separator
        can_cut = (size >= CHUNK_BYTES and lines and len(lines[-1]) > 1 and not lines[-1][-2].isspace()
                   and line[:1].strip())
        if is_separator or can_cut:
            piece = "".join(lines)
            lines, size = [], 0
            has_text = has_text or bool(piece.strip())
            held.append(piece)
            if has_text:
                yield from held
                held = []
        if is_separator:
            if has_text:
                yield None
            elif stats is not None:
                stats["n_empty"] = stats.get("n_empty", 0) + 1
            held, has_text = [], False
            continue
        lines.append(line)
        size += len(line)
    bad.finish(path, n_good)
    piece = "".join(lines)
    if has_text or piece.strip():  # the text after the last separator (or the whole file without one)
        yield from held + [piece]
        yield None


def iter_jsonl_pieces(path: str | Path, stats: dict | None = None, bad: BadRecords | None = None
                      ) -> Iterator[str | None]:
    """iter_jsonl_texts as pieces (None ends a document), empty documents skipped and counted."""
    for _, text in iter_jsonl_texts(path, bad):
        if text.strip():
            yield text
            yield None
        elif stats is not None:
            stats["n_empty"] = stats.get("n_empty", 0) + 1


# ----------------------------------------------------------------------------- prepare .bin


def read_sidecar(bin_path: str | Path) -> dict | None:
    """The .json written next to a .bin by prepare_pretrain, or None if there is none."""
    side = Path(bin_path).with_suffix(".json")
    if not side.exists():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{side}: unreadable sidecar ({e}); delete it and prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{side}: not a {SIDECAR_FORMAT} sidecar; delete it and prepare the data again")
    return meta


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_pretrain(src_paths: str | Path | Sequence[str | Path], tokenizer, out_path: str | Path,
                     show_progress: bool = True, skip_bad_records: bool = False) -> Path:
    """Tokenize .jsonl/.txt documents into a flat token file `out_path` (+ `out_path`.json sidecar).

    Streams: text is read line by line and tokenized CHUNK_BYTES at a time, so memory stays flat for any
    corpus size. Documents are joined with eos. The file is written under a temporary name and renamed,
    and the sidecar comes last, so an interrupted run never leaves a .bin that looks complete.
    A bad line raises a DataError naming it; with skip_bad_records it is skipped, and the counts per reason
    are printed (one stderr line per file) and recorded in the sidecar.
    """
    tokenizer = load_tokenizer(tokenizer)
    paths = [Path(src_paths)] if isinstance(src_paths, (str, Path)) else [Path(p) for p in src_paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such data file")
        if p.suffix not in (".jsonl", ".txt"):
            raise DataError(f"{p}: unsupported extension {p.suffix!r}; use .jsonl ({{\"text\": ...}} per line) or .txt")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; documents could not be separated")
    dtype = token_dtype(len(tokenizer))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name: parallel runs (sweep trials) may prepare the same cache at once;
    # each writes its own file and the identical results replace one another atomically.
    tmp_path = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    bad = BadRecords(skip=skip_bad_records)
    try:
        n_tokens, n_docs, n_empty = _write_tokens(paths, tokenizer, dtype, tmp_path, show_progress, bad)
        if n_tokens == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no non-empty documents to tokenize")
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    for p in paths:
        if bad.report(p):
            print(bad.report(p), file=sys.stderr)
    out_path.with_suffix(".json").unlink(missing_ok=True)
    os.replace(tmp_path, out_path)
    meta = {
        "format": SIDECAR_FORMAT,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_docs": n_docs,
        "n_empty_skipped": n_empty,
        "skip_bad_records": skip_bad_records,
        "n_bad_skipped": sum(sum(bad.skipped(p).values()) for p in paths),
        "eos_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "sources": [{**_source_stamp(p), "bad_skipped": bad.skipped(p)} for p in paths],
    }
    sidecar_tmp = out_path.with_name(f"{out_path.stem}.{os.getpid()}.json.tmp")
    sidecar_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(sidecar_tmp, out_path.with_suffix(".json"))
    return out_path


def _write_tokens(paths: list[Path], tokenizer, dtype: np.dtype, out_path: Path, show_progress: bool,
                  bad: BadRecords) -> tuple[int, int, int]:
    """Stream the documents of `paths` into `out_path` as tokens; returns (n_tokens, n_docs, n_empty)."""
    backend, eos_id = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    n_tokens = n_docs = 0
    stats = {"n_empty": 0}
    with open(out_path, "wb") as out, tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
                                          desc=f"tokenizing -> {out_path.stem}", disable=not show_progress) as bar:

        def flush(pieces: list[str | None]) -> None:
            """Encode a batch of pieces (None = end of document -> eos) and append them to the file."""
            nonlocal n_tokens, n_docs
            encoded = iter(backend.encode_batch([p for p in pieces if p], add_special_tokens=False))
            arrays = []
            for piece in pieces:
                if piece is None:
                    arrays.append(np.array([eos_id], dtype=dtype))
                    n_docs += 1
                elif piece:
                    arrays.append(np.asarray(next(encoded).ids, dtype=dtype))
            if arrays:
                chunk = np.concatenate(arrays)
                out.write(chunk.tobytes())
                n_tokens += len(chunk)

        for path in paths:
            if path.suffix == ".jsonl":
                stream = iter_jsonl_pieces(path, stats, bad)
            else:
                stream = iter_txt_pieces(path, tokenizer.eos_token, stats, bad)
            pieces: list[str | None] = []
            size = done = 0
            for piece in stream:
                pieces.append(piece)
                size += len(piece or "")
                if size >= CHUNK_BYTES:
                    flush(pieces)
                    bar.update(size)
                    done += size
                    pieces, size = [], 0
            flush(pieces)
            bar.update(max(0, path.stat().st_size - done))
    return n_tokens, n_docs, stats["n_empty"]


def pretrain_bin(path: str | Path, tokenizer, cache_dir: str | Path | None = None, show_progress: bool = True,
                 skip_bad_records: bool = False) -> Path:
    """A token file for `path`: a .bin as-is (checked), or a .jsonl/.txt prepared once and cached.

    The cache key is the source path, size and mtime plus the tokenizer fingerprint (and skip_bad_records),
    so editing the data or changing the tokenizer re-prepares, and anything else reuses; a cache prepared
    with bad lines skipped is never used by a strict run (which fails on the first bad line), nor vice versa. Cache files go to
    `cache_dir` (default: a `.cache` folder next to the source). A .bin without sidecar is read in the dtype
    the tokenizer's vocabulary needs.
    """
    tokenizer = load_tokenizer(tokenizer)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".bin":
        check_bin(path, tokenizer)
        return path
    stamp = _source_stamp(path)
    key_parts = [stamp, tokenizer_fingerprint(tokenizer)] + (["skip_bad_records"] if skip_bad_records else [])
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else path.parent / ".cache"
    out = cache_dir / f"{path.stem}.{key}.bin"
    if out.exists() and out.with_suffix(".json").exists():
        return out
    prepare_pretrain(path, tokenizer, out, show_progress=show_progress, skip_bad_records=skip_bad_records)
    if show_progress:
        print(summary(out), file=sys.stderr)
    return out


def summary(bin_path: str | Path) -> str:
    """One line about a prepared token file (what the user wants to see after preparing)."""
    meta = read_sidecar(bin_path)
    bad = f", {meta['n_bad_skipped']:,} bad records skipped" if meta.get("n_bad_skipped") else ""
    return (f"{bin_path}: {meta['n_tokens']:,} tokens ({meta['dtype']}), {meta['n_docs']:,} documents, "
            f"{meta['n_empty_skipped']} empty skipped{bad}")


def check_bin(path: str | Path, tokenizer=None, dtype: str | None = None, vocab_size: int | None = None
              ) -> np.dtype:
    """The dtype of a token file, after checking it against its sidecar (size, tokenizer).

    Without a sidecar the dtype is `dtype`, else what `vocab_size` (or the tokenizer's) needs.
    """
    path = Path(path)
    meta = read_sidecar(path)
    if meta is None:
        if dtype is not None:
            return np.dtype(dtype)
        if vocab_size is None and tokenizer is None:
            raise DataError(f"{path}: no sidecar .json; say which dtype the tokens are (uint16 or uint32)")
        return token_dtype(vocab_size if vocab_size is not None else len(tokenizer))
    dt = np.dtype(meta["dtype"])
    if dtype is not None and np.dtype(dtype) != dt:
        raise DataError(f"{path}: sidecar says dtype {dt.name}, but {dtype} was asked for")
    expected = meta["n_tokens"] * dt.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path}: {path.stat().st_size} bytes, sidecar expects {expected}; the file is truncated "
                        f"or was rewritten: prepare it again")
    if tokenizer is not None and meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{path}: prepared with a different tokenizer (fingerprint {meta['tokenizer_fingerprint']}); "
                        f"prepare it again with this one")
    return dt


# ----------------------------------------------------------------------------- datasets


class RowsDataset(torch.utils.data.Dataset):
    """A dataset of rows that can be viewed through a subset of them (the train/val carve-off)."""

    rows: np.ndarray | None  # the rows this view shows, None = all

    def subset(self, rows: np.ndarray | Sequence[int]) -> "RowsDataset":
        """A view of some of this dataset's rows (indices into this view), sharing the underlying data."""
        view = copy.copy(self)
        rows = np.asarray(rows, dtype=np.int64)
        view.rows = rows if self.rows is None else self.rows[rows]
        return view

    def _row(self, i: int) -> int:
        """The underlying row of this view's i-th row."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.rows is None else int(self.rows[i])


class PackedDataset(RowsDataset):
    """Fixed-length rows of a flat token file: row i = tokens[i*T : i*T+T+1], no padding.

    input_ids = row[:-1], labels = row[1:]. Rows cross document boundaries (documents are joined by
    eos, so the model learns where a document ends). `rows` selects a subset of rows (the train/val
    carve-off). The memmap is opened lazily, so DataLoader workers each open their own instead of
    pickling the whole array. `vocab_size` checks every id is < vocab_size (one pass over the file)
    and, for a .bin without sidecar, picks the dtype when `dtype` is not given.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, rows: np.ndarray | Sequence[int] | None = None,
                 dtype: str | None = None, vocab_size: int | None = None):
        self.path = Path(bin_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such token file")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.dtype = check_bin(self.path, None, dtype, vocab_size)
        n_bytes = self.path.stat().st_size
        if n_bytes % self.dtype.itemsize:
            raise DataError(f"{self.path}: {n_bytes} bytes is not a whole number of {self.dtype.name} tokens; "
                            f"wrong dtype or truncated file")
        self.n_tokens = n_bytes // self.dtype.itemsize
        self.n_rows = (self.n_tokens - 1) // seq_len if self.n_tokens else 0
        if self.n_rows == 0:
            raise DataError(f"{self.path}: {self.n_tokens} tokens, too few for one row of seq_len {seq_len} "
                            f"(needs {seq_len + 1}); use more data or a shorter max_seq_len")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None and len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self.n_rows):
            raise DataError(f"{self.path}: row index out of range [0, {self.n_rows})")
        self._tokens: np.memmap | None = None
        if vocab_size is not None:
            self.check_ids(vocab_size)

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def check_ids(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Raise if a token id is >= vocab_size (data prepared with a bigger tokenizer), naming the offset."""
        for start in range(0, self.n_tokens, chunk):
            part = self.tokens[start:start + chunk]
            bad = np.flatnonzero(part >= vocab_size)
            if len(bad):
                off = start + int(bad[0])
                raise DataError(f"{self.path}: token id {int(self.tokens[off])} at offset {off} is >= vocab_size "
                                f"{vocab_size}; the data was tokenized with another tokenizer")

    def __len__(self) -> int:
        return self.n_rows if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i]) if self.rows is not None else i
        if not 0 <= r < self.n_rows:
            raise IndexError(i)
        start = r * self.seq_len
        row = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": row[:-1], "labels": row[1:]}


def split_train_val(n_rows: int, val_fraction: float, seed: int = 0, block_rows: int = 16
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_rows, val_rows): disjoint, sorted, together all rows.

    Validation takes whole blocks of adjacent rows chosen at random across the corpus: not just the
    last book (unrepresentative), and not single rows interleaved with training rows (a scene split
    across both would leak). Blocks shrink on small corpora so there are at least ~20 to choose from.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    all_rows = np.arange(n_rows, dtype=np.int64)
    if val_fraction == 0.0 or n_rows == 0:
        return all_rows, np.empty(0, dtype=np.int64)
    block = max(1, min(block_rows, n_rows // 20))
    n_blocks = -(-n_rows // block)
    n_val = max(1, round(n_blocks * val_fraction))
    if n_val >= n_blocks:
        raise DataError(f"{n_rows} rows are too few to carve off a validation fraction of {val_fraction}; "
                        f"give a validation file or more data")
    val_blocks = np.random.default_rng(seed).choice(n_blocks, size=n_val, replace=False)
    is_val = np.zeros(n_blocks, dtype=bool)
    is_val[val_blocks] = True
    row_is_val = np.repeat(is_val, block)[:n_rows]
    return all_rows[~row_is_val], all_rows[row_is_val]


# ----------------------------------------------------------------------------- SFT conversations

CHAT_ROLES = ("system", "user", "assistant")
SFT_FORMATS = ('{"conversations": [{"role": ..., "content": ...}, ...]} (chat) or '
               '{"instruction": ..., "input": ..., "output": ...} (Alpaca)')


def chat_messages(conv: object, field: str, path: Path, line_no: int) -> list[dict[str, str]]:
    """A checked list of {"role", "content"} messages (the value of `field` of one line): string values, known
    roles, a system message only first. The one check of every chat format (SFT, DPO, GRPO prompts)."""
    def fail(detail: str, reason: str) -> BadRecord:
        return BadRecord(path, line_no, detail, reason)

    if not isinstance(conv, list) or not conv:
        raise fail(f"'{field}' must be a non-empty list of {{\"role\", \"content\"}} messages", f"bad '{field}'")
    messages = []
    for i, m in enumerate(conv, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise fail(f"message {i} must be an object {{\"role\": \"...\", \"content\": \"...\"}} "
                       f"with string values", "malformed message")
        if m["role"] not in CHAT_ROLES:
            raise fail(f"message {i} has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}", "unknown role")
        if m["role"] == "system" and i > 1:
            raise fail(f"message {i} is a system message; only the first message may be one", "late system message")
        messages.append({"role": m["role"], "content": _check_text(m["content"], path, line_no)})
    return messages


def sft_messages(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], str]:
    """The chat messages of one SFT line and its format ("chat" or "alpaca"), detected per line.

    Chat: an optional first system message, then user/assistant messages (at least one assistant).
    Alpaca: user = instruction (+ a blank line + input when input is not empty), assistant = output;
    an optional "system" field becomes the system message.
    """
    def fail(detail: str, reason: str) -> BadRecord:
        return BadRecord(path, line_no, detail, reason)

    if "conversations" in row:
        messages = chat_messages(row["conversations"], "conversations", path, line_no)
        if not any(m["role"] == "assistant" for m in messages):
            raise fail("the conversation has no assistant message, so nothing to train on", "no assistant message")
        return messages, "chat"
    if "instruction" in row or "output" in row:
        fields = {}
        for key, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
            value = row.get(key, None if required else "")
            if value is None and required:
                raise fail(f"Alpaca format needs a string field '{key}'", f"missing field '{key}'")
            if not isinstance(value, str):
                raise fail(f"field '{key}' must be a string, got {type(value).__name__}", f"field '{key}' not a string")
            fields[key] = _check_text(value, path, line_no)
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
        system = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
        return system + turns, "alpaca"
    raise fail(f"expected {SFT_FORMATS}; got keys {sorted(row)[:5]}", "unknown format")


GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")  # a chat template's assistant-token marks


def render_chat(tokenizer, messages: list[dict[str, str]], path: Path, line_no: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation rendered with the chat template, and the mask of the assistant's tokens.

    The mask covers what the assistant says: its reply and the end-of-turn token that closes it (<|im_end|>,
    <|eot_id|>; so the model learns to stop), never the role header ("<|im_start|>assistant\n"), nor
    system/user turns. A template with {% generation %} blocks marks those tokens itself
    (return_assistant_tokens_mask); the templates real models ship (Qwen, Llama) have none, and are read
    by rendering prefixes instead (assistant_spans). The one place SFT and DPO get their masks from."""
    if not GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        return _render_chat_by_prefixes(tokenizer, messages, path, line_no)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"], dtype=np.int32)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    if not mask.any():
        raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} marks no "
                        f"assistant tokens; it needs {{% generation %}} ... {{% endgeneration %}} around "
                        f"assistant replies (see tokenizer/tokenizer_config.json)")
    return ids, mask


def assistant_spans(tokenizer, messages: list[dict[str, str]], path: Path, line_no: int
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply in it, for templates without
    {% generation %} marks.

    For assistant message i: `before` = messages[:i] rendered with the generation prompt (ends with the
    assistant header), `upto` = messages[:i+1] rendered. The reply is upto[len(before):] minus trailing
    whitespace (ChatML's "\n" after <|im_end|> is the next turn's business). That needs the template to be
    prefix-stable: `before` a prefix of `upto` and of the whole rendering. Templates that render a reply
    differently once later turns follow (Qwen3 drops the <think> block of earlier replies) are still read
    when the reply's content and closing text appear right there; anything else is refused, naming the line.
    """
    name = tokenizer.name_or_path

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise DataError(f"{path} line {line_no}: the chat template of {name} fails on this conversation: "
                            f"{type(e).__name__}: {e}") from None

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1], False)
        reply = upto[len(before):].rstrip()
        start = len(before)
        if upto.startswith(before) and full.startswith(before):
            if full.startswith(reply, start):
                spans.append((start, start + len(reply)))
                continue
            content = message["content"]
            at, closing = full.find(content, start), reply[reply.rfind(content) + len(content):]
            if content and content in reply and at >= 0 and full.startswith(closing, at + len(content)):
                spans.append((start, at + len(content) + len(closing)))
                continue
        raise DataError(f"{path} line {line_no}: the chat template of {name} is not prefix-stable: the conversation "
                        f"rendered up to assistant message {i + 1} is not how the whole conversation renders it, so "
                        f"its tokens cannot be told apart. Put {{% generation %}} ... {{% endgeneration %}} around "
                        f"assistant replies in the template (tokenizer_config.json's chat_template)")
    return full, spans


def _render_chat_by_prefixes(tokenizer, messages: list[dict[str, str]], path: Path, line_no: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """render_chat for templates without {% generation %}: the assistant_spans' characters, mapped to tokens
    through the tokenizer's offsets (a token is trained when it overlaps a reply)."""
    if not tokenizer.is_fast:
        raise DataError(f"{tokenizer.name_or_path}: its chat template has no {{% generation %}} marks and it is not "
                        f"a fast tokenizer (no character offsets), so assistant tokens cannot be found")
    text, spans = assistant_spans(tokenizer, messages, path, line_no)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    return ids, mask


def last_reply_mask(mask: np.ndarray) -> np.ndarray:
    """Only the last contiguous run of a render_chat mask: the final assistant reply (+ its <|im_end|>)."""
    end = int(np.flatnonzero(mask)[-1]) + 1
    before = np.flatnonzero(~mask[:end])
    start = int(before[-1]) + 1 if before.size else 0
    out = np.zeros_like(mask)
    out[start:end] = True
    return out


def shifted_example(tokens: np.ndarray, trained: np.ndarray) -> dict[str, torch.Tensor]:
    """{"input_ids": x_0..x_{n-1}, "labels": x_{t+1} where trained[t+1], else -100} (pre-shifted)."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    labels = ids[1:].masked_fill(~torch.from_numpy(np.asarray(trained[1:], dtype=bool)), IGNORE_INDEX)
    return {"input_ids": ids[:-1], "labels": labels}


def chat_tokenizer(tokenizer, path: str | Path, mode: str):
    """The tokenizer for a chat data file, after checking the file exists and the tokenizer can render chats."""
    tokenizer = load_tokenizer(tokenizer)
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file")
    if not tokenizer.chat_template:
        raise DataError(f"the tokenizer ({tokenizer.name_or_path}) has no chat_template; {mode} needs one")
    return tokenizer


class SFTDataset(RowsDataset):
    """Conversations for supervised fine-tuning: one row each, loss on the assistant's tokens only.

    Each line (chat or Alpaca, see sft_messages) is rendered with the tokenizer's chat template and
    tokenized once, up front. The template's {% generation %} blocks mark what the assistant says:
    its content and the closing <|im_end|> (so the model learns to stop), never the role header
    "<|im_start|>assistant\n", nor system/user turns. With tokens x_0..x_n and that mask m:
        input_ids = x_0..x_{n-1},  labels[t] = x_{t+1} if m_{t+1} else -100   (pre-shifted, as PackedDataset)
    A conversation longer than max_seq_len + 1 tokens is cut to that length and counted in
    `n_truncated`, never dropped (`n_truncated_untrained`: cut so early no assistant token is left).
    `lengths` (tokens per row) lets the sampler batch rows of similar length together.
    A bad line raises a DataError naming it; with skip_bad_records it is skipped and counted per reason
    (`bad_skipped`, `bad_report`).
    """

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, skip_bad_records: bool = False):
        tokenizer = chat_tokenizer(tokenizer, path, "SFT")
        self.path, self.max_seq_len = Path(path), max_seq_len
        tokens: list[np.ndarray] = []
        trained: list[np.ndarray] = []
        self.formats = {"chat": 0, "alpaca": 0}
        self.n_truncated = self.n_truncated_untrained = 0
        bad = BadRecords(skip=skip_bad_records)
        for line_no, (messages, fmt) in iter_jsonl_objects(self.path, SFT_FORMATS, sft_messages, bad):
            self.formats[fmt] += 1
            ids, mask = render_chat(tokenizer, messages, self.path, line_no)
            if len(ids) > max_seq_len + 1:
                ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                self.n_truncated += 1
                self.n_truncated_untrained += int(not mask[1:].any())
            tokens.append(ids)
            trained.append(mask)
        if not tokens:
            raise DataError(f"{self.path}: no conversations (expected one JSON object per line: {SFT_FORMATS})")
        self.bad_skipped = bad.skipped(self.path)  # reason -> lines skipped (skip_bad_records)
        self.bad_report = bad.report(self.path)  # the stderr line about them, or None
        self.offsets = np.cumsum([0] + [len(t) for t in tokens])
        self.tokens, self.trained = np.concatenate(tokens), np.concatenate(trained)
        self.rows: np.ndarray | None = None  # a subset's conversations (see subset), None = all

    @property
    def lengths(self) -> torch.Tensor:
        """Input tokens of each row: the sampler groups rows of similar length into a batch."""
        lengths = torch.from_numpy(np.diff(self.offsets) - 1)
        return lengths if self.rows is None else lengths[torch.from_numpy(self.rows)]

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.rows is not None:
            i = int(self.rows[i])
        a, b = self.offsets[i], self.offsets[i + 1]
        return shifted_example(self.tokens[a:b], self.trained[a:b])

    @property
    def n_trained_tokens(self) -> int:
        """Label tokens over all conversations read (a row's first token is never a target)."""
        return int(self.trained.sum() - self.trained[self.offsets[:-1]].sum())

    def summary(self) -> str:
        """One line for the log: what was read, how much is trained, what was cut."""
        fmts = ", ".join(f"{n:,} {k}" for k, n in self.formats.items() if n)
        cut = (f"{self.n_truncated:,} truncated at max_seq_len {self.max_seq_len}"
               + (f" ({self.n_truncated_untrained:,} of them with no assistant token left)"
                  if self.n_truncated_untrained else ""))
        return (f"{self.path}: {len(self.offsets) - 1:,} conversations ({fmts}), {len(self.tokens):,} tokens, "
                f"{self.n_trained_tokens:,} trained (assistant); {cut}")


# ----------------------------------------------------------------------------- DPO preference pairs

DPO_FORMATS = ('{"chosen": [messages], "rejected": [messages]} (MiniMind) or {"prompt": str | [messages], '
               '"chosen": str | [assistant message], "rejected": ...} (TRL)')


def dpo_pair(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """(chosen conversation, rejected conversation, format) of one DPO line; the format is detected per line.

    MiniMind: two full conversations that end with an assistant reply and share everything before it.
    TRL: a prompt (a string = one user message, or messages) and each side's completion (a string or a list
    of assistant messages) appended to it. Both conversations go through sft_messages' checks.
    """
    def fail(detail: str, reason: str) -> BadRecord:
        return BadRecord(path, line_no, detail, reason)

    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing and not ("prompt" in row or len(missing) == 1):
        raise fail(f"expected {DPO_FORMATS}; got keys {sorted(row)[:5]}", "unknown format")
    if missing:
        raise fail(f"the pair has no '{missing[0]}' side", f"missing '{missing[0]}'")
    fmt = "trl" if "prompt" in row else "minimind"
    prompt: list = []
    if fmt == "trl":
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise fail("'prompt' must be a string or a non-empty list of messages", "bad 'prompt'")
    sides = []
    for side in ("chosen", "rejected"):
        value = row[side]
        if fmt == "trl" and isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list) or not value:
            raise fail(f"'{side}' must be a non-empty list of {{\"role\", \"content\"}} messages"
                       + (" or a string" if fmt == "trl" else ""), f"bad '{side}'")
        try:
            messages, _ = sft_messages({"conversations": prompt + value}, path, line_no)
        except BadRecord as e:
            raise fail(f"'{side}': {e.detail}", e.reason) from None
        if messages[-1]["role"] != "assistant":
            raise fail(f"the '{side}' conversation does not end with an assistant reply", "no final assistant reply")
        sides.append(messages)
    if sides[0][:-1] != sides[1][:-1]:
        raise fail("'chosen' and 'rejected' differ before their final assistant reply; a pair shares its prompt",
                   "different prompts")
    if sides[0] == sides[1]:  # DPO's loss is then ln 2 whatever the model: no gradient, a wasted row
        raise fail("'chosen' and 'rejected' are the same reply; a pair must prefer one answer over another",
                   "identical sides")
    return sides[0], sides[1], fmt


class DPODataset(RowsDataset):
    """Preference pairs for DPO: one row per pair, each side a conversation rendered with the chat template.

    Labels (pre-shifted, as SFTDataset's) train only the FINAL assistant reply and its <|im_end|>: the
    prompt, earlier turns and role headers are -100 (render_chat's mask cut to its last run). A side longer
    than max_seq_len + 1 tokens is cut and the pair counted in `n_truncated`. `lengths` is the longer side of
    each pair, for the sampler's length grouping. `ref_logps` ([pairs, 2]: chosen, rejected; NaN = not
    computed), once set (set_ref_logps), travels with each item so the reference model need not run.
    """

    SIDES = ("chosen", "rejected")

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, skip_bad_records: bool = False):
        tokenizer = chat_tokenizer(tokenizer, path, "DPO")
        self.path, self.max_seq_len = Path(path), max_seq_len
        tokens: dict[str, list[np.ndarray]] = {s: [] for s in self.SIDES}
        trained: dict[str, list[np.ndarray]] = {s: [] for s in self.SIDES}
        self.formats = {"minimind": 0, "trl": 0}
        self.n_truncated = self.n_truncated_untrained = 0
        self.n_truncated_identical = 0  # cut before the sides differ: loss ln 2, no gradient, whatever the model
        bad = BadRecords(skip=skip_bad_records)
        for line_no, (chosen, rejected, fmt) in iter_jsonl_objects(self.path, DPO_FORMATS, dpo_pair, bad):
            self.formats[fmt] += 1
            cut = untrained = False
            for side, messages in zip(self.SIDES, (chosen, rejected)):
                ids, mask = render_chat(tokenizer, messages, self.path, line_no)
                mask = last_reply_mask(mask)
                if len(ids) > max_seq_len + 1:
                    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                    cut, untrained = True, untrained or not mask[1:].any()
                tokens[side].append(ids)
                trained[side].append(mask)
            self.n_truncated += cut
            self.n_truncated_untrained += untrained
            self.n_truncated_identical += cut and np.array_equal(tokens["chosen"][-1], tokens["rejected"][-1])
        if not tokens["chosen"]:
            raise DataError(f"{self.path}: no preference pairs (expected one JSON object per line: {DPO_FORMATS})")
        self.bad_skipped = bad.skipped(self.path)
        self.bad_report = bad.report(self.path)
        self.offsets = {s: np.cumsum([0] + [len(t) for t in tokens[s]]) for s in self.SIDES}
        self.tokens = {s: np.concatenate(tokens[s]) for s in self.SIDES}
        self.trained = {s: np.concatenate(trained[s]) for s in self.SIDES}
        self.ref_logps: np.ndarray | None = None  # [all pairs, 2], shared by subset views
        self.rows: np.ndarray | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Input tokens of each pair's longer side (both sides are padded to one length in a batch)."""
        lengths = torch.from_numpy(np.maximum(*(np.diff(self.offsets[s]) - 1 for s in self.SIDES)))
        return lengths if self.rows is None else lengths[torch.from_numpy(self.rows)]

    def __len__(self) -> int:
        return len(self.offsets["chosen"]) - 1 if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._row(i)
        item = {}
        for s in self.SIDES:
            a, b = self.offsets[s][i], self.offsets[s][i + 1]
            for k, v in shifted_example(self.tokens[s][a:b], self.trained[s][a:b]).items():
                item[f"{s}_{k}"] = v
        if self.ref_logps is not None:
            item["ref_logps"] = torch.from_numpy(self.ref_logps[i].copy())
        return item

    def set_ref_logps(self, values: torch.Tensor | np.ndarray) -> None:
        """Reference log-probs [len(self), 2] of this view's pairs (chosen, rejected), in this view's order."""
        values = np.asarray(values, dtype=np.float32).reshape(len(self), 2)
        if self.ref_logps is None:
            self.ref_logps = np.full((len(self.offsets["chosen"]) - 1, 2), np.nan, dtype=np.float32)
        rows = np.arange(len(self)) if self.rows is None else self.rows
        self.ref_logps[rows] = values  # in place: subset views of the same file share it

    def summary(self) -> str:
        fmts = ", ".join(f"{n:,} {k}" for k, n in self.formats.items() if n)
        n_tok = sum(len(t) for t in self.tokens.values())
        cut = (f"{self.n_truncated:,} truncated at max_seq_len {self.max_seq_len}"
               + (f" ({self.n_truncated_untrained:,} of them with a side left without reply tokens)"
                  if self.n_truncated_untrained else "")
               + (f" ({self.n_truncated_identical:,} cut before the sides differ: they teach nothing; raise "
                  f"--max_seq_len)" if self.n_truncated_identical else ""))
        return f"{self.path}: {len(self.offsets['chosen']) - 1:,} preference pairs ({fmts}), {n_tok:,} tokens; {cut}"


# ----------------------------------------------------------------------------- GRPO prompts

GRPO_FORMAT = ('{"prompt": str | [messages], "answer": str | number (optional), ...} (other fields are passed '
               'to the reward functions)')


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """A conversation so far as the model sees it when asked to answer: the chat template with the generation
    prompt (<|im_start|>assistant\n), as text and as ids. Rendered as text first: apply_chat_template's
    tokenize=True returns a list or a BatchEncoding depending on the transformers version; the template
    already holds every special token, so none is added (no double BOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def grpo_prompt(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], dict[str, object]]:
    """(prompt messages, the line's other fields) of one GRPO line. A plain-string prompt becomes one user
    message: a chat model answers only what is rendered with its template (PITFALLS: without it, it never
    ends its turn). "answer", when present, is kept as text (numbers as written: 29 -> "29")."""
    def fail(detail: str, reason: str) -> BadRecord:
        return BadRecord(path, line_no, detail, reason)

    if "prompt" not in row:
        raise fail(f"missing field 'prompt' (expected {GRPO_FORMAT})", "missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _check_text(prompt, path, line_no)}]
    else:
        messages = chat_messages(prompt, "prompt", path, line_no)
    if messages[-1]["role"] != "user":
        raise fail(f"the prompt's last message has role {messages[-1]['role']!r}; it must end with the user message "
                   f"the model answers", "prompt not ending with a user message")
    columns = {k: v for k, v in row.items() if k != "prompt"}
    answer = columns.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        raise fail(f"'answer' must be a string or a number, got {type(answer).__name__}", "bad 'answer'")
    columns["answer"] = None if answer is None else _check_text(str(answer), path, line_no)
    return messages, columns


class GRPODataset(RowsDataset):
    """Prompts for GRPO: one row each, rendered with the chat template and the generation prompt, plus the
    line's other fields ("answer", ...) for the reward functions.

    There are no labels: the completions are sampled during training. A prompt longer than max_seq_len -
    max_completion_length tokens (the completion must fit after it) is a bad record: it stops the run naming
    the line, or is skipped and counted with skip_bad_records. Cutting it would drop either the system prompt
    or the question.
    """

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, skip_bad_records: bool = False,
                 max_completion_length: int = 0):
        tokenizer = chat_tokenizer(tokenizer, path, "GRPO")
        self.path, self.max_prompt_len = Path(path), max_seq_len - max_completion_length
        max_prompt_len = self.max_prompt_len
        self.prompt_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.messages: list[list[dict[str, str]]] = []
        self.columns: list[dict[str, object]] = []

        def parse(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], dict, str, list[int]]:
            messages, columns = grpo_prompt(row, path, line_no)
            text, ids = render_prompt(tokenizer, messages)
            if len(ids) > max_prompt_len:
                raise BadRecord(path, line_no, f"the prompt has {len(ids)} tokens; at most {max_prompt_len} fit "
                                f"(--max_seq_len minus --max_completion_length)", "prompt too long")
            return messages, columns, text, ids

        bad = BadRecords(skip=skip_bad_records)
        for _, (messages, columns, text, ids) in iter_jsonl_objects(self.path, GRPO_FORMAT, parse, bad):
            self.messages.append(messages)
            self.columns.append(columns)
            self.texts.append(text)
            self.prompt_ids.append(ids)
        if not self.prompt_ids:
            raise DataError(f"{self.path}: no prompts (expected one JSON object per line: {GRPO_FORMAT})")
        self.column_names = sorted({k for c in self.columns for k in c})  # every row gets each (None if absent)
        self.bad_skipped = bad.skipped(self.path)
        self.bad_report = bad.report(self.path)
        self.rows: np.ndarray | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Prompt tokens of each row: the sampler batches similar lengths (less left padding)."""
        lengths = torch.tensor([len(p) for p in self.prompt_ids])
        return lengths if self.rows is None else lengths[torch.from_numpy(self.rows)]

    def __len__(self) -> int:
        return len(self.prompt_ids) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, object]:
        i = self._row(i)
        return {"input_ids": torch.tensor(self.prompt_ids[i], dtype=torch.long), "prompt": self.texts[i],
                "prompt_messages": self.messages[i],
                "columns": {k: self.columns[i].get(k) for k in self.column_names}}

    def summary(self) -> str:
        lengths = [len(p) for p in self.prompt_ids]
        n_answers = sum(c.get("answer") is not None for c in self.columns)
        return (f"{self.path}: {len(lengths):,} prompts ({n_answers:,} with an answer), {min(lengths)}-{max(lengths)} "
                f"tokens (mean {sum(lengths) / len(lengths):.0f}); at most {self.max_prompt_len} fit")


# ----------------------------------------------------------------------------- collators


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-shaped examples (packed pretraining rows) into a batch."""
    return {k: torch.stack([ex[k] for ex in batch]) for k in batch[0]}


def pad_collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Collator for variable-length LM examples: right-pads input_ids with `pad_id`, labels with -100.

    Returns {"input_ids", "labels", "attention_mask"} (mask 1 = real token). Right padding keeps
    position ids 0..n-1 of every example identical to unpadded training.
    """

    def fn(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        T = max(len(ex["input_ids"]) for ex in batch)
        out = {"input_ids": torch.full((len(batch), T), pad_id, dtype=torch.long),
               "labels": torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), T), dtype=torch.long)}
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            if len(ex["labels"]) != n:
                raise ValueError(f"example {i}: input_ids has {n} tokens but labels {len(ex['labels'])}")
            out["input_ids"][i, :n] = torch.as_tensor(ex["input_ids"])
            out["labels"][i, :n] = torch.as_tensor(ex["labels"])
            out["attention_mask"][i, :n] = 1
        return out

    return fn


def pair_collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Collator for DPODataset items: B pairs -> ONE right-padded batch of 2B rows, the B chosen sides first,
    then the B rejected ones, all padded to one common length, so a single forward pass serves both sides.
    Returns pad_collate's {"input_ids", "labels", "attention_mask"}, plus "ref_logps" [2B] when the items
    carry precomputed reference log-probs (same row order)."""
    pad = pad_collate(pad_id)

    def fn(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]}
                for side in DPODataset.SIDES for ex in batch]
        out = pad(rows)
        if "ref_logps" in batch[0]:
            ref = torch.stack([ex["ref_logps"] for ex in batch]).float()  # [B, 2]
            out["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return out

    return fn


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids [B, T], attention_mask [B, T]) padded on the LEFT, so every
    row's next token lands in the same column (what batched generation with one KV cache needs)."""
    rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def prompt_collate(pad_id: int) -> Callable[[list[dict[str, object]]], dict[str, object]]:
    """Collator for GRPODataset items: left-padded {"input_ids", "attention_mask"} plus, untouched, the rendered
    "prompts", their "prompt_messages" and "columns" (field -> one value per row) for the reward functions.
    (The loop moves only tensors to the device.)"""

    def fn(batch: list[dict[str, object]]) -> dict[str, object]:
        ids, mask = left_pad([ex["input_ids"] for ex in batch], pad_id)
        names = batch[0]["columns"].keys()
        return {"input_ids": ids, "attention_mask": mask, "prompts": [ex["prompt"] for ex in batch],
                "prompt_messages": [ex["prompt_messages"] for ex in batch],
                "columns": {k: [ex["columns"][k] for ex in batch] for k in names}}

    return fn


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero2LLM data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize .jsonl/.txt documents into a flat .bin token file for pretraining")
    prep.add_argument("--input", nargs="+", required=True, help=".jsonl ({'text': ...} per line) or .txt files")
    prep.add_argument("--tokenizer", default="tokenizer", help="tokenizer folder (default: tokenizer)")
    prep.add_argument("--output", required=True, help="output .bin path (a .json sidecar is written next to it)")
    prep.add_argument("--skip_bad_records", action="store_true",
                      help="skip malformed lines (counted per reason) instead of stopping at the first one")
    args = parser.parse_args(argv)
    try:
        out = prepare_pretrain(args.input, args.tokenizer, args.output, skip_bad_records=args.skip_bad_records)
    except DataError as e:
        parser.exit(1, f"error: {e}\n")
    print(summary(out))


if __name__ == "__main__":
    main()
