"""Chat templates without {% generation %} marks (Qwen, Llama 3) give exact assistant masks, and an open
model that transformers saved (sharded, bf16, its own chat template) fine-tunes with --init_from and goes back out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import CONVERSATION, ROOT, TOKENIZER, train_losses
from data import IGNORE_INDEX, DataError, SFTDataset, render_chat

transformers = pytest.importorskip("transformers")

CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Qwen2.5's shape: a default system prompt when the conversation has none.
QWEN25 = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'"
          " }}{%- endif %}" + CHATML)
# Qwen3's shape: only the reply after the last user turn carries a (here empty) <think> block.
QWEN3 = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
         "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{{- message['content'] + '<|im_end|>\\n' }}"
         "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tokenizer_with(template: str, llama3: bool = False):
    """The shipped tokenizer with another chat template (and, for Llama 3, its special tokens)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    if llama3:
        tok.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS, "bos_token": "<|begin_of_text|>",
                                "eos_token": "<|eot_id|>"})
    tok.chat_template = template
    return tok


def trained_text(tok, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The trained runs of a mask, decoded."""
    runs, current = [], []
    for token, keep in zip(ids.tolist(), mask.tolist()):
        if keep:
            current.append(token)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    return runs + ([tok.decode(current)] if current else [])


def test_prefix_masks_equal_the_generation_marked_masks(tok):
    """On the shipped ChatML template, dropping its {% generation %} marks changes no id and no mask bit, over
    every held-out conversation and the multi-turn one."""
    plain = tokenizer_with(tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", ""))
    conversations = [json.loads(line)["conversations"] for line in (ROOT / "dataset" / "sft_val.jsonl").open()]
    for messages in conversations + [CONVERSATION]:
        ids, mask = render_chat(tok, messages, Path("x"), 1)
        plain_ids, plain_mask = render_chat(plain, messages, Path("x"), 1)
        assert np.array_equal(ids, plain_ids) and np.array_equal(mask, plain_mask)


@pytest.mark.parametrize("template, llama3, expected", [
    (QWEN25, False, ["12 + 7 = 19.<|im_end|>", "19 + 3 = 22.<|im_end|>"]),
    (QWEN3, False, ["12 + 7 = 19.<|im_end|>", "<think>\n\n</think>\n\n19 + 3 = 22.<|im_end|>"]),
    (LLAMA3, True, ["12 + 7 = 19.<|eot_id|>", "19 + 3 = 22.<|eot_id|>"]),
])
def test_templates_without_marks_train_each_reply_and_its_end_of_turn(template, llama3, expected):
    """Qwen2.5-, Qwen3- and Llama-3-shaped templates: the ids are apply_chat_template's, and exactly each reply
    plus its end-of-turn token is trained (never the header, never the newline after <|im_end|>)."""
    tok = tokenizer_with(template, llama3)
    for messages in (CONVERSATION, CONVERSATION[1:]):  # with and without a system message
        ids, mask = render_chat(tok, messages, Path("x"), 1)
        assert ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert trained_text(tok, ids, mask) == expected
    first_reply = tok.encode(expected[0], add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i:i + len(first_reply)].tolist() == first_reply)
    assert not mask[start - 1] and mask[start:start + len(first_reply)].all()  # the header's last token: not trained


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path):
    tok = tokenizer_with("{{- 'turns: ' + (messages | length) | string + '\\n' }}" + CHATML)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"conversations": CONVERSATION}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl line 1: the chat template .* is not prefix-stable: .* assistant "
                                        r"message 3 .*{% generation %}"):
        SFTDataset(path, tok, 64)
    failing = tokenizer_with("{{- raise_exception('only user/assistant alternation') }}")
    with pytest.raises(DataError, match="c.jsonl line 1: the chat template .* fails on this conversation: .*alternation"):
        SFTDataset(path, failing, 64)


# ----------------------------------------------------------------------------- train.py on a transformers model

def open_model(folder: Path, arch: str) -> Path:
    """A tiny random Llama-3-style or Qwen2-style model as transformers saves it (bf16, sharded, several eos ids,
    sampling defaults), with a tokenizer whose template has no generation marks: what a Hub download looks like."""
    tok = tokenizer_with(LLAMA3, llama3=True) if arch == "llama" else tokenizer_with(QWEN25)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, 0])
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    hf.generation_config.do_sample, hf.generation_config.temperature = True, 0.6
    hf.save_pretrained(folder, max_shard_size="200KB")
    tok.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def chat_files(tmp_path: Path) -> dict[str, Path]:
    lines = (ROOT / "dataset" / "sft.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:64]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[64:80]) + "\n")
    return {"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl"}


def args(mode: str, init: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--mode", mode, "--init_from", str(init), "--data_path", str(files["train"]), "--val_data_path",
            str(files["val"]), "--out_dir", str(out), "--batch_size", "8", "--max_seq_len", "96", "--max_steps", "6",
            "--learning_rate", "3e-3", "--warmup_iters", "1", "--log_interval", "1", "--eval_interval", "0",
            "--device", "cpu", "--dtype", "float32", *extra]


def check_loads_in_transformers(folder: Path, ours_folder: Path | None = None) -> None:
    """transformers loads it with no custom code, chats with its template, and agrees with our model."""
    from model import Transformer

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"]
    ours = Transformer.from_pretrained(ours_folder or folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(prompt).logits, ours(prompt).logits, atol=1e-4, rtol=0)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_token_id, 0] and generation["temperature"] == 0.6


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sft_on_a_transformers_model_runs_and_exports(tmp_path, arch):
    init = open_model(tmp_path / "hub", arch)
    files = chat_files(tmp_path)
    out = tmp_path / "sft"
    train.main(args("sft", init, files, out))
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    check_loads_in_transformers(out / "final")


def test_lora_dpo_and_grpo_on_a_transformers_model(tmp_path):
    init = open_model(tmp_path / "hub", "qwen2")
    files = chat_files(tmp_path)
    train.main(args("lora", init, files, tmp_path / "lora", "--merge", "--lora_rank", "4"))
    adapter = json.loads((tmp_path / "lora" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(init.resolve())
    check_loads_in_transformers(tmp_path / "lora" / "final" / "merged")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in (ROOT / "dataset" / "dpo.jsonl").read_text().splitlines()[:24]
                             if "<think>" not in line))
    out = tmp_path / "dpo"
    train.main(args("dpo", init, {"train": pairs, "val": pairs}, out, "--max_steps", "3", "--learning_rate", "1e-3"))
    assert sorted(train_losses(out)) == [1, 2, 3]
    check_loads_in_transformers(out / "final")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in (ROOT / "dataset" / "grpo.jsonl").read_text().splitlines()[:8]))
    out = tmp_path / "grpo"
    train.main(args("grpo", init, {"train": prompts, "val": prompts}, out, "--max_steps", "2", "--batch_size", "2",
                    "--num_generations", "2", "--max_completion_length", "8", "--learning_rate", "1e-3"))
    assert sorted(train_losses(out)) == [1, 2]
    check_loads_in_transformers(out / "final")


def test_labels_of_a_llama3_conversation(tmp_path):
    """The SFT rows of a Llama-3-template tokenizer: labels are the replies and <|eot_id|>, shifted by one."""
    tok = tokenizer_with(LLAMA3, llama3=True)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"conversations": CONVERSATION}) + "\n")
    row = SFTDataset(path, tok, 512)[0]
    labels = [t for t in row["labels"].tolist() if t != IGNORE_INDEX]
    assert tok.decode(labels) == "12 + 7 = 19.<|eot_id|>19 + 3 = 22.<|eot_id|>"
    assert row["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
