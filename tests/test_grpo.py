"""GRPO: the losses against their published formulas, group advantages, reward functions, prompt data, rollouts
(chat template, stop at <|im_end|>), and --mode grpo end to end: metrics, exact resume mid-group, torchrun."""
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
from conftest import ROOT, check_resume_is_exact, read_metrics, write_jsonl
from data import DataError, GRPODataset, prompt_collate, stop_token_ids
from model import Transformer
from trainer.errors import UsageError
from trainer.objectives import IGNORE_INDEX, token_logps
from trainer.grpo import GRPOObjective, group_advantages, per_token_loss, reduce_loss, take_groups
from trainer.rewards import (accuracy_reward, format_reward, is_correct, length_penalty, load_reward_funcs,
                             parse_weights)


# ----------------------------------------------------------------------------- the loss on fixed tensors

# 4 completions of up to 3 tokens: per-token log-probs now, at sampling time (old) and under the reference.
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5], [-0.7, -0.2, -1.1], [-2.0, -0.4, -0.9]])
OLD = torch.tensor([[-1.3, -1.8, -0.5], [-0.1, -1.5, -2.0], [-0.9, -0.25, -1.0], [-1.5, -0.6, -0.9]])
REF = torch.tensor([[-1.1, -2.2, -0.4], [-0.5, -1.4, -2.5], [-0.6, -0.3, -1.3], [-1.8, -0.5, -1.0]])
ADV = torch.tensor([1.5, -0.8, 0.4, -1.2])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
MAX_LEN = 5


def published_loss(loss_type: str, eps: float, eps_high: float, beta: float) -> float:
    """The objectives as written in their papers, token by token in plain Python.

    GRPO (Shao et al. 2024, eq. 3): -1/G sum_i 1/|o_i| sum_t [min(r A, clip(r, 1-e, 1+e) A) - beta KL]
    Dr. GRPO (Liu et al. 2025): the same token terms, summed and divided by G x max completion length
    DAPO (Yu et al. 2025, eq. 8): summed and divided by the total number of completion tokens; clip-higher
    CISPO (MiniMax-M1, eq. 4): -sg(min(r, 1+e_high)) A log pi, token-level like DAPO
    KL: the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1.
    """
    total, per_seq = 0.0, []
    for i in range(4):
        seq = 0.0
        for t in range(3):
            if not MASK[i, t]:
                continue
            lp, old, ref, a = LOGP[i, t].item(), OLD[i, t].item(), REF[i, t].item(), ADV[i].item()
            r = math.exp(lp - old)
            if loss_type == "cispo":
                term = -min(r, 1 + eps_high) * a * lp
            else:
                term = -min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
            term += beta * (math.exp(ref - lp) - (ref - lp) - 1)
            seq += term
        per_seq.append(seq / int(MASK[i].sum()))
        total += seq
    if loss_type == "grpo":
        return sum(per_seq) / 4
    if loss_type == "dr_grpo":
        return total / (4 * MAX_LEN)
    return total / int(MASK.sum())


def objective(tok, loss_type: str, **kw) -> GRPOObjective:
    settings = dict(stop_ids=stop_token_ids(tok), num_generations=2, max_completion_length=MAX_LEN, temperature=1.0,
                    beta=0.0, epsilon=0.2, epsilon_high=0.2, num_iterations=2, loss_type=loss_type, scale_rewards=True)
    return GRPOObjective(tok, [("accuracy", accuracy_reward)], [1.0], None, **{**settings, **kw})


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("eps,eps_high,beta", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.04), (0.1, 0.5, 0.3)])
def test_loss_equals_the_published_objective(tok, loss_type, eps, eps_high, beta):
    """per_token_loss + reduce_loss, divided by num_items as the loop does, is the paper's objective, also when
    the step's completions come in two micro-batches (the loop sums both and divides by the items of both)."""
    obj = objective(tok, loss_type)
    labels = torch.where(MASK.bool(), 7, -100)

    def loss_sum(rows: slice) -> tuple[float, int]:
        loss, _, _ = per_token_loss(LOGP[rows], OLD[rows], REF[rows], ADV[rows], loss_type, eps, eps_high, beta)
        batch = {"labels": labels[rows], "advantages": ADV[rows]}
        return reduce_loss(loss, MASK[rows], loss_type, MAX_LEN).item(), obj.num_items(batch)

    expected = published_loss(loss_type, eps, eps_high, beta)
    whole, n = loss_sum(slice(0, 4))
    assert whole / n == pytest.approx(expected, rel=1e-5)
    (a, na), (b, nb) = loss_sum(slice(0, 1)), loss_sum(slice(1, 4))
    assert (a + b) / (na + nb) == pytest.approx(expected, rel=1e-5)


def test_clipped_tokens_get_no_gradient_and_cispo_only_caps_the_weight():
    """d/dlogp of the clipped objective: -r A where the clip is inactive, 0 where it is active; CISPO keeps every
    token's gradient, -min(r, 1 + e_high) A, since its ratio is a detached weight."""
    logp = LOGP.clone().requires_grad_(True)
    loss, _, clipped = per_token_loss(logp, OLD, None, ADV, "dapo", 0.2, 0.2, 0.0)
    loss.sum().backward()
    r = torch.exp(LOGP - OLD)
    expected = torch.where(clipped, torch.zeros_like(r), -r * ADV[:, None])
    assert clipped.any() and (~clipped).any()
    torch.testing.assert_close(logp.grad, expected)
    logp.grad = None
    loss, _, capped = per_token_loss(logp, OLD, None, ADV, "cispo", 0.2, 0.2, 0.0)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -torch.clamp(r, max=1.2) * ADV[:, None])
    assert torch.equal(capped, r > 1.2)


def test_on_policy_ratio_is_one_and_kl_zero_at_the_reference():
    """First iteration (old = current, detached) at the reference: the loss is -A per token, KL 0 and its
    gradient -A per token: the plain policy gradient."""
    logp = LOGP.clone().requires_grad_(True)
    loss, kl, clipped = per_token_loss(logp, logp.detach(), LOGP, ADV, "grpo", 0.2, 0.2, 0.1)
    torch.testing.assert_close(loss, -ADV[:, None].expand_as(LOGP))
    assert not kl.any() and not clipped.any()
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -ADV[:, None].expand_as(LOGP))


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_and_zero_std_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    adv, std = group_advantages(rewards, 4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert not adv[4:8].any()  # all equal: nothing to learn from this prompt
    torch.testing.assert_close(std, torch.tensor([s, 0.0, 1.5]))
    assert (std < 1e-6).float().mean().item() == pytest.approx(1 / 3)
    raw, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO
    torch.testing.assert_close(raw[8:], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_unscorable_completions_are_left_out_of_their_group():
    """NaN = no reward function applies (all returned None): not in the group's mean or std, advantage 0. A group
    with one scored completion has no std; one with none teaches nothing."""
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 0.0, nan, 2.0, nan, nan, nan, nan, nan, nan])
    adv, std = group_advantages(rewards, 4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0): the NaN is not a 0
    torch.testing.assert_close(adv[:4], torch.tensor([2 / 3, 0.0, -1 / 3, -1 / 3]) / (s + 1e-4))
    torch.testing.assert_close(std[0], torch.tensor(s))
    assert std[1:].isnan().all() and not adv[4:].any()
    raw, _ = group_advantages(rewards, 4, scale=False)
    torch.testing.assert_close(raw[:4], torch.tensor([2 / 3, 0.0, -1 / 3, -1 / 3]))


# ----------------------------------------------------------------------------- reward functions

THINK = "<think>\n21 + 19 = 40\n40 - 11 = 29\n</think>\n"


@pytest.mark.parametrize("completion,answer,correct", [
    (THINK + "21 + 19 - 11 = 29.", "29", True),
    (THINK + "21 + 19 - 11 = 28.", "29", False),        # the reasoning's 29 does not count: the reply's does
    ("12 + 7 = 19.", "19", True),
    ("12 + 7 = 19. 19 + 1 = 20.", "19", False),          # the LAST number is the answer
    ("The answer is 42. Next question?", "42", True),
    ("the answer is: -3", "-3", True),
    ("x is \\boxed{1,000} so 5 is wrong", "1000", True),
    ("\\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}", True),
    ("It costs 3.50", "3.5", True),
    ("no number here", "5", False),
    ("", "5", False),
    ("'crown' reversed is 'nworc'.", "nworc", True),
    ("'crown' reversed is 'nworcx'.", "nworc", False),
    ("Hamlet was written by William Shakespeare.", "William Shakespeare", True),
    ("Hamlet was written by John Milton.", "William Shakespeare", False),
    ("She sold 48 + 24 = 72 clips. The answer is 72.", "She sold 48/2 = 24 clips in May.\n#### 72", True),  # GSM8K
    ("48 + 24 = 72\n#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", True),
    ("48 + 24 = 72\n#### 71", "She sold 48 clips.\n#### 72", False),  # the number after the mark
])
def test_accuracy_reward(completion, answer, correct):
    assert is_correct(completion, answer) is correct
    assert accuracy_reward([completion, completion], [answer, None]) == [float(correct), None]


@pytest.mark.parametrize("completion,ok", [
    (THINK + "21 + 19 - 11 = 29.", True),
    ("<think>\nx\n</think>\n", False),                   # no answer after the reasoning
    ("21 + 19 - 11 = 29.", False),
    ("<think>\nx</think>\ny", False),
    ("<think>\nx\n</think>\ny <think>\nz\n</think>\nw", False),
])
def test_format_reward(completion, ok):
    assert format_reward([completion]) == [float(ok)]


def test_length_penalty_is_dapos_soft_overlong_punishment():
    lengths = [1, 6, 7, 8]  # max 8: free up to 6, then -1/2 per token to -1 at 8
    assert length_penalty([[0] * n for n in lengths], max_completion_length=8) == [0.0, 0.0, -0.5, -1.0]


def test_user_reward_functions_load_from_a_module_or_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kwargs):\n"
                                            "    return [-len(c) / 10 for c in completions]\nLIMIT = 3\n")
    monkeypatch.chdir(tmp_path)
    funcs = load_reward_funcs("accuracy, my_rewards:brevity")
    assert [n for n, _ in funcs] == ["accuracy", "brevity"] and funcs[1][1](completions=["abc"]) == [-0.3]
    assert load_reward_funcs(f"{tmp_path / 'my_rewards.py'}:brevity")[0][0] == "brevity"
    # A file is a module like any other while it runs (a dataclass looks its module up), under a name of its own.
    (tmp_path / "json.py").write_text("import dataclasses\n@dataclasses.dataclass\nclass Score:\n    value: float = 1.0\n"
                                      "def const(completions, **kwargs):\n    return [Score().value for _ in completions]\n")
    assert load_reward_funcs(f"{tmp_path / 'json.py'}:const")[0][1](completions=["a"]) == [1.0]
    assert sys.modules["json"] is json  # the standard module keeps its name
    for spec, message in [("acc", "unknown reward 'acc'; built in: accuracy, format, length"),
                          ("no_such_module_x:f", "cannot import module 'no_such_module_x'"),
                          ("my_rewards:nope", "my_rewards has no attribute 'nope'"),
                          ("my_rewards:LIMIT", "my_rewards.LIMIT is a int, not a function"),
                          ("missing.py:f", "no such file missing.py"),
                          ("accuracy,accuracy", "two rewards named the same")]:
        with pytest.raises(UsageError, match="^--reward_funcs") as e:
            load_reward_funcs(spec)
        assert message in str(e.value)
    assert parse_weights("", 2) == [1.0, 1.0] and parse_weights("1, 0.5", 2) == [1.0, 0.5]
    with pytest.raises(UsageError, match="2 weight"):
        parse_weights("1,2", 3)


def test_a_reward_function_that_returns_the_wrong_shape_is_named(tok):
    obj = GRPOObjective(tok, [("bad", lambda completions, **kw: [1.0])], [1.0], None, stop_ids=[2], num_generations=2,
                        max_completion_length=4, temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.2,
                        num_iterations=1, loss_type="dapo", scale_rewards=True)
    batch = {"prompts": ["p"], "prompt_messages": [[]], "columns": {"answer": ["1"]}}
    with pytest.raises(UsageError, match="reward function 'bad' must return a list of 2 floats"):
        obj.score(batch, ["a", "b"], [[1], [2]], repeat=2)


def test_reward_model_scores_with_its_first_logit(tmp_path, tok):
    """--reward_model_path: any local sequence-classification folder (here a tiny random Llama) is a reward."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from trainer.rewards import RewardModel

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(config)
    hf.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = RewardModel(str(tmp_path / "rm"), torch.device("cpu"), batch_size=1)
    messages = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
    scores = rm(prompts=["p", "p"], completions=["2 + 2 = 4.", "2 + 2 = 5."], prompt_messages=messages)
    text = tok.apply_chat_template(messages[0] + [{"role": "assistant", "content": "2 + 2 = 4."}], tokenize=False)
    with torch.no_grad():
        direct = hf.eval()(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert scores[0] == pytest.approx(direct, abs=1e-5) and scores[0] != scores[1]
    with pytest.raises(UsageError, match="--reward_model_path"):
        RewardModel(str(tmp_path), torch.device("cpu"))


TOY_CONFIG = """
from transformers import PretrainedConfig


class ToyRewardConfig(PretrainedConfig):
    model_type = "toy_reward"
"""
TOY_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_toy import ToyRewardConfig


class ToyRewardModel(PreTrainedModel):
    config_class = ToyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    @torch.no_grad()
    def get_scores(self, tokenizer, conversations):
        return [float(self.scale) * len(c[-1]["content"]) for c in conversations]
"""


def remote_code_reward_model(folder: Path, tok) -> Path:
    """A reward model folder whose model is its own code, scored through get_scores(tokenizer, conversations) as
    InternLM2-reward's is (here: scale x the reply's length in characters, scale = 2 in its weights)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "configuration_toy.py").write_text(TOY_CONFIG)
    (folder / "modeling_toy.py").write_text(TOY_MODEL)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "toy_reward", "architectures": ["ToyRewardModel"],
        "auto_map": {"AutoConfig": "configuration_toy.ToyRewardConfig", "AutoModel": "modeling_toy.ToyRewardModel"}}))
    save_file({"scale": torch.tensor([2.0])}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    return folder


def test_a_reward_model_with_its_own_code_needs_trust_remote_code(tmp_path, tok, monkeypatch):
    """Off by default: one line names the folder's code and the flag, and nothing runs; with the flag the model
    loads and scores with its own get_scores."""
    import transformers.dynamic_module_utils as dynamic

    from trainer.rewards import RewardModel

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # its code is copied there
    folder = remote_code_reward_model(tmp_path / "internlm2-like-reward", tok)
    with pytest.raises(UsageError, match=r"^--reward_model_path .*internlm2-like-reward: its model is code of its own "
                                         r"\(modeling_toy.ToyRewardModel.*pass --trust_remote_code"):
        RewardModel(str(folder), torch.device("cpu"))
    assert not (tmp_path / "modules").exists()
    rm = RewardModel(str(folder), torch.device("cpu"), batch_size=2, trust_remote_code=True)
    messages = [[{"role": "user", "content": "你好"}]] * 3
    assert rm(prompts=["p"] * 3, completions=["你好！", "你好，有什么可以帮你？", "嗨"],
              prompt_messages=messages) == [6.0, 22.0, 2.0]
    flag = train.build_parser("grpo")._option_string_actions["--trust_remote_code"]
    assert flag.default is False and "runs in this run" in flag.help


# ----------------------------------------------------------------------------- prompts


# MiniMind's RLAIF lines: the last assistant turn is where the answer goes, and there is no "answer".
RLAIF = [{"conversations": [{"role": "user", "content": "请解释一下什么是光合作用？"}, {"role": "assistant", "content": ""}]},
         {"conversations": [{"role": "system", "content": "你是一个知识丰富的AI。"},
                            {"role": "user", "content": "鲁迅是谁？"}, {"role": "assistant", "content": "无"}]},
         {"conversations": [{"role": "user", "content": "写一首关于秋天的诗。"}, {"role": "assistant", "content": "None"}]},
         {"conversations": [{"role": "user", "content": "1+1等于几？"}, {"role": "assistant", "content": None}]},
         {"conversations": [{"role": "user", "content": "你好"}]}]


def test_minimind_rlaif_lines_are_prompts(tmp_path, tok):
    data = GRPODataset(write_jsonl(tmp_path / "rlaif.jsonl", RLAIF), tok, 256, max_completion_length=64)
    assert data.messages == [line["conversations"][:-1] if len(line["conversations"]) > 1 else line["conversations"]
                             for line in RLAIF]
    assert data.texts[1] == ("<|im_start|>system\n你是一个知识丰富的AI。<|im_end|>\n<|im_start|>user\n鲁迅是谁？"
                             "<|im_end|>\n<|im_start|>assistant\n")
    assert not data.has_answers and all(c == {"answer": None} for c in data.columns)
    replied = write_jsonl(tmp_path / "replied.jsonl", [{"conversations": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]}])
    with pytest.raises(DataError, match="replied.jsonl line 1: the conversation ends with an assistant reply, but "
                                        "GRPO samples the reply itself"):
        GRPODataset(replied, tok, 256, max_completion_length=64)




def test_prompts_are_rendered_with_the_chat_template(tmp_path, tok):
    """A plain-string prompt becomes a user message with the generation prompt (without the template a
    chat model never ends its turn); numeric answers are kept as text, other fields go to the rewards."""
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": 4, "level": "easy"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])
    data = GRPODataset(path, tok, 64, max_completion_length=16)
    expected = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                       add_generation_prompt=True)
    assert data.texts[0] == expected and data.texts[0].endswith("<|im_start|>assistant\n")
    assert data.prompt_ids[0] == tok(expected, add_special_tokens=False)["input_ids"]
    batch = prompt_collate(0)([data[0], data[1]])
    assert batch["columns"] == {"answer": ["4", None], "level": ["easy", None]}
    short = len(data.prompt_ids[0])
    assert batch["attention_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - short) + [1] * short
    assert batch["input_ids"][0, -short:].tolist() == data.prompt_ids[0]  # left-padded: prompts end together
    shipped = GRPODataset(ROOT / "dataset" / "grpo.jsonl", tok, 256, max_completion_length=64)
    assert len(shipped) == 1200 and all(c["answer"] is not None for c in shipped.columns)


def test_bad_prompt_lines_name_the_line_or_are_skipped_and_counted(tmp_path, tok):
    good = {"prompt": "What is 1 + 1?", "answer": "2"}
    rows = [good, '{"prompt": "cut', {"question": "x"}, {"prompt": [{"role": "assistant", "content": "hi"}]},
            {"prompt": "x", "answer": [1]}, {"prompt": [{"role": "robot", "content": "x"}]},
            {"prompt": "a " * 200}, good]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    for line, message in [(2, "malformed JSON"), (3, "missing field 'prompt'"),
                          (4, "last message has role 'assistant'"), (5, "'answer' must be a string or a number"),
                          (6, "role 'robot'"), (7, "at most 48 fit (--max_seq_len minus --max_completion_length)")]:
        single = write_jsonl(tmp_path / f"{line}.jsonl", [good, rows[line - 1]])
        with pytest.raises(DataError, match=f"line 2: .*{message}".replace("(", r"\(").replace(")", r"\)")):
            GRPODataset(single, tok, 64, max_completion_length=16)
    data = GRPODataset(path, tok, 64, skip_bad_records=True, max_completion_length=16)
    assert len(data) == 2 and sum(data.bad_skipped.values()) == 6 and data.bad_skipped["prompt too long"] == 1


# ----------------------------------------------------------------------------- rollouts


class Scripted(Transformer):
    """Answers every prompt with the same tokens during generation (the KV-cached path), whatever its weights;
    the training forward (no cache) is the real model's."""

    script: list[int] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, logits_to_keep=0):
        past = kv_cache.length if kv_cache is not None else 0
        out = super().forward(input_ids, attention_mask, position_ids, kv_cache, logits_to_keep)
        if kv_cache is None:
            return out
        if past == 0:
            self.prompt_len = input_ids.shape[1]
        produced = kv_cache.length - self.prompt_len
        logits = torch.full_like(out.logits, -1e4)
        logits[:, -1, self.script[min(produced, len(self.script) - 1)]] = 1e4
        return out._replace(logits=logits)


def test_rollouts_use_the_chat_template_and_stop_at_im_end(tmp_path, tok, base_model):
    model = Scripted.from_pretrained(base_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer = tok("12 + 7 = 19.", add_special_tokens=False)["input_ids"]
    model.script = answer + [im_end] + tok(" and more", add_special_tokens=False)["input_ids"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 12 + 7?", "answer": "19"},
                                              {"prompt": "What is 1 + 1?", "answer": "3"}])
    data = GRPODataset(path, tok, 64, max_completion_length=12)
    batch = prompt_collate(0)([data[0], data[1]])
    obj = objective(tok, "dapo", num_generations=3, max_completion_length=12, beta=0.1, num_iterations=2,
                    log_completions_interval=1, log_dir=tmp_path)
    obj.ref_model = Transformer.from_pretrained(base_model).eval()
    (out,) = obj.prepare(model, [batch], step=1)
    n = len(answer) + 1  # the reply and its <|im_end|>
    assert out["input_ids"].shape[0] == 6 and out["labels"].shape[1] == n  # every row stopped: generation ended
    assert torch.equal(out["labels"], torch.tensor(answer + [im_end]).expand(6, n))
    prompt_width = batch["input_ids"].shape[1]
    assert torch.equal(out["input_ids"][:, :prompt_width], batch["input_ids"].repeat_interleave(3, dim=0))
    assert out["rollout_metrics"]["rewards/accuracy"] == 0.5  # "19" is right for prompt 1, wrong for prompt 2
    assert out["rollout_metrics"]["completion_length"] == n and out["rollout_metrics"]["completion_truncated"] == 0
    assert out["rollout_metrics"]["frac_reward_zero_std"] == 1.0 and not out["advantages"].any()
    assert out["old_logps"].shape == out["ref_logps"].shape == (6, n)
    logged = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and logged[0]["completion"] == "12 + 7 = 19." and logged[0]["rewards"]["accuracy"] == 1


def flat_or_varied(prompts, completions, **kwargs):
    """A reward whose groups are all alike on prompts about 'flat' (advantage 0) and spread out on the others."""
    return [1.0 if "flat" in p else float(len(c)) for p, c in zip(prompts, completions)]


def prompt_batches(tok, tmp_path, questions: list[list[str]]):
    """One prompt_collate batch per list of questions (their lines have no answer: flat_or_varied needs none)."""
    rows = [{"prompt": q} for qs in questions for q in qs]
    data = GRPODataset(write_jsonl(tmp_path / "prompts.jsonl", rows), tok, 64, max_completion_length=12)
    batches, i = [], 0
    for qs in questions:
        batches.append(prompt_collate(0)([data[j] for j in range(i, i + len(qs))]))
        i += len(qs)
    return batches


def test_dynamic_sampling_trains_only_groups_with_a_spread(tok, base_model, tmp_path):
    """Groups whose rewards all agree are dropped and fresh prompts drawn until the batch is full; the groups kept
    are the varied ones, their rows exactly as sampled; after --dynamic_sampling_draws batches the dropped groups
    fill the rest."""
    model = Transformer.from_pretrained(base_model).eval()
    first, second, third = prompt_batches(tok, tmp_path, [["a flat one", "a varied one"], ["flat again", "flat too"],
                                                          ["varied again, and longer", "flat at last"]])
    draws = iter([second, third])
    obj = objective(tok, "dapo", num_generations=4, max_completion_length=12, num_iterations=1,
                    dynamic_sampling_draws=3, beta=0.1)
    obj.reward_funcs = [("flat_or_varied", flat_or_varied)]
    obj.ref_model = Transformer.from_pretrained(base_model).eval()
    ref_rows = []  # the rows the reference model scores: only those trained, never the groups dropped
    obj.ref_model.register_forward_hook(lambda module, args, out: ref_rows.append(args[0].shape[0]))
    torch.manual_seed(0)
    (out,) = obj.prepare(model, [first], step=1, draw=lambda: next(draws))
    metrics = out["rollout_metrics"]
    assert ref_rows == [8] and out["ref_logps"].shape[0] == 8
    torch.testing.assert_close(out["ref_logps"], token_logps(obj.ref_model, out)[0])
    assert metrics["prompts_sampled"] == 6 and metrics["frac_trained_zero_std"] == 0.0
    assert out["input_ids"].shape[0] == 8  # 2 groups of 4 completions, as fetched
    groups = out["advantages"].view(2, 4)
    assert (groups != 0).any(dim=1).all()  # both kept groups teach something
    assert metrics["frac_reward_zero_std"] == pytest.approx(4 / 6)  # logged over everything sampled
    prompts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(out["input_ids"], out["attention_mask"])]
    assert all("varied one" in p for p in prompts[:4]) and all("varied again" in p for p in prompts[4:])

    only_flat = prompt_batches(tok, tmp_path, [["flat"], ["flat 2"], ["flat 3"], ["flat 4"]])
    draws = iter(only_flat[1:])
    (out,) = obj.prepare(model, only_flat[:1], step=2, draw=lambda: next(draws))
    assert out["rollout_metrics"]["prompts_sampled"] == 3  # the draw limit, then a dropped group fills the batch
    assert out["rollout_metrics"]["frac_trained_zero_std"] == 1.0 and not out["advantages"].any()
    assert next(draws) is only_flat[3]  # nothing drawn beyond the limit


def test_dynamic_sampling_draws_as_long_as_any_rank_lacks_groups(tok, base_model, tmp_path, monkeypatch):
    """Under DDP the ranks draw alike: this rank's batch is full of varied groups, but another rank (a max over
    the ranks, faked here) still lacks some, so this one draws too, to the limit, and its data position stays in
    step with the others'."""
    import trainer.grpo

    model = Transformer.from_pretrained(base_model).eval()
    batches = prompt_batches(tok, tmp_path, [["a varied one"], ["varied too"], ["varied three"], ["varied four"]])
    obj = objective(tok, "dapo", num_generations=4, max_completion_length=12, num_iterations=1,
                    dynamic_sampling_draws=3, beta=0.0)
    obj.reward_funcs = [("flat_or_varied", flat_or_varied)]
    torch.manual_seed(0)
    draws = iter(batches[1:])
    (out,) = obj.prepare(model, batches[:1], step=1, draw=lambda: next(draws))
    assert out["rollout_metrics"]["prompts_sampled"] == 1  # alone: full at once, nothing drawn
    # another rank, whose groups all agree, is short until both have drawn to the limit (2 more batches)
    other = iter([1, 1])
    monkeypatch.setattr(trainer.grpo, "all_reduce_max", lambda t: t.fill_(max(int(t), next(other, 0))))
    draws = iter(batches[1:])
    (out,) = obj.prepare(model, batches[:1], step=2, draw=lambda: next(draws))
    assert out["rollout_metrics"]["prompts_sampled"] == 3 and next(draws) is batches[3]
    assert out["rollout_metrics"]["frac_trained_zero_std"] == 0.0


def test_groups_of_different_widths_keep_their_tokens_and_log_probs(tok, base_model, tmp_path):
    """take_groups left-pads prompts and right-pads completions to the widest: every row's log-probs and targets
    are those it had in its own rollout."""
    model = Transformer.from_pretrained(base_model).eval()
    short, wide = prompt_batches(tok, tmp_path, [["hi"], ["a much longer prompt than the first one is"]])
    obj = objective(tok, "dapo", num_generations=2, max_completion_length=12, num_iterations=2)
    obj.reward_funcs = [("flat_or_varied", flat_or_varied)]
    torch.manual_seed(0)
    rollouts = [obj.rollout(model, short), obj.rollout(model, wide)]
    assert rollouts[0]["input_ids"].shape[1] != rollouts[1]["input_ids"].shape[1]
    merged = take_groups(rollouts, [(1, 0), (0, 0)], group_size=2)
    got = token_logps(model, merged)[0]
    for r, rows in ((rollouts[1], slice(0, 2)), (rollouts[0], slice(2, 4))):
        want = token_logps(model, r)[0]
        n = want.shape[1]
        assert torch.equal(merged["labels"][rows, :n], r["labels"])
        assert (merged["labels"][rows, n:] == IGNORE_INDEX).all()
        torch.testing.assert_close(got[rows, :n], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged["advantages"][rows], r["advantages"])


# ----------------------------------------------------------------------------- --mode grpo end to end

E_REWARD = "def e_count(completions, **kwargs):\n    return [c.count('e') / 10 for c in completions]\n"


@pytest.fixture(scope="module")
def grpo_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("grpo")
    (folder / "rewards.py").write_text(E_REWARD)
    lines = (ROOT / "dataset" / "grpo.jsonl").read_text().splitlines()
    return {"train": write_jsonl(folder / "train.jsonl", lines[:64]),
            "val": write_jsonl(folder / "val.jsonl", (ROOT / "dataset" / "grpo_val.jsonl").read_text().splitlines()[:8]),
            "reward": folder / "rewards.py"}


def grpo_args(files: dict[str, Path], base: Path, out: Path, *extra: str) -> list[str]:
    return ["--mode", "grpo", "--init_from", str(base), "--data_path", str(files["train"]),
            "--val_data_path", str(files["val"]), "--out_dir", str(out), "--batch_size", "2", "--num_generations", "4",
            "--max_completion_length", "12", "--reward_funcs", f"accuracy,format,{files['reward']}:e_count",
            "--log_interval", "1", "--warmup_iters", "0", "--device", "cpu", "--dtype", "float32",
            "--eval_interval", "0", "--log_completions_interval", "2", *extra]


def test_grpo_trains_logs_and_exports(grpo_files, base_model, tmp_path):
    out = tmp_path / "run"
    result = train.main(grpo_args(grpo_files, base_model, out, "--max_steps", "3", "--learning_rate", "1e-3"))
    records = read_metrics(out)
    train_rec = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rec] == [1, 2, 3]
    for key in ("reward", "rewards/accuracy", "rewards/format", "rewards/e_count", "reward_std",
                "frac_reward_zero_std", "kl", "clip_ratio", "completion_length", "completion_truncated"):
        assert all(math.isfinite(r[key]) for r in train_rec), key
    assert any(r["reward_std"] > 0 for r in train_rec)  # the e_count reward varies within groups
    (val,) = [r for r in records if "val_loss" in r]
    assert val["val_loss"] == pytest.approx(-val["val_reward"]) == result["val_loss"]
    assert {"val_rewards/accuracy", "val_rewards/e_count", "val_completion_length"} <= val.keys()
    assert "val_ppl" not in val  # -reward is no log-likelihood
    steps = {json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()}
    assert steps == {1, 2}
    assert json.loads((out / "final" / "zero2llm.json").read_text())["mode"] == "grpo"
    Transformer.from_pretrained(out / "final")


def test_grpo_raises_a_reward_it_can_reach(grpo_files, base_model, tmp_path):
    """The objective optimises: with a reward for the letter 'e', a random tiny model learns to write more of it."""
    out = tmp_path / "run"
    train.main(grpo_args(grpo_files, base_model, out, "--max_steps", "24", "--learning_rate", "3e-2",
                         "--reward_funcs", f"{grpo_files['reward']}:e_count", "--beta", "0",
                         "--num_generations", "8", "--log_completions_interval", "0"))
    rewards = [r["reward"] for r in read_metrics(out) if "reward" in r]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.5, rewards  # measured: 0.6 -> 3.4


def test_resume_mid_group_is_exact(grpo_files, base_model, tmp_path):
    """num_iterations 2: the checkpoint after step 3 falls between the two updates on one batch of rollouts; it
    holds them, and the resumed run's losses equal the uninterrupted run's."""
    check_resume_is_exact(lambda out, *extra: grpo_args(grpo_files, base_model, out, *extra), tmp_path, 6, 3,
                          "--num_iterations", "2", "--lr_decay_iters", "6", "--learning_rate", "1e-3")
    assert (tmp_path / "split" / "checkpoints" / "step_000003" / "rollouts_0.pt").is_file()
    assert not (tmp_path / "straight" / "checkpoints" / "step_000006" / "rollouts_0.pt").exists()


def test_dynamic_sampling_resumes_exactly(grpo_files, base_model, tmp_path):
    """The prompts drawn in place of dropped groups come from the run's data order, so a resumed run draws the
    same ones: its losses equal the uninterrupted run's."""
    check_resume_is_exact(lambda out, *extra: grpo_args(grpo_files, base_model, out, *extra), tmp_path, 4, 2,
                          "--dynamic_sampling", "--lr_decay_iters", "4", "--learning_rate", "1e-3")
    logged = [r for r in read_metrics(tmp_path / "straight") if "prompts_sampled" in r]
    assert len(logged) == 4 and all(r["prompts_sampled"] >= 2 for r in logged)


def test_accuracy_without_answers_is_left_out_with_one_line(grpo_files, base_model, tmp_path, capsys):
    """On MiniMind's RLAIF lines accuracy has nothing to compare with: one line says so, and no NaN
    rewards/accuracy is logged at every step."""
    short = [line for line in RLAIF if len(line["conversations"]) == 2]  # prompts that fit the tiny model's 64 tokens
    files = {**grpo_files, "train": write_jsonl(tmp_path / "rlaif.jsonl", short * 2)}
    out = tmp_path / "run"
    train.main(grpo_args(files, base_model, out, "--max_steps", "2", "--eval_interval", "0"))
    err = capsys.readouterr().err
    assert err.count("no 'answer' field") == 1 and f"--reward_funcs accuracy: {files['train']} has no 'answer' " \
        "field, so accuracy scores nothing and is left out" in err
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 2 and all("rewards/accuracy" not in r and math.isfinite(r["rewards/format"])
                                     for r in records)
    with pytest.raises(UsageError, match="no reward left to score the completions"):
        train.main(grpo_args(files, base_model, tmp_path / "none", "--max_steps", "1", "--reward_funcs", "accuracy"))
    # TRL's math datasets name the reference "solution": the line says what to rename.
    files = {**grpo_files, "train": write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "What is 2 + 2?",
                                                                          "solution": "4"}] * 8)}
    capsys.readouterr()
    train.main(grpo_args(files, base_model, tmp_path / "trl", "--max_steps", "1", "--eval_interval", "0"))
    assert "has no 'answer' field (its 'solution' is TRL's field: rename it 'answer' where it holds the final " \
        "answer), so accuracy scores nothing" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--num_generations", "1"], "--num_generations 1: must be >= 2"),
    (["--temperature", "0"], "--temperature 0: must be > 0"),
    (["--max_completion_length", "64"], "--max_completion_length 64: leaves no room for the prompt"),
    (["--precompute_ref_logps"], "--precompute_ref_logps is for --mode dpo"),
    (["--reward_model_path", "nowhere"], "--reward_model_path nowhere: no model there"),
    (["--fsdp"], "--fsdp with --mode grpo: sampling stops at a different length on each rank"),
    (["--dynamic_sampling", "--dynamic_sampling_draws", "0"], "--dynamic_sampling_draws 0: must be >= 1"),
])
def test_bad_grpo_flags_fail_before_any_work(grpo_files, base_model, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train.main(grpo_args(grpo_files, base_model, tmp_path / "x", *flags))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torchrun_two_processes_validate_like_one(grpo_files, base_model, tmp_path):
    """2 CPU processes (gloo): rollouts (with dynamic sampling, whose draws the ranks agree on), training and the
    all-reduced validation run without a hang; with the weights held still (lr 0) the validation rewards equal one
    process's."""
    common = ("--max_steps", "2", "--learning_rate", "0", "--save_interval_steps", "0", "--dynamic_sampling")
    one = tmp_path / "one"
    train.main(grpo_args(grpo_files, base_model, one, *common, "--batch_size", "4"))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *grpo_args(grpo_files, base_model, two, *common, "--batch_size", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = [[r for r in read_metrics(run) if "val_loss" in r][-1] for run in (one, two)]
    for key in ("val_loss", "val_rewards/accuracy", "val_rewards/e_count", "val_completion_length"):
        assert vals[1][key] == pytest.approx(vals[0][key], rel=1e-5), key
    assert [r["step"] for r in read_metrics(two) if "loss" in r] == [1, 2]


def test_pipeline_check_fails_when_grpo_changed_nothing(grpo_files, base_model, capsys):
    """scripts/pipeline_check.py --task grpo guards the pipeline: the same model before and after gains nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_check", ROOT / "scripts" / "pipeline_check.py")
    pipeline_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline_check)
    assert pipeline_check.sign_test(12, 4) == pytest.approx(2517 / 2 ** 16)  # sum of C(16, k) for k >= 12
    assert pipeline_check.sign_test(0, 0) == 1.0
    code = pipeline_check.main(["--task", "grpo", "--before", str(base_model), "--after", str(base_model),
                                "--data", str(grpo_files["val"]), "--max_new_tokens", "8"])
    out, err = capsys.readouterr()
    results = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and "FAIL" in err
    assert results["before"] == results["after"] and results["after"]["prompts"] == 8
    assert results["wrong_to_right"] == results["right_to_wrong"] == 0
    seq_len = json.loads((base_model / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(SystemExit, match=f"the model's max_seq_len {seq_len} minus --max_new_tokens {seq_len - 4}"):
        pipeline_check.main(["--task", "grpo", "--before", str(base_model), "--after", str(base_model),
                             "--data", str(grpo_files["val"]), "--max_new_tokens", str(seq_len - 4)])
