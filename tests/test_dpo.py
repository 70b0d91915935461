"""DPO: preference pairs (MiniMind and TRL formats), the loss against its published formulas, log-probs summed
over the final reply only, the reference model (live or precomputed), and --mode dpo end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import CONVERSATION, ROOT, read_metrics, train_losses, write_jsonl, write_parquet
from data import IGNORE_INDEX, DataError, DPODataset, pair_collate
from trainer.objectives import DPOObjective, dpo_loss, sequence_logps

LN2 = math.log(2)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def dpo_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dpo")
    rows = (ROOT / "dataset" / "dpo.jsonl").read_text().splitlines()
    val = (ROOT / "dataset" / "dpo_val.jsonl").read_text().splitlines()[:16]
    # without the long <think> pairs: the tiny model's 64 tokens cut some of them before chosen and rejected differ
    rows = [r for r in rows if "<think>" not in r]
    return {"train": write_jsonl(folder / "train.jsonl", rows[:64]), "val": write_jsonl(folder / "val.jsonl", val)}


def dpo_args(files: dict[str, Path], base: Path, out: Path, *extra: str) -> list[str]:
    return ["--mode", "dpo", "--init_from", str(base), "--data_path", str(files["train"]),
            "--val_data_path", str(files["val"]), "--out_dir", str(out), "--batch_size", "8", "--log_interval", "1",
            "--warmup_iters", "0", "--device", "cpu", "--dtype", "float32", "--eval_interval", "0", *extra]


# ----------------------------------------------------------------------------- the loss


PC, PR, RC, RR = (torch.tensor(v) for v in ([-5.0, -9.0, -3.0], [-7.0, -4.0, -3.0], [-6.0, -8.0, -2.5],
                                             [-6.5, -5.0, -4.0]))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.3)])
def test_sigmoid_loss_is_the_dpo_formula(beta, ls):
    """Rafailov et al. eq. 7, and cDPO's label smoothing: -(1-ls) log s(b h) - ls log s(-b h)."""
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta, ls, "sigmoid")
    for i in range(3):
        h = (PC[i].item() - RC[i].item()) - (PR[i].item() - RR[i].item())
        expected = -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (PC[i].item() - RC[i].item()))
        assert rejected[i].item() == pytest.approx(beta * (PR[i].item() - RR[i].item()))
    # hand-computed numbers for the first pair: h = (-5 + 6) - (-7 + 6.5) = 1.5
    assert dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], 0.1)[0].item() == pytest.approx(math.log1p(math.exp(-0.15)))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_is_the_squared_distance_to_one_over_two_beta(beta):
    """Azar et al.: (h - 1/(2 beta))^2 with h the unscaled log-ratio difference."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, 0.0, "ipo")
    h = (PC - RC) - (PR - RR)
    assert torch.allclose(losses, (h - 1 / (2 * beta)) ** 2)
    assert losses[0].item() == pytest.approx((1.5 - 1 / (2 * beta)) ** 2)


def test_equal_policy_and_reference_give_ln2():
    losses, chosen, rejected = dpo_loss(PC, PR, PC, PR, 0.1)
    assert torch.allclose(losses, torch.full((3,), LN2)) and not chosen.any() and not rejected.any()


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        DPOObjective(None, 0.1, loss_type="hinge")


# ----------------------------------------------------------------------------- data


def test_both_formats_render_the_same_tokens(tok, tmp_path):
    chosen, rejected = assistant("19 + 3 = 22."), assistant("19 + 3 = 23.")
    prompt = CONVERSATION[:-1]
    rows = [{"chosen": prompt + [chosen], "rejected": prompt + [rejected]},          # MiniMind
            {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]},           # TRL conversational
            {"prompt": prompt, "chosen": chosen["content"], "rejected": rejected["content"]}]  # TRL, string sides
    data = DPODataset(write_jsonl(tmp_path / "mixed.jsonl", rows), tok, 512)
    assert data.formats == {"minimind": 1, "trl": 2}
    for i in (1, 2):
        assert all(torch.equal(data[0][k], data[i][k]) for k in data[0])
    # A string prompt is one user message.
    simple = DPODataset(write_jsonl(tmp_path / "s.jsonl", [
        {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]), tok, 512)
    assert all(torch.equal(simple[0][k], simple[1][k]) for k in simple[0])


def test_a_parquet_file_reads_as_its_jsonl(tok, tmp_path):
    """TRL's preference datasets come as .parquet files: the same pairs as from .jsonl."""
    prompt = CONVERSATION[:-1]
    rows = [{"prompt": prompt, "chosen": [assistant(f"19 + 3 = {22 + i}.")], "rejected": [assistant("No.")]}
            for i in range(5)]
    jsonl = DPODataset(write_jsonl(tmp_path / "p.jsonl", rows), tok, 512)
    parquet = DPODataset(write_parquet(tmp_path / "p.parquet", rows), tok, 512)
    assert len(jsonl) == len(parquet) == 5
    for i in range(5):
        assert all(torch.equal(jsonl[i][k], parquet[i][k]) for k in jsonl[i])


def test_labels_are_the_final_reply_only(tok, tmp_path):
    """Earlier assistant turns of a multi-turn prompt are context, not trained; the reply + <|im_end|> is."""
    row = {"chosen": CONVERSATION, "rejected": CONVERSATION[:-1] + [assistant("19 + 3 = 23.")]}
    data = DPODataset(write_jsonl(tmp_path / "one.jsonl", [row]), tok, 512)
    ex = data[0]
    for side, text in (("chosen", "19 + 3 = 22.<|im_end|>"), ("rejected", "19 + 3 = 23.<|im_end|>")):
        labels = ex[f"{side}_labels"].tolist()
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == text
        reply = tok.encode(text)
        kept = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert kept == list(range(kept[0], kept[0] + len(reply)))  # one contiguous run
        assert ex[f"{side}_input_ids"][kept[0] + 1:].tolist()[:len(reply) - 1] == reply[:-1]  # pre-shifted
    assert data.lengths.tolist() == [max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))]


def test_truncation_is_counted(tok, tmp_path, dpo_files):
    data = DPODataset(dpo_files["train"], tok, 24)
    assert data.n_truncated > 0 and max(data.lengths) <= 24 and "truncated at max_seq_len 24" in data.summary()
    assert data.n_truncated_identical > 0 and "cut before the sides differ" in data.summary()
    for i in range(len(data)):  # such a pair's sides are the same tokens
        ex = data[i]
        same = torch.equal(ex["chosen_input_ids"], ex["rejected_input_ids"])
        assert not same or len(ex["chosen_input_ids"]) == 24


def test_pair_collate_stacks_chosen_then_rejected(tok, dpo_files):
    data = DPODataset(dpo_files["train"], tok, 512)
    items = [data[i] for i in range(3)]
    batch = pair_collate(0)(items)
    T = max(max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) for ex in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (6, T)
    for j, ex in enumerate(items):
        for row, side in ((j, "chosen"), (3 + j, "rejected")):
            n = len(ex[f"{side}_input_ids"])
            assert batch["input_ids"][row, :n].tolist() == ex[f"{side}_input_ids"].tolist()
            assert batch["labels"][row, :n].tolist() == ex[f"{side}_labels"].tolist()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and batch["attention_mask"][row].sum() == n
    assert "ref_logps" not in batch


BAD = [
    json.dumps({"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("No.")]}),
    json.dumps({"chosen": [user("Hi"), assistant("Hello!")]}),                                   # 2: no rejected
    json.dumps({"chosen": "Hello!", "rejected": "No."}),                                          # 3: no shared prompt
    json.dumps({"chosen": [user("Hi")], "rejected": [user("Hi")]}),                               # 4: no assistant
    json.dumps({"chosen": [user("Hi"), assistant("a"), user("b")], "rejected": [user("Hi"), assistant("c")]}),  # 5
    json.dumps({"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Yo"), assistant("No.")]}),  # 6
    "{not json",                                                                                  # 7
    json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}),                                    # 8
    json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "No."}),
]


@pytest.mark.parametrize("line,message", [
    (2, "line 2: the pair has no 'rejected' side"),
    (3, "line 3: 'chosen' and 'rejected' are plain strings that share no beginning, so there is no prompt"),
    (4, "line 4: 'chosen': the conversation has no assistant message"),
    (5, "line 5: the 'chosen' conversation does not end with an assistant reply"),
    (6, "line 6: 'chosen' and 'rejected' differ before their final assistant reply"),
    (7, "line 7: malformed JSON"),
    (8, "line 8: 'prompt' must be a string or a non-empty list"),
])
def test_bad_lines_name_the_file_and_line(tok, tmp_path, line, message):
    rows = [BAD[0]] * (line - 1) + [BAD[line - 1]]
    with pytest.raises(DataError, match=f"bad.jsonl {message}"):
        DPODataset(write_jsonl(tmp_path / "bad.jsonl", rows), tok, 64)


def test_trl_implicit_prompt_strings_are_the_explicit_pair(tok, tmp_path):
    """TRL's {"chosen": str, "rejected": str} without a prompt: the shared beginning is the prompt, as TRL
    extracts it, and the pair trains exactly as the same pair written with "prompt"."""
    rows = [{"chosen": "问：天空是什么颜色？答：蓝色。", "rejected": "问：天空是什么颜色？答：绿色。"},
            {"prompt": "问：天空是什么颜色？答：", "chosen": "蓝色。", "rejected": "绿色。"}]
    data = DPODataset(write_jsonl(tmp_path / "implicit.jsonl", rows), tok, 512)
    assert data.formats == {"minimind": 0, "trl": 2}
    assert all(torch.equal(data[0][k], data[1][k]) for k in data[0])
    assert tok.decode([t for t in data[0]["chosen_labels"].tolist() if t != IGNORE_INDEX]) == "蓝色。<|im_end|>"


def test_sides_that_repeat_the_prompt_are_not_given_it_twice(tok, tmp_path):
    """hh-rlhf in TRL's layout: a "prompt" and sides that are whole conversations, the prompt's turn included. The
    prompt is read once, as in MiniMind's layout of the same pair, not prepended a second time."""
    rows = [{"prompt": "What is 0+1?", "chosen": [user("What is 0+1?"), assistant("1")],
             "rejected": [user("What is 0+1?"), assistant("I don't know")]},
            {"chosen": [user("What is 0+1?"), assistant("1")], "rejected": [user("What is 0+1?"),
                                                                            assistant("I don't know")]},
            {"prompt": [user("What is 0+1?")], "chosen": [assistant("1")], "rejected": [assistant("I don't know")]}]
    data = DPODataset(write_jsonl(tmp_path / "hh.jsonl", rows), tok, 512)
    assert data.formats == {"minimind": 1, "trl": 2}
    for i in (1, 2):
        assert all(torch.equal(data[0][k], data[i][k]) for k in data[0])
    assert tok.decode(data[0]["chosen_input_ids"].tolist()).count("What is 0+1?") == 1


@pytest.mark.parametrize("chosen, rejected, split", [
    ("12 + 7 = 19.", "12 + 7 = 18.", ("12 + 7 =", "19.", "18.")),             # not into the number
    ("The capital is Paris.", "The capital is Rome.", ("The capital is", "Paris.", "Rome.")),
    ("Human: hi\n\nAssistant: Hello!", "Human: hi\n\nAssistant: Go away.", ("Human: hi\n\nAssistant:", "Hello!",
                                                                          "Go away.")),
    ("天空是蓝色的。", "天空是绿色的。", ("天空是", "蓝色的。", "绿色的。")),
])
def test_implicit_prompt_is_cut_at_a_word_start(chosen, rejected, split):
    from data import implicit_prompt

    assert implicit_prompt(chosen, rejected) == split


def test_unpaired_kto_lines_are_refused_with_what_to_do(tok, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "你好", "completion": "你好！有什么可以帮你？", "label": True}])
    with pytest.raises(DataError, match=r"kto.jsonl line 1: an unpaired preference line \(prompt, completion, label: "
                                        r"KTO's format\).*\{\"prompt\", \"chosen\", \"rejected\"\}.*--mode sft"):
        DPODataset(path, tok, 64)


def test_a_pair_with_the_same_reply_on_both_sides_is_a_bad_record(tok, tmp_path):
    """chosen == rejected gives loss ln 2 and no gradient whatever the model: a data mistake, not a pair."""
    same = [json.dumps({"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Hello!")]}),
            json.dumps({"prompt": "Hi", "chosen": "Yes.", "rejected": "Yes."})]
    path = write_jsonl(tmp_path / "same.jsonl", [BAD[0], *same])
    with pytest.raises(DataError, match="same.jsonl line 2: 'chosen' and 'rejected' are the same reply"):
        DPODataset(path, tok, 64)
    data = DPODataset(path, tok, 64, skip_bad_records=True)
    assert len(data) == 1 and data.bad_skipped == {"identical sides": 2}


def test_skip_bad_records_skips_and_counts(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", BAD)
    with pytest.raises(DataError, match="mixed.jsonl line 2"):
        DPODataset(path, tok, 64)
    data = DPODataset(path, tok, 64, skip_bad_records=True)
    assert len(data) == 2 and data.formats == {"minimind": 1, "trl": 1}
    assert sum(data.bad_skipped.values()) == 7 and data.bad_report.startswith(f"{path}: skipped 7 bad records")
    with pytest.raises(DataError, match="all 2 records are bad"):
        DPODataset(write_jsonl(tmp_path / "allbad.jsonl", BAD[1:3]), tok, 64, skip_bad_records=True)


# ----------------------------------------------------------------------------- log-probs


def test_logps_are_sums_over_the_reply_tokens_and_padding_changes_nothing(tok, tmp_path, base_model):
    from model import Transformer

    model = Transformer.from_pretrained(base_model).eval()
    data = DPODataset(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "No."},
        {"prompt": "Reverse the word 'crown' and tell me about the weather in some detail please.",
         "chosen": "'crown' reversed is 'nworc'.", "rejected": "Go away, I do not want to talk to you now."}]), tok, 64)
    collate = pair_collate(0)
    with torch.no_grad():
        alone = sequence_logps(model, collate([data[0]]))[0]
        batch = collate([data[0], data[1]])
        assert batch["input_ids"].shape[1] > len(data[0]["chosen_input_ids"])  # pair 0 is padded here
        padded = sequence_logps(model, batch)[0]
        assert torch.allclose(alone, padded[[0, 2]], atol=1e-5)
        # by hand: the sum of log_softmax at the labelled (reply) positions only
        ex = data[0]
        logp = torch.log_softmax(model(ex["chosen_input_ids"][None]).logits[0].float(), -1)
        keep = ex["chosen_labels"] != IGNORE_INDEX
        by_hand = logp[keep].gather(-1, ex["chosen_labels"][keep][:, None]).sum()
        assert alone[0].item() == pytest.approx(by_hand.item(), abs=1e-4)
        assert keep.sum() == len(tok.encode("Hello!<|im_end|>"))


def test_objective_policy_equal_to_reference_gives_ln2_and_precomputed_matches(tok, dpo_files, base_model):
    from model import Transformer

    policy, ref = Transformer.from_pretrained(base_model), Transformer.from_pretrained(base_model)
    data = DPODataset(dpo_files["train"], tok, 64)
    collate = pair_collate(0)
    batch = collate([data[i] for i in range(4)])
    objective = DPOObjective(ref, 0.1)
    loss, metrics = objective(policy, batch)
    assert objective.num_items(batch) == 4 and loss.item() == pytest.approx(4 * LN2, rel=1e-5)
    assert set(metrics) == set(DPOObjective.eval_metrics) and metrics["rewards/accuracy"] == 0
    with torch.no_grad():
        logps = sequence_logps(ref, collate([data[i] for i in range(len(data))]))[0]
    data.set_ref_logps(torch.stack([logps[:len(data)], logps[len(data):]], 1))
    pre = collate([data[i] for i in range(4)])
    assert torch.allclose(pre["ref_logps"], torch.cat([logps[:4], logps[len(data):len(data) + 4]]))
    with torch.no_grad():  # perturb the policy: the precomputed and the live reference agree on the loss
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    live, _ = objective(policy, batch)
    precomputed, _ = DPOObjective(None, 0.1)(policy, pre)
    assert precomputed.item() == pytest.approx(live.item(), rel=1e-4) and live.item() != pytest.approx(4 * LN2)


# ----------------------------------------------------------------------------- --mode dpo


def test_dpo_run_learns_the_preferences(dpo_files, base_model, tmp_path, capsys):
    out = tmp_path / "dpo"
    result = train.main(dpo_args(dpo_files, base_model, out, "--max_steps", "24", "--learning_rate", "3e-3",
                                 "--eval_interval", "12", "--dpo_beta", "0.5"))
    err = capsys.readouterr().err
    assert "64 preference pairs (64 minimind)" in err
    records = read_metrics(out)
    losses = train_losses(out)
    assert losses[1] == pytest.approx(LN2, abs=1e-4)  # policy == reference at the start
    assert sum(losses[s] for s in range(20, 25)) / 5 < 0.6 * LN2
    train_acc = [r["rewards/accuracy"] for r in records if "rewards/accuracy" in r]
    assert train_acc[0] == 0 and sum(train_acc[-5:]) / 5 > 0.8
    vals = [r for r in records if "val_loss" in r]
    assert len(vals) == 2 and {"val_rewards/accuracy", "val_rewards/margin", "val_rewards/chosen",
                               "val_rewards/rejected"} <= set(vals[0])
    assert vals[1]["val_rewards/margin"] > 0 and result["val_loss"] == vals[1]["val_loss"]
    assert json.loads((out / "final" / "zero2llm.json").read_text())["chat"] is True


def test_precomputed_reference_gives_the_same_losses(dpo_files, base_model, tmp_path):
    args = ("--max_steps", "3", "--learning_rate", "3e-3", "--no-save_last", "--save_interval_steps", "0")
    train.main(dpo_args(dpo_files, base_model, tmp_path / "live", *args))
    train.main(dpo_args(dpo_files, base_model, tmp_path / "pre", *args, "--precompute_ref_logps"))
    live, pre = train_losses(tmp_path / "live"), train_losses(tmp_path / "pre")
    assert live[1] == pytest.approx(LN2, abs=1e-5) and pre[1] == pytest.approx(LN2, abs=1e-5)
    for s in (1, 2, 3):
        assert pre[s] == pytest.approx(live[s], rel=1e-3)
    assert live[3] < live[1]
    # without validation data there is nothing to score for it (this used to stop on an empty torch.cat)
    train.main(dpo_args(dpo_files, base_model, tmp_path / "no_val", *args, "--precompute_ref_logps",
                        "--val_data_path", "", "--val_fraction", "0"))
    assert train_losses(tmp_path / "no_val") == pre


def test_torchrun_two_processes_match_one(dpo_files, base_model, tmp_path):
    """2 CPU processes (gloo) x 4 pairs give the losses and validation of 1 process x 8 pairs: the same pairs per
    step (the length grouping counts both ranks' rows), each rank with its own live reference."""
    common = ("--max_steps", "3", "--learning_rate", "3e-3", "--no-save_last", "--save_interval_steps", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(dpo_args(dpo_files, base_model, one, *common, "--batch_size", "8"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *dpo_args(dpo_files, base_model, two, *common, "--batch_size", "4")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert a[1] == pytest.approx(LN2, abs=1e-5) and a[3] < a[1]
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    vals = [[r for r in read_metrics(run) if "val_loss" in r][-1] for run in (one, two)]
    for key in ("val_loss", "val_rewards/accuracy", "val_rewards/margin"):
        assert vals[1][key] == pytest.approx(vals[0][key], rel=1e-4), key
    # The logged training metrics are every rank's, not rank 0's alone: the mean over both halves of a step's pairs.
    logged = [{r["step"]: r for r in read_metrics(run) if "rewards/margin" in r} for run in (one, two)]
    for step in (2, 3):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            assert logged[1][step][key] == pytest.approx(logged[0][step][key], rel=1e-4, abs=1e-7), (step, key)


def test_skip_bad_records_in_a_run(dpo_files, base_model, tmp_path, capsys):
    rows = dpo_files["train"].read_text().splitlines()[:16] + BAD[1:3]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "val": dpo_files["val"]}
    with pytest.raises(DataError, match=r"train.jsonl line 17: the pair has no 'rejected' side"):
        train.main(dpo_args(files, base_model, tmp_path / "strict", "--max_steps", "1"))
    capsys.readouterr()
    train.main(dpo_args(files, base_model, tmp_path / "skip", "--max_steps", "1", "--no-save_last",
                        "--skip_bad_records"))
    assert f"{files['train']}: skipped 2 bad records" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--dpo_beta", "0"], "--dpo_beta 0: must be > 0"),
    (["--dpo_label_smoothing", "0.5"], "--dpo_label_smoothing 0.5: must be in [0, 0.5)"),
    (["--dpo_loss", "ipo", "--dpo_label_smoothing", "0.1"], "--dpo_label_smoothing is for --dpo_loss sigmoid"),
    (["--dpo_loss", "hinge"], "invalid choice: 'hinge'"),
    (["--ref_model_path", "/nonexistent"], "--ref_model_path /nonexistent: no model there"),
])
def test_dpo_flag_errors(dpo_files, base_model, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train.main(dpo_args(dpo_files, base_model, tmp_path / "x", *flags))
    assert message in capsys.readouterr().err


def test_default_init_from_says_to_run_sft_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train.parse_config(["--mode", "dpo", "--data_path", str(ROOT / "dataset" / "dpo.jsonl"),
                            "--val_data_path", str(ROOT / "dataset" / "dpo_val.jsonl")])
    assert "python train.py --mode sft" in capsys.readouterr().err


def test_a_reference_of_another_architecture_is_a_usage_error(dpo_files, base_model, tmp_path, tok):
    from model import Transformer
    from model.config import config_from_preset
    from trainer.errors import UsageError

    other = tmp_path / "other"
    Transformer(config_from_preset("tiny", vocab_size=len(tok), max_seq_len=64, n_layers=1)).save_pretrained(other)
    with pytest.raises(UsageError, match="--ref_model_path .*other: its architecture differs"):
        train.main(dpo_args(dpo_files, base_model, tmp_path / "x", "--ref_model_path", str(other), "--max_steps", "1"))
