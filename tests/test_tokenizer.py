"""The shipped tokenizer: loads offline, round-trips any text, renders ChatML, masks assistant turns."""

import importlib.util
import json
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONVERSATION, ROOT, TOKENIZER

spec = importlib.util.spec_from_file_location("train_tokenizer", TOKENIZER / "train_tokenizer.py")
train_tokenizer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_tokenizer)


def test_special_token_ids(tok):
    assert len(tok) == 6400
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [0, 1, 2, 3, 4]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == tok.pad_token_id == 0
    assert tok.bos_token is None
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False


def test_no_bos_added_and_specials_not_split(tok):
    assert tok("hello")["input_ids"] == tok.encode("hello", add_special_tokens=False)
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]):
        assert tok.encode(t) == [i]
        ids = tok.encode(f"a{t}b")
        assert ids.count(i) == 1 and len(ids) == 3


def test_think_tokens_survive_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\n1 + 1 = 2\n</think>\n2<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\n1 + 1 = 2\n</think>\n2"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ["Héllo wörld 🤖 中文 \t\r\n  x", " leading and trailing spaces  ", "a .b , c",
                                  "\x00\x7f\u200b\ufeff", "<|im_end|><|endoftext|>", "12345 + 678 = 13023."])
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_chat_template_exact_string(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
                    "<|im_start|>assistant\n12 + 7 = 19.<|im_end|>\n"
                    "<|im_start|>user\nAnd if you add 3 more?<|im_end|>\n"
                    "<|im_start|>assistant\n19 + 3 = 22.<|im_end|>\n")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")


def test_apply_chat_template_return_types(tok):
    """transformers changed these across versions: pin what the trainer relies on."""
    assert isinstance(tok.apply_chat_template(CONVERSATION, tokenize=False), str)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert isinstance(out, Mapping) and isinstance(out["input_ids"], list) and isinstance(out["input_ids"][0], int)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)
    assert out["input_ids"] == tok.encode(tok.apply_chat_template(CONVERSATION, tokenize=False))


def test_assistant_mask_token_by_token(tok):
    """Mask = each assistant content + its <|im_end|>; never the role header, the "\\n" after it, or other turns."""
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    expected_ids, expected_mask = [], []
    for m in CONVERSATION:
        header = tok.encode(f"<|im_start|>{m['role']}\n")
        body = tok.encode(m["content"] + "<|im_end|>")
        trained = int(m["role"] == "assistant")
        expected_ids += header + body + tok.encode("\n")
        expected_mask += [0] * len(header) + [trained] * len(body) + [0]
    assert ids == expected_ids
    assert mask == expected_mask
    masked = [i for i, keep in zip(ids, mask) if keep]
    assert tok.decode(masked) == "12 + 7 = 19.<|im_end|>19 + 3 = 22.<|im_end|>"


def test_training_is_deterministic(tmp_path):
    texts = ["To be, or not to be, that is the question.", "What is 12 + 7?", "12 + 7 = 19."] * 20
    a = train_tokenizer.build_tokenizer(iter(texts), vocab_size=300)
    b = train_tokenizer.build_tokenizer(iter(texts), vocab_size=300)
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]] == [
        0, 1, 2, 3, 4]
    train_tokenizer.save(a, tmp_path / "a")
    train_tokenizer.save(b, tmp_path / "b")
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shipped_files_are_reproducible(tmp_path):
    """Retraining on the shipped dataset/ files gives the shipped tokenizer byte for byte (~2 s)."""
    data = [ROOT / "dataset" / f for f in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "grpo.jsonl")]
    tok = train_tokenizer.build_tokenizer(train_tokenizer.corpus_texts(data), vocab_size=6400)
    train_tokenizer.save(tok, tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / name).read_bytes() == (TOKENIZER / name).read_bytes(), name
