"""data: streaming prepare -> .bin (data.py prepare), packed rows, train/val carve-off, collators, clear data errors."""

import importlib.util
import json
import os
import pickle
import re
import shutil
from unittest import mock
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
from conftest import ROOT, write_parquet
from data import DataError, PackedDataset

DOCS = ["To be, or not to be, that is the question:", "What is 12 + 7?\n12 + 7 = 19.",
        "Héllo wörld 🤖 — unicode survives.", "Now is the winter of our discontent\nMade glorious summer."] * 5


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def expected_tokens(tok, docs: list[str]) -> list[int]:
    return [i for d in docs for i in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]


def read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.dtype(data.read_sidecar(path)["dtype"]))


# ----------------------------------------------------------------------------- prepare + packing


def test_prepare_joins_documents_with_eos(tok, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:4] + ["", "   "])
    out = data.prepare_pretrain(src, tok, tmp_path / "a.bin", show_progress=False)
    assert read_bin(out).tolist() == expected_tokens(tok, DOCS[:4])
    meta = data.read_sidecar(out)
    assert (meta["dtype"], meta["n_docs"], meta["n_empty_skipped"], meta["eos_id"]) == ("uint16", 4, 2, 0)
    assert meta["n_tokens"] == len(expected_tokens(tok, DOCS[:4]))
    assert meta["tokenizer_fingerprint"] == data.tokenizer_fingerprint(tok)
    assert meta["sources"][0]["size"] == src.stat().st_size


def test_packed_rows_are_contiguous_shifted_and_unpadded(tok, tmp_path):
    out = data.prepare_pretrain(write_jsonl(tmp_path / "a.jsonl", DOCS), tok, tmp_path / "a.bin", show_progress=False)
    tokens = torch.tensor(expected_tokens(tok, DOCS))
    T = 16
    ds = PackedDataset(out, T, vocab_size=len(tok))
    assert len(ds) == (len(tokens) - 1) // T
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["input_ids"].dtype == ex["labels"].dtype == torch.long
        assert ex["input_ids"].shape == ex["labels"].shape == (T,)
        assert torch.equal(ex["input_ids"], tokens[i * T:(i + 1) * T])
        assert torch.equal(ex["labels"], tokens[i * T + 1:(i + 1) * T + 1])
    assert (tokens == tok.eos_token_id).sum() == len(DOCS)
    batch = data.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, T) and torch.equal(batch["labels"][0], ds[0]["labels"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_chunked_prepare_equals_one_chunk(tok, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    whole = read_bin(data.prepare_pretrain(src, tok, tmp_path / "whole.bin", show_progress=False))
    monkeypatch.setattr(data.pretrain, "CHUNK_BYTES", 40)  # many flushes: the file is written in pieces
    chunked = read_bin(data.prepare_pretrain(src, tok, tmp_path / "chunked.bin", show_progress=False))
    assert chunked.tolist() == whole.tolist()
    assert torch.equal(PackedDataset(tmp_path / "chunked.bin", 8)[3]["input_ids"],
                       torch.from_numpy(whole[24:32].astype(np.int64)))


def test_txt_documents_separated_by_eos_lines(tok, tmp_path, monkeypatch):
    long_doc = "".join(f"Line {i} of a long scene,\n  indented line {i}\n\nNext {i} \nThen {i}\n" for i in range(60))
    src = tmp_path / "a.txt"
    src.write_text(f"first doc\nsecond line\n<|endoftext|>\n<|endoftext|>\n  \n<|endoftext|>\n{long_doc}<|endoftext|>\n",
                   encoding="utf-8")
    monkeypatch.setattr(data.pretrain, "CHUNK_BYTES", 100)  # the long document is read in many pieces
    stats = {}
    pieces = list(data.iter_txt_pieces(src, "<|endoftext|>", stats))
    assert pieces.count(None) == 2 and len(pieces) > 20 and stats == {"n_empty": 2}
    assert "".join(p for p in pieces if p) == "first doc\nsecond line\n" + long_doc
    out = data.prepare_pretrain(src, tok, tmp_path / "a.bin", show_progress=False)
    assert read_bin(out).tolist() == expected_tokens(tok, ["first doc\nsecond line\n", long_doc])
    assert data.read_sidecar(out)["n_empty_skipped"] == 2

    single = tmp_path / "b.txt"
    single.write_text("no separator: the whole file\nis one document", encoding="utf-8")
    out = data.prepare_pretrain(single, tok, tmp_path / "b.bin", show_progress=False)
    assert read_bin(out).tolist() == expected_tokens(tok, [single.read_text()])


def test_several_sources_in_one_file(tok, tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", DOCS[:2]), write_jsonl(tmp_path / "b.jsonl", DOCS[2:3])
    out = data.prepare_pretrain([a, b], tok, tmp_path / "ab.bin", show_progress=False)
    assert read_bin(out).tolist() == expected_tokens(tok, DOCS[:3])


def test_uint32_when_vocab_exceeds_uint16(tok, tmp_path):
    class BigVocab:  # the shipped tokenizer pretending to have 70k tokens
        def __len__(self):
            return 70_000

        def __getattr__(self, name):
            return getattr(tok, name)

    out = data.prepare_pretrain(write_jsonl(tmp_path / "a.jsonl", DOCS[:2]), BigVocab(), tmp_path / "a.bin",
                                show_progress=False)
    assert data.read_sidecar(out)["dtype"] == "uint32"
    assert out.stat().st_size == 4 * len(expected_tokens(tok, DOCS[:2]))

    raw = tmp_path / "raw.bin"  # no sidecar: ids above 65535, written in chunks, dtype given by flag
    ids = np.arange(65_530, 65_530 + 100, dtype=np.uint32)
    with open(raw, "wb") as f:
        for part in np.array_split(ids, 7):
            f.write(part.tobytes())
    ds = PackedDataset(raw, 9, dtype="uint32")
    assert ds[2]["input_ids"].tolist() == list(range(65_530 + 18, 65_530 + 27))
    with pytest.raises(DataError, match=r"token id 65536 at offset 6 is beyond vocab_size 65536; the data was "
                                        r"tokenized with another tokenizer: tokenize its source text with this one"):
        PackedDataset(raw, 9, dtype="uint32", vocab_size=65_536)
    with pytest.raises(DataError, match="no sidecar raw.json says how its token ids are stored; pass --bin_dtype"):
        PackedDataset(raw, 9, vocab_size=70_000)  # no guess from the vocabulary: uint32 read as uint16 is garbage


def test_a_parquet_text_column_prepares_as_its_jsonl_does(tok, tmp_path):
    """A Hugging Face dataset's .parquet files (the Hub's format; other columns ignored), from a --data_path
    folder: the tokens of the same documents as .jsonl."""
    folder = tmp_path / "hub"
    folder.mkdir()
    write_parquet(folder / "train-00000.parquet", [{"text": d, "id": i} for i, d in enumerate(DOCS[:7])])
    write_parquet(folder / "train-00001.parquet", [{"text": d, "id": i} for i, d in enumerate(DOCS[7:])])
    out = data.pretrain_bin(folder, tok, cache_dir=tmp_path / "cache", show_progress=False)
    assert read_bin(out).tolist() == expected_tokens(tok, DOCS)


def test_a_bad_parquet_row_or_file_is_named(tok, tmp_path, capsys):
    rows = write_parquet(tmp_path / "rows.parquet", [{"text": "fine"}, {"text": None}, {"text": "also fine"}])
    with pytest.raises(DataError, match=r"rows.parquet row 2: missing field 'text'"):
        data.prepare_pretrain(rows, tok, tmp_path / "a.bin", show_progress=False)
    out = data.prepare_pretrain(rows, tok, tmp_path / "a.bin", show_progress=False, skip_bad_records=True)
    assert read_bin(out).tolist() == expected_tokens(tok, ["fine", "also fine"])
    assert "rows.parquet: skipped 1 bad record" in capsys.readouterr().err
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"text": "a JSON line, not Parquet"}\n')
    with pytest.raises(DataError, match="fake.parquet: not a readable Parquet file"):
        data.prepare_pretrain(fake, tok, tmp_path / "b.bin", show_progress=False)


def test_dataset_pickles_without_the_token_array(tok, tmp_path):
    out = data.prepare_pretrain(write_jsonl(tmp_path / "a.jsonl", DOCS), tok, tmp_path / "a.bin", show_progress=False)
    ds = PackedDataset(out, 8)
    _ = ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert torch.equal(pickle.loads(blob)[1]["labels"], ds[1]["labels"])


def test_row_subset_and_errors(tok, tmp_path):
    out = data.prepare_pretrain(write_jsonl(tmp_path / "a.jsonl", DOCS), tok, tmp_path / "a.bin", show_progress=False)
    full = PackedDataset(out, 8)
    sub = PackedDataset(out, 8, rows=[3, 1])
    assert len(sub) == 2 and torch.equal(sub[0]["input_ids"], full[3]["input_ids"])
    assert torch.equal(full.subset([3, 1])[0]["labels"], full[3]["labels"])
    assert torch.equal(sub.subset([1])[0]["labels"], full[1]["labels"]) and len(full.subset([])) == 0
    with pytest.raises(DataError, match="out of range"):
        PackedDataset(out, 8, rows=[len(full)])
    with pytest.raises(DataError, match="too few for one row"):
        PackedDataset(out, 10_000)
    with pytest.raises(DataError, match="no such token file"):
        PackedDataset(tmp_path / "missing.bin", 8)


# ----------------------------------------------------------------------------- caching


def test_pretrain_bin_caches(tok, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    first = data.pretrain_bin(src, tok, cache_dir=tmp_path / "cache", show_progress=False)
    assert first.parent == tmp_path / "cache"

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(data.pretrain, "prepare_pretrain", fail)
    assert data.pretrain_bin(src, tok, cache_dir=tmp_path / "cache") == first
    assert data.pretrain_bin(first, tok) == first  # a .bin is used as-is
    monkeypatch.undo()

    write_jsonl(src, DOCS[:3])  # edited source -> new key, re-prepared
    os.utime(src, ns=(1, 1))
    second = data.pretrain_bin(src, tok, cache_dir=tmp_path / "cache", show_progress=False)
    assert second != first and read_bin(second).tolist() == expected_tokens(tok, DOCS[:3])
    default = data.pretrain_bin(src, tok, show_progress=False)
    assert default.parent == tmp_path / ".cache"


def test_bin_checked_against_sidecar(tok, tmp_path):
    out = data.prepare_pretrain(write_jsonl(tmp_path / "a.jsonl", DOCS), tok, tmp_path / "a.bin", show_progress=False)
    meta = data.read_sidecar(out)
    out.with_suffix(".json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "0" * 16}))
    with pytest.raises(DataError, match="different tokenizer"):
        data.pretrain_bin(out, tok)
    out.with_suffix(".json").write_text(json.dumps(meta))
    with open(out, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="truncated or was rewritten"):
        data.pretrain_bin(out, tok)
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        data.pretrain_bin(tmp_path / "nope.jsonl", tok)


def test_a_raw_bin_needs_its_dtype(tok, tmp_path):
    """A .bin of token ids without the sidecar data.py writes: refused unless --bin_dtype says uint16 or uint32, and
    then read as that (a uint32 file is not read as uint16)."""
    ids = np.array([70_000, 5, 65_536, 7, 1, 2, 3, 4, 5], dtype=np.uint32)
    raw = tmp_path / "tokens.bin"
    ids.tofile(raw)
    with pytest.raises(DataError, match=r"tokens.bin: no sidecar tokens.json .* pass --bin_dtype uint16 or uint32"):
        data.pretrain_bin(raw, tok)
    assert data.pretrain_bin(raw, tok, bin_dtype="uint32") == raw
    assert PackedDataset(raw, 4, dtype="uint32")[0]["input_ids"].tolist() == [70_000, 5, 65_536, 7]
    assert PackedDataset(raw, 4, dtype="uint16")[0]["input_ids"].tolist() == [4464, 1, 5, 0]  # what a guess read
    out = data.prepare_pretrain(write_jsonl(tmp_path / "a.jsonl", DOCS), tok, tmp_path / "a.bin", show_progress=False)
    with pytest.raises(DataError, match="sidecar says dtype uint16, but uint32 was asked for"):
        data.pretrain_bin(out, tok, bin_dtype="uint32")


def test_data_files_name_a_folder_a_glob_or_a_list_in_a_stated_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("b.jsonl", "a.txt", "c.jsonl", "notes.md"):
        (folder / name).write_text("x\n")
    (folder / ".cache").mkdir()
    sub = folder / "sub"
    sub.mkdir()
    (sub / "d.jsonl").write_text("x\n")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(data.data_files(folder, (".jsonl", ".txt"))) == ["corpus/a.txt", "corpus/b.jsonl", "corpus/c.jsonl"]
    assert names(data.data_files(f"{folder}/*.jsonl", (".jsonl",))) == ["corpus/b.jsonl", "corpus/c.jsonl"]
    assert names(data.data_files(f"{folder}/**/*.jsonl", (".jsonl",))) == [
        "corpus/b.jsonl", "corpus/c.jsonl", "corpus/sub/d.jsonl"]
    listed = f"{folder / 'c.jsonl'},{folder / 'a.txt'}, {folder / 'c.jsonl'}"
    assert names(data.data_files(listed, (".jsonl",))) == ["corpus/c.jsonl", "corpus/a.txt"]  # as given, once each
    for spec, message in [(f"{folder}/*.parquet", "no file matches this pattern"), (sub / "none", "no such file"),
                          (f"{folder / 'a.txt'},{folder / 'gone.jsonl'}", "gone.jsonl: no such file or folder")]:
        with pytest.raises(DataError, match=message):
            data.data_files(spec, (".jsonl",))
    with pytest.raises(DataError, match="a folder without .bin files"):
        data.data_files(folder, (".bin",))


def test_several_sources_are_prepared_into_one_cache_in_order(tok, tmp_path, monkeypatch):
    a, b = write_jsonl(tmp_path / "a.jsonl", DOCS[:2]), write_jsonl(tmp_path / "b.jsonl", DOCS[2:3])
    txt = tmp_path / "c.txt"
    txt.write_text("床前明月光，疑是地上霜。\n<|endoftext|>\n举头望明月，低头思故乡。\n", encoding="utf-8")
    out = data.pretrain_bin(f"{b},{a},{txt}", tok, show_progress=False)
    assert out.name.startswith("b+2.") and out.parent == tmp_path / ".cache"
    poem = ["床前明月光，疑是地上霜。\n", "举头望明月，低头思故乡。\n"]
    assert read_bin(out).tolist() == expected_tokens(tok, DOCS[2:3] + DOCS[:2] + poem)
    monkeypatch.setattr(data.pretrain, "prepare_pretrain", lambda *a, **k: pytest.fail("re-tokenized a valid cache"))
    assert data.pretrain_bin(f"{b},{a},{txt}", tok) == out
    monkeypatch.undo()
    assert data.pretrain_bin(f"{a},{b},{txt}", tok, show_progress=False) != out  # another order, another cache
    with pytest.raises(DataError, match=r"a token file among 2 data files"):
        data.pretrain_bin(f"{a},{out}", tok)
    shards = tmp_path / "data_bin"  # another project's shards of one token stream: joined with cat, then trained
    shards.mkdir()
    for i in range(3):
        (shards / f"part_{i:03d}.bin").write_bytes(out.read_bytes())
    with pytest.raises(DataError, match=rf"3 token files \(part_000.bin, ...\): training reads one; join them in "
                                        rf"order \(cat {shards}/part_000.bin {shards}/part_001.bin ... > all.bin\)"):
        data.pretrain_bin(shards, tok)


def test_cli_prepare(tok, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("data_cli", ROOT / "data.py")  # the script, not the package
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    cli.main(["prepare", "--input", str(src), "--tokenizer", str(ROOT / "tokenizer"),
              "--output", str(tmp_path / "a.bin")])
    assert f"{len(expected_tokens(tok, DOCS)):,} tokens" in capsys.readouterr().out
    # --input as train.py's --data_path: a folder, a glob, a comma list (and train.py's --tokenizer_path)
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "1.jsonl", DOCS[:2]), write_jsonl(tmp_path / "src" / "2.jsonl", DOCS[2:])
    for i, spec in enumerate((tmp_path / "src", tmp_path / "src" / "*.jsonl",
                              f"{tmp_path / 'src' / '1.jsonl'},{tmp_path / 'src' / '2.jsonl'}")):
        cli.main(["prepare", "--input", str(spec), "--tokenizer_path", str(ROOT / "tokenizer"),
                  "--output", str(tmp_path / f"s{i}.bin")])
        assert (tmp_path / f"s{i}.bin").read_bytes() == (tmp_path / "a.bin").read_bytes(), spec
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--input", str(bad), "--tokenizer", str(ROOT / "tokenizer"),
                  "--output", str(tmp_path / "b.bin")])
    assert e.value.code == 1 and "line 2: missing field 'text'" in capsys.readouterr().err
    assert not list(tmp_path.glob("b.*"))  # neither the .bin nor a temporary file is left behind


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("line, message", [
    (b'{"text": "ok"', "line 2: malformed JSON"),
    (b'{"content": "x"}', "line 2: missing field 'text' (expected {\"text\": ...})"),
    (b'{"Text": "x", "Label": 1}', "line 2: missing field 'text' (expected {\"text\": ...}); its 'Text' is not it: "
                                   "field names are case-sensitive"),
    (b'{"text": 17}', "line 2: field 'text' must be a string, got int"),
    (b'["text"]', "line 2: expected a JSON object"),
    (b'{"text": "caf\xe9"}', "line 2: not valid UTF-8 (byte 0xe9 at column 14)"),
    (b'{"text": "\\ud800"}', "line 2: text contains an unpaired surrogate"),
])
def test_bad_jsonl_names_file_and_line(tok, tmp_path, line, message):
    src = tmp_path / "x.jsonl"
    src.write_bytes(b'{"text": "fine"}\n' + line + b"\n" + b'{"text": "fine"}\n')
    with pytest.raises(DataError) as e:
        data.prepare_pretrain(src, tok, tmp_path / "x.bin", show_progress=False)
    assert str(e.value).startswith(f"{src} {message}")
    assert not (tmp_path / "x.bin").exists()


def test_utf8_bom_is_accepted(tok, tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    assert list(data.iter_record_texts(src)) == [(1, "hello")]


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(DataError, match="unsupported extension"):
        data.prepare_pretrain(write_jsonl(tmp_path / "a.json", DOCS), tok, tmp_path / "a.bin")
    with pytest.raises(DataError, match="no non-empty documents"):
        data.prepare_pretrain(write_jsonl(tmp_path / "e.jsonl", ["", " "]), tok, tmp_path / "e.bin")
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad.txt line 2: not valid UTF-8"):
        data.prepare_pretrain(bad_txt, tok, tmp_path / "t.bin")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=8)
lines = st.one_of(
    st.binary(max_size=40),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["text", "txt"]), json_values, max_size=2).map(lambda v: json.dumps(v).encode()),
    st.text().map(lambda t: json.dumps({"text": t}).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=lines)
def test_any_line_loads_or_raises_data_error(tmp_path, line):
    """Never a KeyError/IndexError/UnicodeDecodeError from deep inside: either texts or one DataError."""
    src = tmp_path / "h.jsonl"
    src.write_bytes(line.replace(b"\n", b" ") + b"\n")
    try:
        texts = list(data.iter_record_texts(src))
    except DataError as e:
        assert str(e).startswith(f"{src} line 1: ")
    else:
        assert all(isinstance(t, str) for _, t in texts)


# ----------------------------------------------------------------------------- split + pad_collate


@pytest.mark.parametrize("n_rows", [2, 7, 40, 1000, 12_345])
def test_split_train_val(n_rows):
    train, val = data.split_train_val(n_rows, 0.1, seed=3)
    again = data.split_train_val(n_rows, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) >= 1 and len(train) >= 1
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n_rows))
    if n_rows >= 1000:
        assert abs(len(val) / n_rows - 0.1) < 0.02
        assert val.max() - val.min() > n_rows // 2  # spread over the corpus, not just its end
        assert not np.array_equal(val, data.split_train_val(n_rows, 0.1, seed=4)[1])


def test_split_edge_cases():
    train, val = data.split_train_val(10, 0.0)
    assert train.tolist() == list(range(10)) and len(val) == 0
    with pytest.raises(DataError, match="too few"):
        data.split_train_val(1, 0.1)
    with pytest.raises(DataError, match="val_fraction"):
        data.split_train_val(10, 1.0)


def test_pad_collate_right_pads():
    batch = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 7, 8])},
             {"input_ids": torch.tensor([9]), "labels": torch.tensor([10])}]
    out = data.pad_collate(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert out["labels"].tolist() == [[-100, 7, 8], [10, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in out.values())


# ----------------------------------------------------------------------------- shipped sample data


def test_shipped_pretrain_files_are_valid():
    for name in ["pretrain.jsonl", "pretrain_val.jsonl"]:
        texts = [t for _, t in data.iter_record_texts(ROOT / "dataset" / name)]
        assert texts and all(t.strip() for t in texts)
    train = set(t for _, t in data.iter_record_texts(ROOT / "dataset" / "pretrain.jsonl"))
    assert not train & set(t for _, t in data.iter_record_texts(ROOT / "dataset" / "pretrain_val.jsonl"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab Z1.'\n\n\t\r\u00a0é🤖")), max_size=120))
def test_txt_pieces_tokenize_like_the_whole_document(tok, tmp_path, text):
    """Cutting a long .txt document into pieces never changes its tokens (cuts only where BPE splits anyway)."""
    src = tmp_path / "p.txt"
    src.write_bytes(text.encode("utf-8"))
    with mock.patch.object(data.pretrain, "CHUNK_BYTES", 1):
        pieces = [p for p in data.iter_txt_pieces(src, "<|endoftext|>") if p is not None]
    whole = src.read_bytes().decode("utf-8")
    assert "".join(pieces) == (whole if whole.strip() else "")
    ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]
    assert ids == (tok.encode(whole, add_special_tokens=False) if whole.strip() else [])


def _load(name: str) -> list[dict]:
    with open(ROOT / "dataset" / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_arithmetic(answer: str) -> None:
    """Every "a op b (op c) = n." in an answer is true."""
    for expr, value in re.findall(r"(\d+(?: [-+*] \d+)+) = (-?\d+)", answer):
        assert eval(expr) == int(value), answer  # noqa: S307 - digits and + - * only, by the regex


def test_shipped_chat_data_is_well_formed_and_correct():
    for name in ["sft.jsonl", "sft_val.jsonl"]:
        for row in _load(name):
            msgs = row["conversations"]
            roles = [m["role"] for m in msgs if m["role"] != "system"]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, msgs
            assert all(m["role"] != "system" for m in msgs[1:])
            for m in msgs:
                if m["role"] == "assistant":
                    _check_arithmetic(m["content"])
    for name in ["dpo.jsonl", "dpo_val.jsonl"]:
        for row in _load(name):
            assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1] != row["rejected"][-1]
            assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
            _check_arithmetic(row["chosen"][-1]["content"])
    for name in ["grpo.jsonl", "grpo_val.jsonl"]:
        for row in _load(name):
            q = row["prompt"][-1]["content"].replace(" plus ", " + ").replace(" minus ", " - ").replace(" times ", " * ")
            q = re.sub(r"Add (\d+) and (\d+)", r"\1 + \2", q)
            q = re.sub(r"Subtract (\d+) from (\d+)", r"\2 - \1", q)
            q = re.sub(r"Multiply (\d+) by (\d+)", r"\1 * \2", q)
            expr = re.search(r"\d+(?: [-+*] \d+)+", q).group()
            assert str(eval(expr)) == row["answer"], row  # noqa: S307
    sft_keys = {json.dumps(r) for r in _load("sft.jsonl")}
    assert not sft_keys & {json.dumps(r) for r in _load("sft_val.jsonl")}
    assert all(set(r) == {"instruction", "input", "output"} for r in _load("sft_alpaca.jsonl"))
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in _load("dpo_trl.jsonl"))


def test_chat_data_regenerates_byte_identically(tmp_path):
    """make_samples.py (seeded) rebuilds the shipped synthetic files exactly from the shipped pretrain.jsonl."""
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "dataset" / "make_samples.py")
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    shutil.copy(ROOT / "dataset" / "pretrain.jsonl", tmp_path / "pretrain.jsonl")
    make_samples.build_chat(tmp_path)
    for name in ["sft", "sft_val", "sft_alpaca", "dpo", "dpo_val", "dpo_trl", "grpo", "grpo_val"]:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (ROOT / "dataset" / f"{name}.jsonl").read_bytes(), name


# ----------------------------------------------------------------------------- --skip_bad_records

MIXED = [b'{"text": "first good line"}', b'{"text": "broken', b'{"txt": "typo"}', b'{"text": "caf\xe9"}',
         b'{"text": "second good line"}', b'[1, 2]', b'{"text": 3}', b'{"text": "unclosed"', b'{"text": "third"}']


def write_mixed(path: Path) -> Path:
    path.write_bytes(b"\n".join(MIXED) + b"\n")
    return path


def test_strict_run_names_the_first_bad_line(tok, tmp_path):
    src = write_mixed(tmp_path / "mixed.jsonl")
    with pytest.raises(DataError) as e:
        data.prepare_pretrain(src, tok, tmp_path / "m.bin", show_progress=False)
    assert str(e.value).startswith(f"{src} line 2: malformed JSON")
    assert not list(tmp_path.glob("m.*"))


def test_skip_bad_records_skips_counts_and_records_in_the_sidecar(tok, tmp_path, capsys):
    src = write_mixed(tmp_path / "mixed.jsonl")
    out = data.prepare_pretrain(src, tok, tmp_path / "m.bin", show_progress=False, skip_bad_records=True)
    assert read_bin(out).tolist() == expected_tokens(tok, ["first good line", "second good line", "third"])
    expected = {"malformed JSON": 2, "missing field 'text'": 1, "not UTF-8": 1, "not a JSON object": 1,
                "field 'text' not a string": 1}
    assert capsys.readouterr().err.splitlines() == [
        f"{src}: skipped 6 bad records (2 malformed JSON, 1 missing field 'text', 1 not UTF-8, "
        f"1 not a JSON object, 1 field 'text' not a string)"]
    meta = data.read_sidecar(out)
    assert meta["skip_bad_records"] is True and meta["n_bad_skipped"] == 6
    assert meta["sources"][0]["bad_skipped"] == expected
    assert "6 bad records skipped" in data.summary(out)


def test_skip_bad_records_in_txt_drops_undecodable_lines(tok, tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_bytes(b"good one\n\xff\xfe bad\n<|endoftext|>\nalso \xc3 bad\ngood two\n")
    out = data.prepare_pretrain(src, tok, tmp_path / "t.bin", show_progress=False, skip_bad_records=True)
    assert read_bin(out).tolist() == expected_tokens(tok, ["good one\n", "good two\n"])
    assert f"{src}: skipped 2 bad records (2 not UTF-8)" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, content", [(".jsonl", b'{"txt": 1}\nnot json\n'), (".txt", b"\xff\n\xfe\n")])
def test_a_file_of_only_bad_records_fails_even_when_skipping(tok, tmp_path, suffix, content):
    src = tmp_path / f"allbad{suffix}"
    src.write_bytes(content)
    with pytest.raises(DataError, match=rf"allbad{suffix}: all 2 records are bad \(.*\), nothing to train on; line 1: "):
        data.prepare_pretrain(src, tok, tmp_path / "b.bin", show_progress=False, skip_bad_records=True)


def test_cache_of_a_skipping_run_is_not_reused_by_a_strict_one(tok, tmp_path, capsys):
    src = write_mixed(tmp_path / "mixed.jsonl")
    skipped = data.pretrain_bin(src, tok, show_progress=False, skip_bad_records=True)
    assert data.pretrain_bin(src, tok, show_progress=False, skip_bad_records=True) == skipped  # cached
    with pytest.raises(DataError, match="line 2: malformed JSON"):
        data.pretrain_bin(src, tok, show_progress=False)  # a strict run still fails on the first bad line
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    assert data.pretrain_bin(good, tok, show_progress=False) != data.pretrain_bin(good, tok, show_progress=False,
                                                                                 skip_bad_records=True)


many_lines = st.lists(lines, min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=many_lines)
def test_any_lines_with_skipping_load_or_fail_only_when_all_are_bad(tmp_path, rows):
    """Skipping: the good lines come back, the bad ones are counted; a DataError only when no line is good, or
    when the file is one JSON array ("[" first, "]" last), not JSON Lines."""
    src = tmp_path / "h.jsonl"
    src.write_bytes(b"".join(r.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n" for r in rows))
    bad = data.BadRecords(skip=True)
    try:
        texts = list(data.iter_record_texts(src, bad))
    except DataError as e:
        assert re.match(rf"{re.escape(str(src))}(: (all \d+ records are|its only record is) bad| line \d+: the file "
                        r"is a JSON array)", str(e))
    else:
        assert all(isinstance(t, str) for _, t in texts)
        assert len(texts) + sum(bad.skipped(src).values()) <= len(rows)


# ----------------------------------------------------------------------------- collators, property-based


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=9), pad_id=st.integers(0, 6399), data_=st.data())
def test_pad_collate_any_lengths(lengths, pad_id, data_):
    batch = []
    for n in lengths:
        ids = data_.draw(st.lists(st.integers(0, 6399), min_size=n, max_size=n))
        labels = data_.draw(st.lists(st.integers(0, 6399) | st.just(-100), min_size=n, max_size=n))
        batch.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    out = data.pad_collate(pad_id)(batch)
    T = max(lengths)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    for k, v in out.items():
        assert v.shape == (len(lengths), T) and v.dtype == torch.long, k
    for i, (n, ex) in enumerate(zip(lengths, batch)):
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert torch.equal(out["input_ids"][i, :n], ex["input_ids"]) and (out["input_ids"][i, n:] == pad_id).all()
        assert torch.equal(out["labels"][i, :n], ex["labels"]) and (out["labels"][i, n:] == data.IGNORE_INDEX).all()


@settings(max_examples=50, deadline=None)
@given(n_in=st.integers(1, 6), n_lab=st.integers(1, 6))
def test_pad_collate_mismatched_example_is_a_value_error(n_in, n_lab):
    batch = [{"input_ids": torch.ones(n_in, dtype=torch.long), "labels": torch.ones(n_lab, dtype=torch.long)}]
    if n_in == n_lab:
        assert data.pad_collate(0)(batch)["input_ids"].shape == (1, n_in)
    else:
        with pytest.raises(ValueError, match=f"example 0: input_ids has {n_in} tokens but labels {n_lab}"):
            data.pad_collate(0)(batch)


@settings(max_examples=50, deadline=None)
@given(batch_size=st.integers(1, 9), T=st.integers(1, 33), seed=st.integers(0, 1000))
def test_collate_stacks_packed_rows(batch_size, T, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 6400, (T + 1,), generator=g) for _ in range(batch_size)]
    batch = [{"input_ids": r[:-1], "labels": r[1:]} for r in rows]
    out = data.collate(batch)
    assert out["input_ids"].shape == out["labels"].shape == (batch_size, T)
    assert torch.equal(out["input_ids"][:, 1:], out["labels"][:, :-1])
    assert torch.equal(out["labels"][-1], rows[-1][1:])
