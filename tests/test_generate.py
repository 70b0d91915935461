"""KV-cached generation and the eval_model.py CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from conftest import ROOT, endless_chat_model
from model import ModelConfig, Transformer, generate, sample_next_token
from model.generate import answer_budget, apply_repetition_penalty, decode_stream

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


def test_a_reader_that_stops_reading_ends_eval_model_quietly(model_dir: Path) -> None:
    """`eval_model.py ... | head`: the reader gone before the answer is written (its end of the pipe closed
    first) ends the run with the shell's code for SIGPIPE, without a traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--model_path", str(model_dir), "--prompt",
                            "hi", "--max_new_tokens", "5", "--device", "cpu"], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(write)
    assert r.returncode == 141 and "Traceback" not in r.stderr, r.stderr


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


def test_eval_model_names_the_model_of_a_run_folder_and_refuses_another_models_tokenizer(model_dir, tmp_path, capsys):
    """A run folder (out/sft) is not a model: the error names its final/. A model folder without a tokenizer borrows
    the repo's (said on stderr), but not one with ids past the model's embeddings, which would index out of range."""
    import shutil

    import eval_model

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    with pytest.raises(SystemExit, match=rf"{run} is a training run's folder: its model is {run / 'final'}"):
        eval_model.main(["--model_path", str(run), "--prompt", "hi"])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model_dir / name, bare)
    with pytest.raises(SystemExit, match=rf"the tokenizer in {eval_model.REPO_TOKENIZER} has 6,400 tokens but the "
                                         rf"model in {bare} only {V:,}: it is another model's"):
        eval_model.main(["--model_path", str(bare), "--prompt", "hi"])
    build(vocab_size=6400, n_layers=1).save_pretrained(bare)
    eval_model.main(["--model_path", str(bare), "--prompt", "hi", "--max_new_tokens", "2"])
    assert f"[{bare} has no tokenizer: using {eval_model.REPO_TOKENIZER}]" in capsys.readouterr().err


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


@pytest.mark.parametrize("text", ["hi 世界! 你好，今天天气很好。", "hi 👋🏽 there 🎉🇨🇳 ok", "数学 12 + 7 = 19 ✅"])
def test_streaming_prints_whole_characters_only(tok, capsys: pytest.CaptureFixture, text: str) -> None:
    """Chinese and emoji split over byte tokens: every printed piece is whole characters, none is U+FFFD, and
    the pieces add up to the text."""
    import eval_model

    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens end inside a character
    pieces = list(decode_stream(tok, ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stream = [torch.tensor([i]) for i in ids] + [torch.tensor([2]), torch.tensor([5])]  # 2 = <|im_end|> stops it
    assert eval_model.stream_answer(tok, stream, stop=[2]) == (text, False)
    assert capsys.readouterr().out == text + "\n"


def test_streaming_drops_bytes_that_never_form_a_character(tok) -> None:
    """A lead byte followed by plain text (what a barely trained model emits) is dropped, not printed as U+FFFD."""
    lead = tok.convert_tokens_to_ids("\u00e4")  # byte 0xE4 alone: the first byte of a 3-byte character
    ids = tok("from", add_special_tokens=False)["input_ids"] + [lead] + tok("over", add_special_tokens=False)["input_ids"]
    assert "\ufffd" in tok.decode(ids)
    assert "".join(decode_stream(tok, ids)) == "fromover"


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

    tokenizer = eval_model.model_tokenizer(model_dir, eval_model.load_model(model_dir))
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


# ----------------------------------------------------------------------------- answer length and the context


def test_default_answer_length_shrinks_to_leave_the_prompt_room() -> None:
    assert answer_budget(32768, None) == (256, None)
    budget, note = answer_budget(256, None)  # the `small` preset: 256 new tokens would fill the whole context
    assert budget == 128 and "half of the model's 256-token context" in note
    assert answer_budget(256, 200) == (200, None)  # an explicit length that fits is kept as it is
    with pytest.raises(ValueError, match="max_new_tokens 256 leaves no room for a prompt .* use at most 255"):
        answer_budget(256, 256)


def test_eval_model_default_answer_fits_a_small_context(model_dir: Path) -> None:
    r = run_eval("--model_path", str(model_dir), "--mode", "complete", "--prompt", "hello world " * 40,
                 "--device", "cpu", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "max_new_tokens 32 (half of the model's 64-token context" in r.stderr
    assert "prompt cut to its last 32 of" in r.stderr


def test_generate_refuses_to_run_past_the_context() -> None:
    model = build()  # max_seq_len 64
    list(generate(model, prompt(2, 60), 4))  # exactly fills the context
    with pytest.raises(ValueError, match="a 60-token prompt \\+ max_new_tokens 5 exceed the model's 64-token context"):
        list(generate(model, prompt(2, 60), 5))


# ----------------------------------------------------------------------------- input that is not UTF-8


def test_prompt_that_is_not_utf8_is_one_clear_error(model_dir: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--model_path", str(model_dir), "--prompt",
                        b"caf\xe9 au lait", "--device", "cpu"], capture_output=True, timeout=120, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err
    assert "error: --prompt is not UTF-8 text (byte 0xe9 at character 4 is not UTF-8)" in err


def test_stdin_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(model_dir: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--model_path", str(model_dir), "--mode", "chat",
                        "--max_new_tokens", "4", "--device", "cpu"], input=b"\xff\xfe hi\nhello\n",
                       capture_output=True, timeout=120, cwd=ROOT)
    err, out = r.stderr.decode(), r.stdout.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "[that line is not UTF-8 text (byte 0xff at character 1 is not UTF-8); type it again]" in err
    assert out.count(">>> ") == 3  # the bad line, "hello" (answered), then end of input


# ----------------------------------------------------------------------------- interactive chat in a terminal


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory, tok) -> Path:
    """A chat model that never emits a stop token, so an answer runs until Ctrl-C (or its 2,000 tokens)."""
    folder = tmp_path_factory.mktemp("endless")
    endless_chat_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "zero2llm.json").write_text(json.dumps({"chat": True}))
    return folder


def spawn_chat(model_path: Path, *flags: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, [str(ROOT / "eval_model.py"), "--model_path", str(model_path),
                                           "--device", "cpu", *flags], cwd=str(ROOT), timeout=60, encoding="utf-8")
    child.expect_exact(">>> ")
    return child


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(endless_model: Path) -> None:
    child = spawn_chat(endless_model, "--max_new_tokens", "2000")
    child.sendline("tell me a long story")
    child.expect(r"tell me a long story\r\n.{20}")  # the answer is streaming
    child.sendintr()  # Ctrl-C, through the terminal as a user presses it
    child.expect_exact("[answer stopped]")
    child.expect_exact(">>> ")  # the session goes on
    child.sendline("and another")
    child.expect(r"and another\r\n.{20}")
    child.sendintr()
    child.expect_exact(">>> ")
    child.sendintr()  # Ctrl-C at the prompt quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_ctrl_d_at_the_prompt_quits_cleanly(endless_model: Path) -> None:
    child = spawn_chat(endless_model, "--max_new_tokens", "8")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_a_stopped_answer_stays_in_the_conversation(endless_model: Path, monkeypatch, capsys) -> None:
    """After Ctrl-C the next turn's prompt holds the earlier turns, the stopped answer as far as it got."""
    import io

    import eval_model

    real_generate = eval_model.generate

    def interrupted(model, input_ids, max_new_tokens, **kw):
        for i, token in enumerate(real_generate(model, input_ids, max_new_tokens, **kw)):
            if i == 5:
                raise KeyboardInterrupt  # what Ctrl-C raises in the middle of decoding
            yield token

    prompts = []
    monkeypatch.setattr(eval_model, "generate", interrupted)
    monkeypatch.setattr(eval_model, "encode_chat", lambda tok, m: prompts.append([dict(x) for x in m]) or
                        eval_model.render_prompt(tok, m)[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    eval_model.main(["--model_path", str(endless_model), "--device", "cpu", "--dtype", "float32", "--seed", "0"])
    first_reply = prompts[-1][1]
    assert [m["role"] for m in prompts[-1]] == ["user", "assistant", "user"]
    assert prompts[-1][0]["content"] == "first question" and prompts[-1][2]["content"] == "second question"
    assert first_reply["content"] and first_reply["content"] in capsys.readouterr().out  # 5 tokens' worth


# ------------------------------------------------------------------ Zer02LLM's and MiniMind's eval_model flags


def test_a_system_message_needs_a_chat(model_dir: Path) -> None:
    """--system with a model answered as a continuation (no zero2llm.json saying chat, so --mode auto chose
    complete) would be ignored: it is refused, saying why and what to add."""
    import eval_model

    with pytest.raises(SystemExit, match=r"--system is a chat's system message, and this model is not chat-tuned "
                                         r"\(--mode auto chose complete\): drop it, or add --mode chat"):
        eval_model.main(["--model_path", str(model_dir), "--system", "be nice", "--prompt", "hi"])


def test_model_mode_is_mode_with_zer02llms_values(model_dir: Path, capsys) -> None:
    """--model_mode 0 (or pretrain) = --mode complete, 1 (or sft) = --mode chat: the same answers."""
    import eval_model

    common = ["--model_path", str(model_dir), "--prompt", "hi", "--max_new_tokens", "5", "--temperature", "0",
              "--device", "cpu"]
    outputs = {}
    for flags in (["--mode", "complete"], ["--model_mode", "0"], ["--model_mode", "pretrain"], ["--mode", "chat"],
                  ["--model_mode", "1"], ["--model_mode", "sft"]):
        eval_model.main(common + flags)
        outputs[" ".join(flags)] = capsys.readouterr().out
    assert outputs["--model_mode 0"] == outputs["--model_mode pretrain"] == outputs["--mode complete"]
    assert outputs["--model_mode 1"] == outputs["--model_mode sft"] == outputs["--mode chat"]
    assert outputs["--mode complete"].startswith("hi") and outputs["--mode chat"] != outputs["--mode complete"]
    assert eval_model.parse_args(["--model_mode", "1"]).model_path == "out/sft/final"
    assert eval_model.parse_args(["--model_mode", "0"]).model_path == "out/pretrain/final"
    with pytest.raises(SystemExit):  # MiniMind's other values name a model: said so, with the folder to name
        eval_model.parse_args(["--model_mode", "2"])
    assert "2 is MiniMind's choice of its RLHF model: --model_path out/dpo/final" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_model.parse_args(["--model_mode", "7"])
    assert "invalid choice: '7'" in capsys.readouterr().err


def test_minimind_eval_flags_are_answered_with_what_to_write_here(capsys) -> None:
    """MiniMind's eval_llm.py command: one line per flag, after a one-line usage."""
    import eval_model

    with pytest.raises(SystemExit) as exc:
        eval_model.parse_args(["--load_from", "model", "--weight", "full_sft", "--hidden_size", "512", "--historys",
                               "2", "--max_seq_len", "512", "--bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: eval_model.py [flags]; python eval_model.py --help lists them",
        "eval_model.py: error: --load_from is MiniMind's: use --model_path FOLDER, a model folder as train.py writes "
        "it (config.json + model.safetensors)",
        "eval_model.py: error: --weight is MiniMind's: name the model's folder with --model_path (out/pretrain/final, "
        "out/sft/final, ...)",
        "eval_model.py: error: --hidden_size is MiniMind's: the shape comes from the model folder's config.json: "
        "drop it",
        "eval_model.py: error: --historys is MiniMind's: a chat keeps its earlier turns (the oldest dropped only to fit "
        "the model's context); --prompt answers one prompt on its own",
        "eval_model.py: error: --max_seq_len is MiniMind's name: use --max_new_tokens 512",
        "eval_model.py: error: unrecognized argument --bogus"]


def test_stream_false_prints_the_whole_answer_at_once(tok, capsys) -> None:
    import eval_model

    text = "你好，今天天气很好。"
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def tokens(printed_while_generating: list[str]):
        for i in ids:
            printed_while_generating.append(capsys.readouterr().out)
            yield torch.tensor([i])

    for stream in (True, False):
        seen: list[str] = []
        assert eval_model.stream_answer(tok, tokens(seen), stop=[2], stream=stream) == (text, False)
        rest = capsys.readouterr().out
        if stream:
            assert "".join(seen) + rest == text + "\n" and any(seen)
        else:
            assert not any(seen) and rest == text + "\n"


def test_zer02llms_eval_command_runs_as_typed(model_dir: Path, tmp_path: Path) -> None:
    """python eval_model.py --model_mode 1 --dim 512 --n_layers 8 --stream True, from a folder with out/sft/final:
    it chats with that model, and one line says the shape flags are not needed."""
    (tmp_path / "out" / "sft").mkdir(parents=True)
    (tmp_path / "out" / "sft" / "final").symlink_to(model_dir)
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--model_mode", "1", "--dim", "512",
                        "--n_layers", "8", "--stream", "True", "--prompt", "hi", "--max_new_tokens", "4",
                        "--device", "cpu", "--seed", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "--dim/--n_layers" in line]
    assert notes == ["[--dim/--n_layers are not needed: the shape comes from the model's config.json (dim 64, 2 "
                     "layers); ignored]"]
