"""Pretraining corpora: text files -> a flat token file (.bin) -> fixed-length rows.

A corpus is prepared once into a flat token file (.bin, uint16, or uint32 when the vocabulary needs it)
plus a .json sidecar; training reads it through np.memmap, so corpora larger than RAM work:

    python data.py prepare --input corpus.jsonl --tokenizer tokenizer --output corpus.bin

Input formats:
  .jsonl  one JSON object per line, {"text": "..."}: one document per line (blank lines are skipped).
  .parquet  a "text" column (a Hugging Face dataset's files): one document per row, read a batch at a time.
  .txt    plain UTF-8 text. Documents are separated by a line holding exactly <|endoftext|> (the tokenizer's
          eos token); a file without such a line is one document. Read line by line, never whole.
Every document is followed by eos in the token stream. Empty documents are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .records import (PARQUET, BadRecords, DataError, check_not_foreign, data_files, iter_lines, iter_record_texts,
                      source_bytes)
from .rows import RowsDataset

SIDECAR_FORMAT = "zero2llm-tokens-v1"
CHUNK_BYTES = 4 << 20  # text tokenized per batch_encode call: bounded memory, whatever the corpus size


# ----------------------------------------------------------------------------- tokenizer helpers


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition: a cached .bin is only valid for the tokenizer that made it."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use; ids >= 65536 need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ----------------------------------------------------------------------------- reading documents


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


def iter_record_pieces(path: str | Path, stats: dict | None = None, bad: BadRecords | None = None
                      ) -> Iterator[str | None]:
    """iter_record_texts as pieces (None ends a document), empty documents skipped and counted."""
    for _, text in iter_record_texts(path, bad):
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(folder: Path) -> None:
    """Delete the temporary files (<name>.<pid>.tmp, <stem>.<pid>.json.tmp) that a killed prepare left in
    `folder`; those of a prepare still running (its pid alive) stay."""
    for tmp in [*folder.glob("*.tmp")]:
        parts = tmp.name.removesuffix(".tmp").removesuffix(".json").rsplit(".", 1)
        if len(parts) == 2 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            tmp.unlink(missing_ok=True)


def cut_long_text(text: str, pre_tokenizer: Any, limit: int) -> Iterator[str]:
    """`text` in pieces of about `limit` characters, each cut where the tokenizer's pre-tokenizer splits anyway,
    so that the pieces' tokens are the whole text's (a byte-level BPE never merges across those splits).

    Tokenizing a document of many megabytes in one call takes gigabytes (transformers' Encoding keeps strings and
    offsets per token); in pieces, memory stays flat. A stretch without any split (one giant "word") is cut at
    the limit.
    """
    start, margin = 0, min(4096, limit // 4)  # the window around a cut: wide enough to hold a split, inside the piece
    while len(text) - start > limit:
        target = start + limit
        window_start = target - margin
        splits = pre_tokenizer.pre_tokenize_str(text[window_start:target + margin]) if pre_tokenizer else []
        # A pre-token's start is a split; away from the window's edges it is the whole text's split too.
        cuts = [window_start + begin for _, (begin, _) in splits[1:] if margin // 2 < begin < 3 * margin // 2]
        cut = min(cuts, key=lambda c: abs(c - target)) if cuts else target
        yield text[start:cut]
        start = cut
    yield text[start:]


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_pretrain(src_paths: str | Path | Sequence[str | Path], tokenizer, out_path: str | Path,
                     show_progress: bool = True, skip_bad_records: bool = False) -> Path:
    """Tokenize .jsonl/.parquet/.txt documents into a flat token file `out_path` (+ `out_path`.json sidecar).

    Streams: text is read line by line (a .parquet file a batch of rows at a time) and tokenized CHUNK_BYTES at
    a time, so memory stays flat for any corpus size. Documents are joined with eos. The file is written under a
    temporary name and renamed, and the sidecar comes last, so an interrupted run never leaves a .bin that looks
    complete.
    A bad line raises a DataError naming it; with skip_bad_records it is skipped, and the counts per reason
    are printed (one stderr line per file) and recorded in the sidecar.
    """
    paths = [Path(src_paths)] if isinstance(src_paths, (str, Path)) else [Path(p) for p in src_paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such data file")
        check_not_foreign(p)
        if p.suffix not in (".jsonl", PARQUET, ".txt"):
            raise DataError(f"{p}: unsupported extension {p.suffix!r}; use .jsonl ({{\"text\": ...}} per line), "
                            f".parquet (a \"text\" column) or .txt")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; documents could not be separated")
    dtype = token_dtype(len(tokenizer))
    out_path = Path(out_path)
    check_output(out_path, paths)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out_path.parent)
    # A per-process temporary name: parallel runs (sweep trials) may prepare the same cache at once;
    # each writes its own file and the identical results replace one another atomically.
    tmp_path = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    bad = BadRecords(skip=skip_bad_records)
    sidecar_tmp = out_path.with_name(f"{out_path.stem}.{os.getpid()}.json.tmp")
    try:
        n_tokens, n_docs, n_empty = _write_tokens(paths, tokenizer, dtype, tmp_path, show_progress, bad)
        if n_tokens == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no non-empty documents to tokenize")
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
        sidecar_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except BaseException as e:  # leave no temporary file behind; nothing was replaced yet
        tmp_path.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # typically a full disk
            free = shutil.disk_usage(out_path.parent).free >> 20
            raise DataError(f"could not write {out_path}: {e.strerror or e} ({free} MiB free there); nothing was "
                            f"replaced. Free disk space and prepare again") from None
        raise
    for p in paths:
        if bad.report(p):
            print(bad.report(p), file=sys.stderr)
    # Both files are complete; the .bin goes in place first and its sidecar last, so that a kill in between leaves
    # a .bin without a sidecar, which is never mistaken for a complete one.
    out_path.with_suffix(".json").unlink(missing_ok=True)
    os.replace(tmp_path, out_path)
    os.replace(sidecar_tmp, out_path.with_suffix(".json"))
    return out_path


def check_output(out_path: Path, inputs: list[Path]) -> None:
    """Never replace what is not ours: an input, or a file (or a sidecar's place) that no prepare wrote."""
    sidecar = out_path.with_suffix(".json")
    for p in inputs:
        for written in (out_path, sidecar):
            if p.resolve() == written.resolve():
                raise DataError(f"--output {out_path}: prepare would write {written}, which is the input {p}, and "
                                f"replace it with token ids; choose another --output")
    try:
        ours = read_sidecar(out_path) is not None
    except DataError:
        raise DataError(f"--output {out_path}: its sidecar's place {sidecar} holds a file prepare did not write; "
                        f"choose another --output, or move that file") from None
    if out_path.exists() and not ours:
        raise DataError(f"--output {out_path}: exists, and is not a token file prepare wrote (no sidecar next to "
                        f"it); choose another --output, or delete it")


def _write_tokens(paths: list[Path], tokenizer, dtype: np.dtype, out_path: Path, show_progress: bool,
                  bad: BadRecords) -> tuple[int, int, int]:
    """Stream the documents of `paths` into `out_path` as tokens; returns (n_tokens, n_docs, n_empty)."""
    backend, eos_id = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    n_tokens = n_docs = 0
    stats = {"n_empty": 0}
    sizes = {p: source_bytes(p) for p in paths}  # for the progress bar (a .parquet file: its uncompressed size)
    with open(out_path, "wb") as out, tqdm(total=sum(sizes.values()), unit="B", unit_scale=True,
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
            if path.suffix in (".jsonl", PARQUET):
                stream = iter_record_pieces(path, stats, bad)
            else:
                stream = iter_txt_pieces(path, tokenizer.eos_token, stats, bad)
            pieces: list[str | None] = []
            size = done = 0
            for piece in (part for whole in stream for part in
                          ([whole] if whole is None else cut_long_text(whole, backend.pre_tokenizer, CHUNK_BYTES))):
                pieces.append(piece)
                size += len(piece or "")
                if size >= CHUNK_BYTES:
                    flush(pieces)
                    bar.update(size)
                    done += size
                    pieces, size = [], 0
            flush(pieces)
            bar.update(max(0, sizes[path] - done))
    return n_tokens, n_docs, stats["n_empty"]


def pretrain_bin(path: str | Path | Sequence[str | Path], tokenizer, cache_dir: str | Path | None = None,
                 show_progress: bool = True, skip_bad_records: bool = False, bin_dtype: str | None = None) -> Path:
    """A token file for `path`: a .bin as-is (checked), or .jsonl/.parquet/.txt files prepared once and cached.

    `path` is a --data_path: a file, a folder, a glob, or several files (data.data_files), prepared together in
    that order into one token file. A .bin must come alone; without its sidecar it is read as `bin_dtype`
    (uint16 or uint32), and refused when that is not given: the file itself does not say.
    The cache key is the source paths, sizes and mtimes plus the tokenizer fingerprint (and skip_bad_records),
    so editing the data or changing the tokenizer re-prepares, and anything else reuses; a cache prepared
    with bad lines skipped is never used by a strict run (which fails on the first bad line), nor vice versa.
    Cache files go to `cache_dir` (default: a `.cache` folder next to the first source).
    """
    paths = data_files(path, (".jsonl", PARQUET, ".txt", ".bin"))
    bins = [p for p in paths if p.suffix == ".bin"]
    if bins and len(bins) == len(paths) > 1:  # shards of one token stream (written by another project)
        raise DataError(f"{len(bins)} token files ({bins[0].name}, ...): training reads one; join them in order "
                        f"(cat {' '.join(str(b) for b in bins[:2])}{' ...' if len(bins) > 2 else ''} > all.bin) and "
                        f"train on all.bin (with --bin_dtype if they have no .json sidecar), or prepare their source "
                        f"text into one (python data.py prepare --input FILES --output all.bin)")
    if bins and len(paths) > 1:
        raise DataError(f"{bins[0]}: a token file among {len(paths)} data files; train on it alone, or prepare "
                        f"every source into one .bin (python data.py prepare --input FILE ... --output X.bin)")
    if bins:
        check_bin(bins[0], tokenizer, bin_dtype)
        return bins[0]
    stamps = [_source_stamp(p) for p in paths]
    key_parts = [stamps[0] if len(stamps) == 1 else stamps, tokenizer_fingerprint(tokenizer)] + (
        ["skip_bad_records"] if skip_bad_records else [])
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else paths[0].parent / ".cache"
    name = paths[0].stem + (f"+{len(paths) - 1}" if len(paths) > 1 else "")
    out = cache_dir / f"{name}.{key}.bin"
    if out.exists() and out.with_suffix(".json").exists():
        return out
    if cache_dir.is_dir():
        remove_orphans(cache_dir)
    prepare_pretrain(paths, tokenizer, out, show_progress=show_progress, skip_bad_records=skip_bad_records)
    if show_progress:
        print(summary(out), file=sys.stderr)
    return out


def summary(bin_path: str | Path) -> str:
    """One line about a prepared token file (what the user wants to see after preparing)."""
    meta = read_sidecar(bin_path)
    bad = f", {meta['n_bad_skipped']:,} bad records skipped" if meta.get("n_bad_skipped") else ""
    return (f"{bin_path}: {meta['n_tokens']:,} tokens ({meta['dtype']}), {meta['n_docs']:,} documents, "
            f"{meta['n_empty_skipped']} empty skipped{bad}")


def check_bin(path: str | Path, tokenizer=None, dtype: str | None = None) -> np.dtype:
    """The dtype of a token file, after checking it against its sidecar (size, tokenizer).

    Without a sidecar the dtype is `dtype`, and not guessed when that is None: a uint32 file read as uint16
    (or the reverse) is a stream of wrong ids that trains without an error.
    """
    path = Path(path)
    meta = read_sidecar(path)
    if meta is None:
        if dtype is not None:
            return np.dtype(dtype)
        raise DataError(f"{path}: no sidecar {path.with_suffix('.json').name} says how its token ids are stored; pass "
                        f"--bin_dtype uint16 or uint32 (what it was written with), or prepare the source text with "
                        f"python data.py prepare")
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


# ----------------------------------------------------------------------------- rows


class PackedDataset(RowsDataset):
    """Fixed-length rows of a flat token file: row i = tokens[i*T : i*T+T+1], no padding.

    input_ids = row[:-1], labels = row[1:]. Rows cross document boundaries (documents are joined by
    eos, so the model learns where a document ends). `rows` selects a subset of rows (the train/val
    carve-off). The memmap is opened lazily, so DataLoader workers each open their own instead of
    pickling the whole array. `dtype` is that of a .bin without sidecar (check_bin); `vocab_size` checks
    every id is < vocab_size (one pass over the file), `vocab_name` saying what that limit is. All rows have
    one length, so `lengths` is None.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, rows: np.ndarray | Sequence[int] | None = None,
                 dtype: str | None = None, vocab_size: int | None = None, vocab_name: str = ""):
        self.path = Path(bin_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such token file")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.dtype = check_bin(self.path, None, dtype)
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
            self.check_ids(vocab_size, vocab_name or f"vocab_size {vocab_size}")

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def check_ids(self, vocab_size: int, vocab_name: str, chunk: int = 1 << 24) -> None:
        """Raise if a token id is >= vocab_size (data prepared with a bigger tokenizer), naming the offset and
        `vocab_name`, what the limit is."""
        for start in range(0, self.n_tokens, chunk):
            part = self.tokens[start:start + chunk]
            bad = np.flatnonzero(part >= vocab_size)
            if len(bad):
                off = start + int(bad[0])
                raise DataError(f"{self.path}: token id {int(self.tokens[off])} at offset {off} is beyond "
                                f"{vocab_name}; the data was tokenized with another tokenizer: tokenize its source "
                                f"text with this one (python data.py prepare --input FILE --tokenizer FOLDER)")

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
