"""SFT: chat/Alpaca data, assistant-only labels token by token, truncation, length-grouped batches, --mode sft."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from conftest import CONVERSATION, ROOT, check_resume_is_exact, read_metrics, sft_args, train_losses, write_jsonl
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
    assert alpaca.formats == {"chat": 0, "alpaca": 2} and chat.formats == {"chat": 2, "alpaca": 0}
    for i in range(2):
        assert alpaca[i]["input_ids"].tolist() == chat[i]["input_ids"].tolist()
        assert alpaca[i]["labels"].tolist() == chat[i]["labels"].tolist()
    # Both formats in one file, detected line by line (the shipped Alpaca sample too).
    mixed = SFTDataset(write_jsonl(tmp_path / "m.jsonl", rows + chats), tok, 512)
    assert mixed.formats == {"chat": 2, "alpaca": 2}
    assert len(SFTDataset(ROOT / "dataset" / "sft_alpaca.jsonl", tok, 512)) == 51


def test_long_conversations_are_truncated_and_counted_never_dropped(tok, tmp_path, sft_files):
    data = SFTDataset(sft_files["train"], tok, max_seq_len=24)
    n_lines = len(sft_files["train"].read_text().splitlines())
    assert len(data) == n_lines
    full = SFTDataset(sft_files["train"], tok, max_seq_len=512)
    assert data.n_truncated == int((full.lengths > 24).sum()) > 0
    assert int(data.lengths.max()) == 24
    assert f"{data.n_truncated} truncated at max_seq_len 24" in data.summary()
    # A conversation cut before its first reply keeps no label; it is counted as such.
    long_prompt = {"conversations": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    cut = SFTDataset(write_jsonl(tmp_path / "long.jsonl", [long_prompt]), tok, max_seq_len=16)
    assert cut.n_truncated == cut.n_truncated_untrained == 1
    assert (cut[0]["labels"] == IGNORE_INDEX).all()


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "pretraining data"}', "expected {\"conversations\""),
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


def test_sft_run_loss_falls_and_exports_a_chat_model(sft_files, base_model, tmp_path, capsys):
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


def test_default_init_from_says_to_run_the_previous_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/pretrain/final here
    with pytest.raises(SystemExit):
        train.main(["--mode", "sft", "--data_path", str(ROOT / "dataset" / "sft.jsonl"),
                    "--val_data_path", str(ROOT / "dataset" / "sft_val.jsonl")])
    assert "run the previous stage first (python train.py --mode pretrain)" in capsys.readouterr().err


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
    assert len(ds) == 2 and ds.formats == {"chat": 1, "alpaca": 1}
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
