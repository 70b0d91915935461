"""SFT: chat/Alpaca data, assistant-only labels token by token, truncation, length-grouped batches, --mode sft."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from conftest import (CONVERSATION, ROOT, check_resume_is_exact, read_metrics, sft_args, train_losses, write_jsonl,
                      write_parquet)
from data import IGNORE_INDEX, DataError, SFTDataset, pad_collate
from trainer.sampler import ResumableBatchSampler


# ----------------------------------------------------------------------------- labels


def test_labels_are_the_assistant_tokens_token_by_token(tok, tmp_path):
    """Rebuild the template by hand: header and other turns -100, each reply and its <|im_end|> trained."""
    data = SFTDataset(write_jsonl(tmp_path / "one.jsonl", [{"conversations": CONVERSATION}]), tok, 512)
    ids, trained, reply_starts = [], [], []
    for m in CONVERSATION:
        header, body = tok.encode(f"<|im_start|>{m['role']}\n"), tok.encode(m["content"] + "<|im_end|>")
        if m["role"] == "assistant":
            reply_starts.append(len(ids) + len(header))
        ids += header + body + tok.encode("\n")
        trained += [False] * len(header) + [m["role"] == "assistant"] * len(body) + [False]
    row = data[0]
    assert row["input_ids"].tolist() == ids[:-1]
    expected = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]  # labels[t] = target of t
    labels = row["labels"].tolist()
    assert labels == expected
    # The usual off-by-one bugs of SFT masks, spelled out at the first reply (label t = target of position t):
    first_reply, start = tok.encode("12 + 7 = 19.<|im_end|>"), reply_starts[0]
    assert labels[start - 2] == IGNORE_INDEX                             # the role header's last token: not trained
    assert labels[start - 1:start - 1 + len(first_reply)] == first_reply  # first reply token ... <|im_end|>: trained
    assert labels[start - 1 + len(first_reply)] == IGNORE_INDEX          # the "\n" after <|im_end|>: not trained
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "12 + 7 = 19.<|im_end|>19 + 3 = 22.<|im_end|>"
    assert data.n_trained_tokens == sum(trained[1:])


def test_alpaca_is_the_same_as_the_equivalent_chat(tok, tmp_path):
    rows = [{"instruction": "Reverse the word 'crown'.", "input": "", "output": "'crown' reversed is 'nworc'."},
            {"instruction": "Add the numbers.", "input": "3 and 4", "output": "3 + 4 = 7.", "system": "Be brief."}]
    chats = [{"conversations": [{"role": "user", "content": "Reverse the word 'crown'."},
                                {"role": "assistant", "content": "'crown' reversed is 'nworc'."}]},
             {"conversations": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Add the numbers.\n\n3 and 4"},
                                {"role": "assistant", "content": "3 + 4 = 7."}]}]
    alpaca = SFTDataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, 512)
    chat = SFTDataset(write_jsonl(tmp_path / "c.jsonl", chats), tok, 512)
    assert alpaca.formats["alpaca"] == 2 and chat.formats["chat"] == 2 and sum(alpaca.formats.values()) == 2
    for i in range(2):
        assert alpaca[i]["input_ids"].tolist() == chat[i]["input_ids"].tolist()
        assert alpaca[i]["labels"].tolist() == chat[i]["labels"].tolist()
    # Both formats in one file, detected line by line (the shipped Alpaca sample too).
    mixed = SFTDataset(write_jsonl(tmp_path / "m.jsonl", rows + chats), tok, 512)
    assert mixed.formats == {"chat": 2, "prompt-completion": 0, "text": 0, "alpaca": 2}
    assert len(SFTDataset(ROOT / "dataset" / "sft_alpaca.jsonl", tok, 512)) == 51
    # ShareGPT's messages ({"from", "value"}) are the same conversations; another sender is named
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in c["conversations"]]}
                for c in chats]
    share = SFTDataset(write_jsonl(tmp_path / "s.jsonl", sharegpt), tok, 512)
    for i in range(2):
        assert share[i]["input_ids"].tolist() == chat[i]["input_ids"].tolist()
        assert share[i]["labels"].tolist() == chat[i]["labels"].tolist()
    odd = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}]
    with pytest.raises(DataError, match="o.jsonl line 1: message 2 is from 'bot'; ShareGPT messages here are from "
                                        "human, gpt, system"):
        SFTDataset(write_jsonl(tmp_path / "o.jsonl", odd), tok, 512)


def test_long_conversations_are_truncated_and_counted_never_dropped(tok, tmp_path, sft_files, base_model):
    data = SFTDataset(sft_files["train"], tok, max_seq_len=24)
    n_lines = len(sft_files["train"].read_text().splitlines())
    assert len(data) == n_lines
    full = SFTDataset(sft_files["train"], tok, max_seq_len=512)
    assert data.n_truncated == int((full.lengths > 24).sum()) > 0
    assert int(data.lengths.max()) == 24
    assert f"{data.n_truncated} truncated at max_seq_len 24" in data.summary()
    # A conversation cut before its first reply keeps no label; it is counted as such.
    long_prompt = {"conversations": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    short = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    cut = SFTDataset(write_jsonl(tmp_path / "long.jsonl", [long_prompt, short]), tok, max_seq_len=16)
    assert cut.n_truncated == cut.n_truncated_untrained == 1
    assert (cut[0]["labels"] == IGNORE_INDEX).all() and (cut[1]["labels"] != IGNORE_INDEX).any()
    # When no conversation keeps a reply, every step would be empty and the run would end with the model unchanged.
    cut.check_trainable()
    with pytest.raises(DataError, match=r"no assistant token to train on; 1 of 2 conversations lost their replies "
                                        r"to the cut at max_seq_len 16: raise --max_seq_len"):
        cut.subset([0]).check_trainable()
    all_long = write_jsonl(tmp_path / "all_long.jsonl", [long_prompt] * 8)
    with pytest.raises(DataError, match=r"all_long.jsonl: no assistant token to train on; 8 of 8 conversations"):
        train.main(sft_args({**sft_files, "train": all_long}, base_model, tmp_path / "run", "--max_seq_len", "16"))
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"question": "hi", "answer": "x"}', "expected {\"conversations\""),
    ('{"Text": "Win a prize now", "Label": 1}', "a classification line (Label, Text): SFT trains replies, not a "
                                                "class head; write it as {\"prompt\": <the text>, \"completion\""),
    ('{"text": ""}', "field 'text' must be a non-empty string"),
    ('{"prompt": "你好", "completion": "你好！", "label": false}', "unpaired preference line"),
    ('{"prompt": "你好", "chosen": "你好！", "rejected": "走开。"}', "train it with --mode dpo"),
    ('{"prompt": "你好"}', "needs 'completion' too"),
    ('{"prompt": "你好", "completion": [{"role": "user", "content": "x"}]}', "the completion must be assistant turns"),
    ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": '
     '"[{\\"name\\": \\"f\\""}]}', "'tool_calls' is a string but not JSON"),
    ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": '
     '[{"arguments": {}}]}]}', "must each be {\"name\""),
    ('{"conversations": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "tool", "content": "x", '
     '"tools": "[]"}, {"role": "assistant", "content": "x"}]}', "only a system message may"),
    ('{"conversations": []}', "non-empty list"),
    ('{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"conversations": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "role 'human'"),
    ('{"conversations": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}',
     "only the first message"),
    ('{"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "message 1 must be an object"),
    ('{"instruction": "hi"}', "Alpaca format needs a string field 'output'"),
    ('{"instruction": "hi", "input": 3, "output": "x"}', "field 'input' must be a string"),
])
def test_bad_lines_name_the_file_and_line(tok, tmp_path, line, message):
    good = json.dumps({"conversations": CONVERSATION[1:3]})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=rf"bad.jsonl line 2: .*{re.escape(message)}"):
        SFTDataset(path, tok, 64)


# ----------------------------------------------------------------------------- batching


def test_a_json_array_or_csv_file_says_how_to_make_json_lines(tok, tmp_path):
    """Alpaca's alpaca_data.json is one pretty-printed JSON array, not JSON Lines: the error says so, and the command
    it gives converts the file into one that trains."""
    import shlex
    import subprocess
    import sys

    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}, {"instruction": "Add 2 and 3.", "input": "",
                                                                       "output": "5"}]
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(rows, indent=4))
    with pytest.raises(DataError, match=r"alpaca_data.json line 1: the file is a JSON array") as e:
        SFTDataset(array, tok, 512)
    command = str(e.value).split("convert it with ", 1)[1].replace("python ", f"{shlex.quote(sys.executable)} ", 1)
    subprocess.run(command, shell=True, check=True)
    converted = SFTDataset(tmp_path / "alpaca_data.jsonl", tok, 512)
    assert converted.formats["alpaca"] == 2
    (tmp_path / "chats.csv").write_text("instruction,output\nSay hi.,Hi!\n")
    with pytest.raises(DataError, match=r"chats.csv: a CSV file; data files are JSON Lines"):
        SFTDataset(tmp_path / "chats.csv", tok, 512)
    # A folder of such files: said, not only that it holds no data file
    (tmp_path / "arrays").mkdir()
    (tmp_path / "arrays" / "alpaca_data.json").write_text(array.read_text())
    with pytest.raises(DataError, match=r"arrays: a folder without .jsonl or .parquet files: its .json files are read "
                                        r"when named one by one"):
        SFTDataset(tmp_path / "arrays", tok, 512)


def test_a_datasets_save_to_disk_folder_says_how_to_export_parquet(tok, tmp_path):
    """datasets' save_to_disk writes Arrow files (data-00000-of-00001.arrow) beside dataset_info.json: neither the
    folder nor an .arrow file is read here, and both errors give the command that writes Parquet, which is."""
    split = tmp_path / "wiki" / "train"
    split.mkdir(parents=True)
    (tmp_path / "wiki" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (split / "dataset_info.json").write_text("{}")
    (split / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff arrow stream")
    export = r"write its rows as Parquet, which is read here: python -c \"import datasets; d = datasets.load_from_disk"
    with pytest.raises(DataError, match=rf"wiki: a folder without .jsonl or .parquet files: .*wiki is a datasets "
                                        rf"save_to_disk folder \(Arrow files\); {export}"):
        SFTDataset(tmp_path / "wiki", tok, 512)
    with pytest.raises(DataError, match=rf"train is a datasets save_to_disk folder \(Arrow files\); {export}"):
        SFTDataset(split / "data-00000-of-00001.arrow", tok, 512)


def padding_fraction(lengths: torch.Tensor, batches: Iterable[list[int]]) -> float:
    """Share of a padded batch's positions that are padding, over `batches` (lists of row indices)."""
    real = padded = 0
    for rows in batches:
        lens = lengths[rows]
        real += int(lens.sum())
        padded += int(lens.max()) * len(rows)
    return 1 - real / max(padded, 1)


def test_length_grouped_batches_pad_little_and_keep_resume_and_ddp(tok):
    data = SFTDataset(ROOT / "dataset" / "sft.jsonl", tok, 512)  # the shipped 8000 chats
    lengths = data.lengths

    def sampler(bs: int, **kw) -> ResumableBatchSampler:
        return ResumableBatchSampler(len(data), bs, seed=1337, lengths=lengths, **kw)

    grouped = padding_fraction(lengths, sampler(16))
    shuffled = padding_fraction(lengths, ResumableBatchSampler(len(data), 16, seed=1337))
    assert grouped < 0.05 < 0.3 < shuffled  # measured: 2.7% vs 43% on the shipped data
    full = [i for b in sampler(16) for i in b]
    assert sorted(full) == list(range(len(data)))           # every row once per epoch
    assert [i for b in sampler(16, start=480) for i in b] == full[480:]  # resume mid-epoch
    assert full != [i for b in sampler(16, epoch=1) for i in b]         # a new order each epoch
    # 2 ranks x 8 rows and 8 rows x 2 accumulation steps read, step for step, the rows of one batch of 16.
    r0, r1 = (list(sampler(8, rank=r, world_size=2)) for r in range(2))
    acc = list(sampler(8, group_rows=16))
    for step, rows in enumerate(sampler(16)):
        assert sorted(rows) == sorted(r0[step] + r1[step]) == sorted(acc[2 * step] + acc[2 * step + 1])


def test_pad_collate_right_pads_with_ignored_labels(tok, sft_files):
    data = SFTDataset(sft_files["val"], tok, 512)
    batch = pad_collate(tok.pad_token_id)([data[0], data[1]])
    n0, n1 = len(data[0]["input_ids"]), len(data[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- train.py --mode sft


def test_sft_run_loss_falls_and_exports_a_chat_model(tok, sft_files, base_model, tmp_path, capsys):
    import eval_model

    out = tmp_path / "sft"
    result = train.main(sft_args(sft_files, base_model, out, "--max_steps", "40", "--learning_rate", "3e-3",
                                 "--eval_interval", "20"))
    err = capsys.readouterr().err
    assert "240 conversations (200 chat, 40 alpaca)" in err and "truncated at max_seq_len 64" in err
    losses = train_losses(out)
    assert sum(losses[s] for s in range(36, 41)) / 5 < 0.6 * losses[1]
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] and result["val_loss"] == vals[1]
    final = out / "final"
    assert json.loads((final / "zero2llm.json").read_text())["chat"] is True
    # transformers' generate stops only at generation_config's eos ids: a chat model's end of turn is among them.
    from transformers import GenerationConfig
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert sorted(eos) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    # A checkpoint is a model folder too, with the run's tokenizer (not the repo's, which eval_model would borrow).
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out / "checkpoints" / "step_000040").get_vocab() == tok.get_vocab()
    assert json.loads((final / "config.json").read_text())["hidden_size"] == 64  # the --init_from architecture
    assert eval_model.resolve_mode("auto", final) == "chat"
    eval_model.main(["--model_path", str(final), "--prompt", "What is 2 + 3?", "--max_new_tokens", "4",
                     "--temperature", "0"])


def test_sft_accumulation_matches_a_bigger_batch(sft_files, base_model, tmp_path):
    """Micro-batches hold different numbers of assistant tokens: the step's loss is still the mean per token."""
    common = ("--max_steps", "3", "--eval_interval", "0", "--no-save_last", "--save_interval_steps", "0")
    big, acc = tmp_path / "big", tmp_path / "acc"
    train.main(sft_args(sft_files, base_model, big, *common))
    train.main(sft_args(sft_files, base_model, acc, *common, "--batch_size", "4", "--accumulation_steps", "2"))
    a, b = train_losses(big), train_losses(acc)
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_sft_resume_continues_with_identical_losses(sft_files, base_model, tmp_path):
    check_resume_is_exact(lambda out, *extra: sft_args(sft_files, base_model, out, *extra), tmp_path, 8, 4,
                          "--lr_decay_iters", "8", "--eval_interval", "0", "--dropout", "0.1", "--save_interval_steps", "4",
                          "--no-save_last")


@pytest.mark.parametrize("flags, message", [
    (["--init_from", "no/such/model"], "--init_from no/such/model: no model there"),
    (["--dim", "128"], "--dim: --mode sft takes the architecture from --init_from"),
    (["--preset", "small"], "drop --preset"),
    (["--merge"], "--merge is for --mode lora"),
    (["--max_seq_len", "128"], "--max_seq_len 128: beyond the RoPE range of --init_from"),
])
def test_sft_flag_errors(sft_files, base_model, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train.main(sft_args(sft_files, base_model, tmp_path / "x", *flags))
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("mode,previous", [("sft", "pretrain"), ("lora", "sft"), ("dpo", "sft"), ("grpo", "sft")])
def test_default_init_from_says_to_run_the_previous_stage(mode, previous, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/*/final here
    with pytest.raises(SystemExit):
        train.main(["--mode", mode, "--data_path", str(ROOT / "dataset" / "sft.jsonl"),
                    "--val_data_path", str(ROOT / "dataset" / "sft_val.jsonl")])
    assert f"run the previous stage first (python train.py --mode {previous})" in capsys.readouterr().err


def load_pipeline_check():
    """scripts/ is not a package: load scripts/pipeline_check.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_check", ROOT / "scripts" / "pipeline_check.py")
    pipeline_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline_check)
    return pipeline_check


def test_pipeline_check_fails_when_fine_tuning_taught_nothing(base_model, sft_files, capsys):
    """scripts/pipeline_check.py guards the pipeline: a model that never stops at <|im_end|> fails it."""
    code = load_pipeline_check().main(["--before", str(base_model), "--after", str(base_model), "--data",
                                str(sft_files["val"]), "--limit", "3", "--max_new_tokens", "3"])
    out, err = capsys.readouterr()
    results = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and "FAIL" in err
    assert results["after"]["stop_rate"] == 0.0 and results["after"]["conversations"] == 3
    assert 5 < results["after"]["loss"] < 12  # ~ln(6400) for an untrained model


def test_pipeline_check_compares_the_task_stages_and_names_a_missing_folder(base_model, sft_files, tmp_path):
    pipeline_check = load_pipeline_check()
    grpo = pipeline_check.parse_args(["--task", "grpo"])
    assert (grpo.before, grpo.after, grpo.data) == ("out/sft/final", "out/grpo/final", "dataset/grpo_val.jsonl")
    sft = pipeline_check.parse_args([])
    assert (sft.before, sft.after, sft.data) == ("out/pretrain/final", "out/sft/final", "dataset/sft_val.jsonl")
    missing = tmp_path / "no_such_model"
    with pytest.raises(SystemExit, match=f"pipeline_check.py: error: {missing}: no such model folder"):
        pipeline_check.main(["--before", str(missing), "--after", str(base_model), "--data", str(sft_files["val"]),
                             "--limit", "1"])


# ----------------------------------------------------------------------------- bad records, property-based

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=6)
messages = st.lists(st.one_of(json_values, st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "human", 3]), "content": st.text(max_size=12) | json_values})),
    max_size=4)
texts = st.text(max_size=16) | st.sampled_from(["<|im_end|>", "{{ x }}", "{% generation %}", "\u2028", "\ud800"])
good_chats = st.builds(
    lambda system, turns, last: {"conversations": system + [{"role": r, "content": c} for r, c in turns]
                                 + [{"role": "assistant", "content": last}]},
    st.lists(texts.map(lambda t: {"role": "system", "content": t}), max_size=1),
    st.lists(st.tuples(st.sampled_from(["user", "assistant"]), texts), max_size=3), texts)
good_alpaca = st.fixed_dictionaries({"instruction": texts, "output": texts},
                                    optional={"input": texts, "system": texts})
sft_lines = st.one_of(
    good_chats.map(lambda v: json.dumps(v).encode()),
    good_alpaca.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=30),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["conversations", "instruction", "input", "output", "system", "text"]),
                    messages | json_values | st.text(max_size=12), max_size=4).map(lambda v: json.dumps(v).encode()),
    messages.map(lambda m: json.dumps({"conversations": m}).encode()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(sft_lines, min_size=1, max_size=3), skip=st.booleans())
def test_any_sft_lines_load_or_raise_data_error(tok, tmp_path, rows, skip):
    """Never a KeyError/IndexError/TypeError/AttributeError/UnicodeDecodeError: conversations or one DataError."""
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"".join(r.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n" for r in rows))
    try:
        ds = SFTDataset(path, tok, 64, skip_bad_records=skip)
    except DataError as e:
        assert str(e).startswith(f"{path}")
    else:
        assert 1 <= len(ds) <= len(rows) and len(ds) + sum(ds.bad_skipped.values()) <= len(rows)
        assert (ds.bad_report is None) == (not ds.bad_skipped) and (skip or not ds.bad_skipped)
        for i in range(len(ds)):
            ex = ds[i]
            assert ex["input_ids"].shape == ex["labels"].shape and len(ex["input_ids"]) <= 64


SFT_MIXED = [json.dumps({"conversations": CONVERSATION[1:3]}), "{not json",
             json.dumps({"conversations": [{"role": "user", "content": "hi"}]}),
             json.dumps({"instruction": "Say hi.", "output": "hi"}),
             json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}),
             json.dumps({"instruction": "no output"})]


def test_sft_skip_bad_records(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", SFT_MIXED)
    with pytest.raises(DataError, match=r"mixed.jsonl line 2: malformed JSON"):
        SFTDataset(path, tok, 64)
    ds = SFTDataset(path, tok, 64, skip_bad_records=True)
    assert len(ds) == 2 and ds.formats == {"chat": 1, "prompt-completion": 0, "text": 0, "alpaca": 1}
    assert ds.bad_skipped == {"no assistant message": 2, "malformed JSON": 1, "missing field 'output'": 1}
    assert ds.bad_report == (f"{path}: skipped 4 bad records (2 no assistant message, 1 malformed JSON, "
                             f"1 missing field 'output')")
    with pytest.raises(DataError, match=r"all 2 records are bad .* line 1: .*no assistant message"):
        SFTDataset(write_jsonl(tmp_path / "allbad.jsonl", SFT_MIXED[2::2][:1] + SFT_MIXED[4:5]), tok, 64,
                   skip_bad_records=True)


def test_sft_run_with_skip_bad_records_reports_the_counts(sft_files, base_model, tmp_path, capsys):
    rows = sft_files["train"].read_text().splitlines()[:40] + SFT_MIXED[1:3]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "val": sft_files["val"]}
    with pytest.raises(DataError, match=r"train.jsonl line 41: malformed JSON"):
        train.main(sft_args(files, base_model, tmp_path / "strict", "--max_steps", "1"))
    capsys.readouterr()
    train.main(sft_args(files, base_model, tmp_path / "skip", "--max_steps", "2", "--eval_interval", "0",
                        "--no-save_last", "--skip_bad_records"))
    err = capsys.readouterr().err
    assert f"{files['train']}: skipped 2 bad records (1 malformed JSON, 1 no assistant message)" in err
    assert "40 conversations (40 chat)" in err


def test_rope_range_counts_yarn_scaling():
    from model.config import config_from_preset
    from trainer.modes.finetune import rope_range

    plain = config_from_preset("tiny", max_seq_len=64)
    assert rope_range(plain) == 64
    yarn = config_from_preset("tiny", max_seq_len=64, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 64})
    assert rope_range(yarn) == 256


def test_a_shorter_training_length_keeps_the_models_context(sft_files, base_model, tmp_path):
    """--max_seq_len is the rows' length, not the model's: the export keeps its 64-position context, and the next
    stage may train on 64-token rows from it."""
    first = tmp_path / "short"
    train.main(sft_args(sft_files, base_model, first, "--max_seq_len", "32", "--max_steps", "1", "--eval_interval", "0"))
    assert json.loads((first / "final" / "config.json").read_text())["max_position_embeddings"] == 64
    train.main(sft_args(sft_files, first / "final", tmp_path / "next", "--max_seq_len", "64", "--max_steps", "1",
                        "--eval_interval", "0"))


# ----------------------------------------------------------------------------- other projects' formats

# The shipped template before it rendered tools and reasoning: what older exports carry.
OLDER_TEMPLATE = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
                  "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}{%- else %}"
                  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
                  "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
# A MiniMind-3 sft_t2t line: tools and tool calls as JSON text, a reasoning, a tool result, the final reply.
MINIMIND_TOOL_LINE = {"conversations": [
    {"role": "system", "content": "你是一个乐于助人的助手。", "tools": json.dumps([WEATHER_TOOL], ensure_ascii=False)},
    {"role": "user", "content": "北京今天天气怎么样？"},
    {"role": "assistant", "content": "", "reasoning_content": "用户想知道北京的天气，我需要调用工具。",
     "tool_calls": '[{"name": "get_weather", "arguments": {"city": "北京"}}]'},
    {"role": "tool", "content": '{"city": "北京", "weather": "晴", "temperature": "25°C"}'},
    {"role": "assistant", "content": "北京今天晴，气温25°C。"}]}


def expected_row(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation written by hand as (text, trained) pieces, tokenized piece by piece."""
    ids, trained = [], []
    for text, keep in segments:
        piece = tok.encode(text)
        ids += piece
        trained += [keep] * len(piece)
    return ids[:-1], [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]


def one_row(tok, tmp_path, line: dict, max_seq_len: int = 1024, name: str = "one.jsonl") -> SFTDataset:
    return SFTDataset(write_jsonl(tmp_path / name, [line]), tok, max_seq_len)


def test_a_parquet_file_reads_as_its_jsonl(tok, tmp_path, sft_files, base_model):
    """A Hugging Face dataset's .parquet file gives the rows its .jsonl gives. Arrow gives every row every column
    and every message every field any message has, None where it had none; those are dropped, or an Alpaca row
    among chats would read as a chat without messages (the training file here mixes the two)."""
    rows = [MINIMIND_TOOL_LINE, {"conversations": CONVERSATION}]
    jsonl = SFTDataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, 1024)
    parquet = SFTDataset(write_parquet(tmp_path / "a.parquet", rows), tok, 1024)
    assert len(jsonl) == len(parquet) == 2
    for i in range(2):
        assert all(torch.equal(jsonl[i][k], parquet[i][k]) for k in jsonl[i])
    chats = [json.loads(line) for line in Path(sft_files["train"]).read_text().splitlines()]
    out = tmp_path / "run"
    train.main(sft_args({"train": write_parquet(tmp_path / "train.parquet", chats, 256), "val": sft_files["val"]},
                        base_model, out, "--max_steps", "2", "--eval_interval", "0"))
    assert (out / "final" / "model.safetensors").is_file()


def tools_prompt(system: str) -> str:
    return (f"<|im_start|>system\n{system}\n\n# Tools\n\nYou may call one or more functions to assist with the user "
            "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>\n\nFor each function call, return a json "
            "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')


def test_tool_calling_trains_the_calls_and_replies_never_the_results(tok, tmp_path):
    """MiniMind-3's tool line, token by token against the template written out by hand: the reasoning, the tool
    call and each <|im_end|> after the assistant header are trained; the tools prompt, the user turn and the
    <tool_response> turn are not."""
    data = one_row(tok, tmp_path, MINIMIND_TOOL_LINE)
    ids, labels = expected_row(tok, [
        (tools_prompt("你是一个乐于助人的助手。"), False),
        ("<|im_start|>user\n北京今天天气怎么样？<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("<think>\n用户想知道北京的天气，我需要调用工具。\n</think>\n\n<tool_call>\n"
         '{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>', True),
        ("\n", False),
        ('<|im_start|>user\n<tool_response>\n{"city": "北京", "weather": "晴", "temperature": "25°C"}\n'
         "</tool_response><|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("北京今天晴，气温25°C。<|im_end|>", True), ("\n", False)])
    assert data[0]["input_ids"].tolist() == ids
    assert data[0]["labels"].tolist() == labels
    assert data.unused_report is None  # every field rendered
    # Templates without {% generation %} marks (read by rendering prefixes) find the same tokens.
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(ROOT / "tokenizer"))
    plain.chat_template = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert one_row(plain, tmp_path, MINIMIND_TOOL_LINE)[0]["labels"].tolist() == labels


def test_openai_shaped_tool_calls_render_as_minimind_ones(tok, tmp_path):
    """tool_calls as [{"type": "function", "function": {..., "arguments": "<JSON text>"}}] and TRL's line-level
    "tools" column: the same tokens as MiniMind's JSON-text fields."""
    messages = [dict(m) for m in MINIMIND_TOOL_LINE["conversations"]]
    del messages[0]["tools"]
    messages[2]["tool_calls"] = [{"type": "function", "function": {"name": "get_weather",
                                                                   "arguments": '{"city": "北京"}'}}]
    trl = one_row(tok, tmp_path, {"messages": messages, "tools": [WEATHER_TOOL]}, name="trl.jsonl")
    minimind = one_row(tok, tmp_path, MINIMIND_TOOL_LINE)
    assert trl[0]["input_ids"].tolist() == minimind[0]["input_ids"].tolist()
    assert trl[0]["labels"].tolist() == minimind[0]["labels"].tolist()


def test_reasoning_content_is_rendered_and_trained(tok, tmp_path):
    line = {"conversations": [{"role": "user", "content": "1加1等于几？"},
                              {"role": "assistant", "content": "1加1等于2。", "reasoning_content": "\n1 + 1 = 2\n"}]}
    ids, labels = expected_row(tok, [("<|im_start|>user\n1加1等于几？<|im_end|>\n<|im_start|>assistant\n", False),
                                     ("<think>\n1 + 1 = 2\n</think>\n\n1加1等于2。<|im_end|>", True), ("\n", False)])
    data = one_row(tok, tmp_path, line)
    assert data[0]["input_ids"].tolist() == ids and data[0]["labels"].tolist() == labels
    plain = {"conversations": [line["conversations"][0], {"role": "assistant", "content": "1加1等于2。"}]}
    assert data.n_trained_tokens > one_row(tok, tmp_path, plain, name="plain.jsonl").n_trained_tokens


def test_trl_messages_are_the_same_conversation(tok, tmp_path):
    chat = one_row(tok, tmp_path, {"conversations": CONVERSATION})
    trl = one_row(tok, tmp_path, {"messages": CONVERSATION}, name="trl.jsonl")
    assert trl.formats["chat"] == 1
    assert trl[0]["input_ids"].tolist() == chat[0]["input_ids"].tolist()
    assert trl[0]["labels"].tolist() == chat[0]["labels"].tolist()


def test_prompt_completion_trains_the_completion_only(tok, tmp_path):
    """TRL's completion_only_loss: with a conversational prompt that has earlier replies, only the completion's
    reply (and its <|im_end|>) is trained, token by token; strings are a user turn and an assistant reply."""
    line = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    data = one_row(tok, tmp_path, line)
    segments = [(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False) for m in CONVERSATION[:4]]
    ids, labels = expected_row(tok, segments + [("<|im_start|>assistant\n", False),
                                                ("19 + 3 = 22.<|im_end|>", True), ("\n", False)])
    assert data.formats["prompt-completion"] == 1
    assert data[0]["input_ids"].tolist() == ids and data[0]["labels"].tolist() == labels
    strings = one_row(tok, tmp_path, {"prompt": "把'你好世界'翻译成英文", "completion": "Hello World"}, name="s.jsonl")
    as_chat = one_row(tok, tmp_path, {"conversations": [{"role": "user", "content": "把'你好世界'翻译成英文"},
                                                        {"role": "assistant", "content": "Hello World"}]},
                      name="c.jsonl")
    assert strings[0]["labels"].tolist() == as_chat[0]["labels"].tolist()


def test_text_lines_train_every_token(tok, tmp_path):
    """TRL's language-modelling lines in SFT: the document and the <|endoftext|> after it, every token."""
    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    data = one_row(tok, tmp_path, {"text": text})
    tokens = tok.encode(text) + [tok.eos_token_id]
    assert data.formats["text"] == 1
    assert data[0]["input_ids"].tolist() == tokens[:-1] and data[0]["labels"].tolist() == tokens[1:]
    assert f"{len(tokens) - 1} trained (assistant, and every token of the text lines)" in data.summary()
    # A base model's tokenizer without a chat template trains on text lines; a conversation needs the template.
    from transformers import AutoTokenizer
    tok.save_pretrained(tmp_path / "base_tok")
    plain = AutoTokenizer.from_pretrained(tmp_path / "base_tok")
    plain.chat_template = None
    assert one_row(plain, tmp_path, {"text": text})[0]["labels"].tolist() == tokens[1:]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"text": text}, {"conversations": CONVERSATION[1:3]}])
    with pytest.raises(DataError, match=r"chats.jsonl line 2: a conversation, and the tokenizer .* has no "
                                        r"chat_template to render it"):
        SFTDataset(chats, plain, 512)


def test_unused_fields_are_reported_once_per_file(tok, tmp_path):
    lines = [{"id": 1, "conversations": [{"role": "user", "content": "你好", "name": "小明"},
                                        {"role": "assistant", "content": "你好！"}]},
             {"id": 2, "source": "sft_t2t", "messages": [{"role": "user", "content": "再见"},
                                                         {"role": "assistant", "content": "再见！"}]}]
    path = write_jsonl(tmp_path / "extra.jsonl", lines)
    data = SFTDataset(path, tok, 64)
    assert len(data) == 2
    assert data.unused_report == (f"{path}: not used, so ignored: field 'id' (2 lines, first line 1), field 'source' "
                                  f"(1 line, first line 2), message field 'name' (1 line, first line 1); message "
                                  f"fields: the chat template of {tok.name_or_path} renders the same without them")


def test_an_older_template_refuses_tool_calls_and_reports_reasoning(tmp_path):
    """Exports from before tool calling keep their template: a tool call would train as an empty reply there, so
    it is refused; a reasoning it leaves out is reported, and the reply still trains."""
    from transformers import AutoTokenizer

    older = AutoTokenizer.from_pretrained(str(ROOT / "tokenizer"))
    older.chat_template = OLDER_TEMPLATE
    path = write_jsonl(tmp_path / "tools.jsonl", [MINIMIND_TOOL_LINE])
    with pytest.raises(DataError, match=r"tools.jsonl line 1: the chat template .* does not render '(tools|tool_calls)'"
                                        r".*--tokenizer_path tokenizer"):
        SFTDataset(path, older, 1024)
    line = {"conversations": [{"role": "user", "content": "1加1等于几？"},
                              {"role": "assistant", "content": "1加1等于2。", "reasoning_content": "1 + 1 = 2"}]}
    data = SFTDataset(write_jsonl(tmp_path / "think.jsonl", [line]), older, 1024)
    assert "message field 'reasoning_content' (1 line, first line 1)" in data.unused_report
    assert tok_decode_trained(older, data) == "1加1等于2。<|im_end|>"


def tok_decode_trained(tok, data: SFTDataset) -> str:
    return tok.decode([t for t in data[0]["labels"].tolist() if t != IGNORE_INDEX])


def test_several_files_are_read_in_the_stated_order(tok, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    first = [{"conversations": [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"答{i}"}]}
             for i in range(2)]
    write_jsonl(folder / "b.jsonl", first[1:])
    write_jsonl(folder / "a.jsonl", first[:1])
    (folder / "notes.txt").write_text("not read: not .jsonl")
    for spec in (folder, f"{folder}/*.jsonl", f"{folder / 'a.jsonl'},{folder / 'b.jsonl'}"):
        data = SFTDataset(spec, tok, 64)
        assert [tok_decode_trained(tok, data.subset([i])) for i in range(2)] == ["答0<|im_end|>", "答1<|im_end|>"]
        assert data.summary().startswith(f"2 files ({folder / 'a.jsonl'}, {folder / 'b.jsonl'}): 2 conversations")
    backwards = SFTDataset(f"{folder / 'b.jsonl'},{folder / 'a.jsonl'}", tok, 64)
    assert tok_decode_trained(tok, backwards) == "答1<|im_end|>"
    with pytest.raises(DataError, match="no file matches"):
        SFTDataset(f"{folder}/*.json", tok, 64)


def test_sft_trains_on_a_mix_of_minimind_and_trl_lines(base_model, tmp_path, capsys):
    rows = [MINIMIND_TOOL_LINE, {"messages": CONVERSATION}, {"prompt": "你好", "completion": "你好！有什么可以帮你？"},
            {"text": "床前明月光，疑是地上霜。"}, {"instruction": "把'猫'翻译成英文", "output": "cat"}] * 4
    files = {"train": write_jsonl(tmp_path / "mix.jsonl", rows), "val": write_jsonl(tmp_path / "val.jsonl", rows[:5])}
    train.main(sft_args(files, base_model, tmp_path / "out", "--max_steps", "2"))
    err = capsys.readouterr().err
    assert "20 conversations (8 chat, 4 prompt-completion, 4 text, 4 alpaca)" in err
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def older_export(base_model, folder):
    """A model folder as exported before tool calling: a tokenizer without the tool tokens, the older template."""
    import shutil

    shutil.copytree(base_model, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # where transformers saves a template, when it does
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": OLDER_TEMPLATE}))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if "tool" not in t["content"]]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def test_an_older_export_still_loads_and_fine_tunes(base_model, sft_files, tmp_path):
    import eval_model

    older = older_export(base_model, tmp_path / "older")
    loaded = eval_model.model_tokenizer(older, eval_model.load_model(older))
    assert "<tool_call>" not in loaded.get_vocab() and loaded.chat_template == OLDER_TEMPLATE
    train.main(sft_args(sft_files, older, tmp_path / "out", "--max_steps", "1"))
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    files = {**sft_files, "train": write_jsonl(tmp_path / "tools.jsonl", [MINIMIND_TOOL_LINE])}
    with pytest.raises(DataError, match="does not render '(tools|tool_calls)'"):
        train.main(sft_args(files, older, tmp_path / "tools", "--max_steps", "1"))
