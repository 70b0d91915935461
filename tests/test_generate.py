"""KV-cached generation and the eval_model.py CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from model import ModelConfig, Transformer, generate, sample_next_token
from model.generate import apply_repetition_penalty

V = 320
MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, qk_norm=True)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64)
    return Transformer(ModelConfig(**{**base, **overrides})).eval()


def prompt(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy_by_recompute(model: Transformer, x: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: re-run the whole sequence for every new token, no cache."""
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[:, -n:]


@pytest.mark.parametrize("overrides", [{}, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("flash", [True, False])
def test_kv_cached_greedy_equals_full_recompute(overrides: dict, flash: bool) -> None:
    model = build(flash_attn=flash, **overrides)
    x = prompt(2, 6)
    out = torch.stack(list(generate(model, x, max_new_tokens=12, temperature=0)), dim=1)
    assert out.shape == (2, 12)
    assert torch.equal(out, greedy_by_recompute(model, x, 12))


def test_left_padded_batch_equals_each_row_alone() -> None:
    model = build()
    long, short = prompt(1, 8, seed=2)[0], prompt(1, 3, seed=3)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(5, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = torch.stack(list(generate(model, batch, 10, temperature=0, attention_mask=mask)), dim=1)
    assert torch.equal(out[0], greedy_by_recompute(model, long[None], 10)[0])
    assert torch.equal(out[1], greedy_by_recompute(model, short[None], 10)[0])


def test_stops_when_every_row_has_produced_eos() -> None:
    model = build()
    x = prompt(2, 5)
    free = torch.stack(list(generate(model, x, 8, temperature=0)), dim=1)
    eos = int(free[0, 2])

    def first_hit(row: torch.Tensor) -> int | None:
        hits = (row == eos).nonzero()
        return int(hits[0]) if len(hits) else None

    k0, k1 = first_hit(free[0]), first_hit(free[1])
    rows = torch.stack(list(generate(model, x, 8, temperature=0, eos_token_id=eos, pad_token_id=0)), dim=1)
    assert rows.shape[1] == max(k0, 7 if k1 is None else k1) + 1  # stops once the last row finished
    assert torch.equal(rows[0, : k0 + 1], free[0, : k0 + 1]) and (rows[0, k0 + 1 :] == 0).all()  # then pad


def test_single_row_stops_at_eos_list() -> None:
    model = build()
    x = prompt(1, 4)
    first = int(next(generate(model, x, 1, temperature=0))[0])
    assert len(list(generate(model, x[0], 20, temperature=0, eos_token_id=[V - 1, first]))) == 1


def test_sampling_is_seeded_and_respects_top_k_top_p() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    assert (sample_next_token(logits, temperature=0) == 0).all()
    assert (sample_next_token(logits, top_k=1) == 0).all()
    assert (sample_next_token(logits, top_p=0.01) == 0).all()
    assert set(sample_next_token(logits, top_k=2).tolist()) == {0, 1}
    # top_p=0.9: probs are .64 .24 .09 .03 .01; the first three reach 0.9.
    assert set(sample_next_token(logits, top_p=0.9).tolist()) <= {0, 1, 2}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_next_token(logits, 1.0, generator=g1), sample_next_token(logits, 1.0, generator=g2))


def test_repetition_penalty_math_and_effect() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0]]))
    model = build()
    x = prompt(1, 6)
    out = torch.cat(list(generate(model, x, 20, temperature=0, repetition_penalty=1e6)))
    assert len(set(out.tolist())) == 20 and not set(out.tolist()) & set(x[0].tolist())


def test_generation_leaves_autograd_usable() -> None:
    model = build()
    gen = generate(model, prompt(2, 4), 5, temperature=1.0)
    first = next(gen)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # the mode does not leak
    tokens = torch.stack([first, *gen], dim=1)
    model.train()
    out = model(tokens)  # e.g. GRPO: score the sampled completions with gradients
    out.logits.sum().backward()
    assert model.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------- eval_model.py

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(folder: Path) -> None:
    """A ~280-token byte-level BPE with the project's special tokens, written as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, hi there, how are you?"] * 10, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    build(bos_token_id=None, eos_token_id=2, pad_token_id=0).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def run_eval(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "eval_model.py"), *args], input=stdin, capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )


def test_eval_model_one_shot_completion(model_dir: Path) -> None:
    r = run_eval("--model_path", str(model_dir), "--prompt", "hi", "--max_new_tokens", "5", "--device", "cpu", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hi")


def test_eval_model_interactive_chat(model_dir: Path, monkeypatch, capsys) -> None:
    import io

    import eval_model

    (model_dir / "zero2llm.json").write_text(json.dumps({"chat": True}))  # auto mode -> chat
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you?\nexit\n"))
    try:
        eval_model.main(["--model_path", str(model_dir), "--max_new_tokens", "4", "--temperature", "0",
                         "--system", "be brief", "--device", "cpu"])
    finally:
        (model_dir / "zero2llm.json").unlink()
    out = capsys.readouterr().out
    assert "[chat mode" in out and out.count(">>> ") == 3


def test_eval_model_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    import eval_model

    with pytest.raises(SystemExit, match=r"error: .*missing: no such model folder"):
        eval_model.main(["--model_path", str(tmp_path / "missing"), "--prompt", "hi"])


@pytest.mark.parametrize("flags, message", [
    (["--repetition_penalty", "0"], "--repetition_penalty 0.0: must be > 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--top_k", "-3"], "--top_k -3: must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
])
def test_eval_model_bad_generation_flags_fail_before_loading(tmp_path, capsys, flags, message) -> None:
    import eval_model

    with pytest.raises(SystemExit) as exc:  # the folder does not exist: the flags are checked first
        eval_model.main(["--model_path", str(tmp_path / "missing"), "--prompt", "hi", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_eval_model_unknown_device_is_one_clear_error(tmp_path: Path) -> None:
    import eval_model

    with pytest.raises(SystemExit, match="error: --device tpu: not a device name"):
        eval_model.main(["--model_path", str(tmp_path / "missing"), "--prompt", "hi", "--device", "tpu"])


def test_streaming_prints_multibyte_characters_whole(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import eval_model
    from transformers import AutoTokenizer

    make_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "hi 世界!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the CJK characters are split into byte tokens
    stream = [torch.tensor([i]) for i in ids] + [torch.tensor([2]), torch.tensor([5])]
    assert eval_model.stream_text(tokenizer, stream, stop=[2]) == text
    assert capsys.readouterr().out == text + "\n"


def test_chat_encoding_has_generation_prompt(tmp_path: Path) -> None:
    import eval_model
    from transformers import AutoTokenizer

    make_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = eval_model.encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_history_keeps_to_the_context_dropping_the_oldest_exchanges(model_dir: Path) -> None:
    import eval_model

    tokenizer = eval_model.load_tokenizer(model_dir)
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"hello world {i}"}, {"role": "assistant", "content": "hi there"}]
    messages.append({"role": "user", "content": "how are you?"})
    full = len(eval_model.encode_chat(tokenizer, messages))
    budget = full - 10
    ids = eval_model.fit_chat(tokenizer, messages, budget)
    assert len(ids) <= budget and ids == eval_model.encode_chat(tokenizer, messages)
    assert messages[0]["content"] == "be brief" and messages[-1]["content"] == "how are you?"
    assert messages[1]["content"] == "hello world 1"  # exactly the oldest exchange went
    assert len(messages) == 1 + 5 * 2 + 1


def test_eval_model_long_prompt_is_cut_to_the_context(model_dir: Path) -> None:
    r = run_eval("--model_path", str(model_dir), "--mode", "complete", "--prompt", "hello world " * 40,
                 "--max_new_tokens", "8", "--device", "cpu", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "prompt cut to its last 56 of" in r.stderr  # max_seq_len 64 - 8 new tokens
    r = run_eval("--model_path", str(model_dir), "--prompt", "hi", "--max_new_tokens", "64", "--device", "cpu")
    assert r.returncode != 0 and "--max_new_tokens 64 leaves no room for a prompt" in r.stderr
