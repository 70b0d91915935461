"""Continuous batching (model/engine.py): requests that join and leave one decode loop get the tokens they would
get alone, token by token, in fp32."""

from __future__ import annotations

import threading

import pytest
import torch

from model import ModelConfig, Transformer, generate
from model.engine import Engine, Request

V = 320
MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, qk_norm=True)


def build(seed: int = 0, **overrides) -> Transformer:
    """A random model whose greedy tokens depend on every earlier token and its position, so that a wrong mask or
    position changes them: untied embeddings (tied, a random model mostly repeats its last token) and weights
    large enough for sharp attention (at the usual 0.02 it is nearly uniform, blind to positions)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=96,
                tie_word_embeddings=False, initializer_range=0.2)
    return Transformer(ModelConfig(**{**base, **overrides})).eval()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, V, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: Transformer, r: Request) -> list[int]:
    """What today's one-request loop (model/generate.py) generates for r's prompt, greedy or seeded."""
    g = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
    steps = generate(model, torch.tensor([r.prompt]), r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                     top_p=r.top_p, repetition_penalty=r.repetition_penalty, eos_token_id=list(r.stop_token_ids),
                     generator=g)
    return [int(t[0]) for t in steps]


def step_until(engine: Engine, done) -> None:
    for _ in range(500):
        if done():
            return
        engine.step()
    raise AssertionError("the engine did not get there in 500 steps")


@pytest.mark.parametrize("overrides", [dict(flash_attn=True), dict(flash_attn=False), dict(flash_attn=True, **MOE)],
                         ids=["sdpa", "math", "moe"])
def test_requests_joining_and_leaving_get_their_solo_tokens(overrides: dict) -> None:
    """Different prompt lengths, joins at different steps, more requests than rows (a queue), rows freed and
    reused (the last row moved into a finished one's place): every request's greedy tokens equal its solo run."""
    model = build(**overrides)
    engine = Engine(model, max_batch_size=3)
    spec = [(5, 30), (17, 12), (2, 25), (40, 9), (9, 33), (23, 20)]  # (prompt length, max_new_tokens)
    reqs = [Request(prompt(n, seed=i), new) for i, (n, new) in enumerate(spec)]
    seen_batch = []
    engine.submit(reqs[0])
    engine.submit(reqs[1])
    for _ in range(4):
        engine.step()
        seen_batch.append(len(engine.running))
    for r in reqs[2:5]:  # one joins at the next step, two wait for free rows
        engine.submit(r)
    engine.step()
    assert engine.running == reqs[:3] and list(engine._waiting) == reqs[3:5]
    step_until(engine, lambda: reqs[1].finish_reason is not None)
    engine.submit(reqs[5])
    step_until(engine, lambda: all(r.finish_reason is not None for r in reqs))
    assert engine.running == [] and max(seen_batch) == 2
    for r in reqs:
        assert r.finish_reason == "length" and len(r.tokens) == r.max_new_tokens
        assert r.tokens == alone(model, r), r.prompt[:3]


def test_stop_tokens_end_a_request_and_its_row_is_reused() -> None:
    model = build()
    free = [Request(prompt(6, seed=s), 20) for s in range(3)]
    Engine(model, max_batch_size=3).run(free)
    stop = free[0].tokens[7]  # a token the first request produces
    reqs = [Request(r.prompt, 20, stop_token_ids={stop}) for r in free]
    engine = Engine(model, max_batch_size=3)
    engine.run(reqs)
    for r, f in zip(reqs, free):
        cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert r.tokens == f.tokens[:cut] == alone(model, r)  # up to and including the stop token
        assert r.finish_reason == ("stop" if stop in f.tokens else "length")
    assert reqs[0].finish_reason == "stop" and len(reqs[0].tokens) <= 8


def test_seeded_sampling_is_the_same_alone_or_batched() -> None:
    model = build()

    def sampled(seed: int) -> Request:
        return Request(prompt(4 + seed, seed=seed), 24, temperature=1.0, top_k=50, top_p=0.9, seed=seed)

    batch = [sampled(s) for s in range(4)]
    Engine(model, max_batch_size=4).run(batch)
    for r in batch:
        solo = sampled(r.seed)
        Engine(model, max_batch_size=1).run([solo])
        assert r.tokens == solo.tokens == alone(model, r)
    assert len({tuple(r.tokens) for r in batch}) == 4


def test_repetition_penalty_matches_generate() -> None:
    model = build()
    reqs = [Request(prompt(8, seed=s), 16, repetition_penalty=1.5) for s in range(3)]
    Engine(model, max_batch_size=3).run(reqs)
    for r in reqs:
        assert r.tokens == alone(model, r)


def test_a_cancelled_request_frees_its_row_before_the_next_step() -> None:
    model = build()
    engine = Engine(model, max_batch_size=2)
    first, second = Request(prompt(5, seed=1), 60), Request(prompt(11, seed=2), 40)
    finished = []
    first.on_finish = finished.append
    engine.submit(first)
    engine.submit(second)
    for _ in range(5):
        engine.step()
    produced = len(first.tokens)
    engine.cancel(first)
    engine.step()
    assert finished == ["cancelled"] and first.finish_reason == "cancelled"
    assert engine.running == [second] and len(first.tokens) == produced  # gone before this step decoded
    third = Request(prompt(7, seed=3), 30)
    engine.submit(third)  # takes the freed row
    step_until(engine, lambda: second.finish_reason and third.finish_reason)
    assert second.tokens == alone(model, second) and third.tokens == alone(model, third)
    assert first.tokens == alone(model, Request(first.prompt, produced))


def test_a_request_cancelled_while_waiting_never_runs() -> None:
    engine = Engine(build(), max_batch_size=1)
    running, waiting = Request(prompt(5, seed=1), 10), Request(prompt(5, seed=2), 10)
    engine.submit(running)
    engine.submit(waiting)
    engine.step()
    engine.cancel(waiting)
    step_until(engine, lambda: running.finish_reason is not None)
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []


def test_the_engine_thread_serves_requests_from_other_threads() -> None:
    model = build()
    engine = Engine(model, max_batch_size=4)
    engine.start()
    reqs = [Request(prompt(3 + i, seed=i), 15) for i in range(8)]
    done = {id(r): threading.Event() for r in reqs}
    streamed: dict[int, list[int]] = {id(r): [] for r in reqs}
    for r in reqs:
        r.on_token = streamed[id(r)].append
        r.on_finish = lambda reason, e=done[id(r)]: e.set()
    try:
        threads = [threading.Thread(target=engine.submit, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(e.wait(60) for e in done.values())
    finally:
        engine.close()
    for r in reqs:
        assert streamed[id(r)] == r.tokens == alone(model, r)


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on(monkeypatch, capsys) -> None:
    model = build()
    engine = Engine(model, max_batch_size=2)
    real = engine._decode
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        real()

    monkeypatch.setattr(engine, "_decode", flaky)
    engine.start()
    try:
        broken = Request(prompt(5, seed=1), 20)
        ended = threading.Event()
        broken.on_finish = lambda reason: ended.set()
        engine.submit(broken)
        assert ended.wait(30)
        assert broken.finish_reason == "error" and "out of memory (simulated)" in broken.error
        later = Request(prompt(5, seed=2), 10)
        later_done = threading.Event()
        later.on_finish = lambda reason: later_done.set()
        engine.submit(later)
        assert later_done.wait(30) and later.tokens == alone(model, later)
    finally:
        engine.close()
    assert "RuntimeError: out of memory (simulated)" in capsys.readouterr().err


def test_a_prompt_that_does_not_fit_is_refused_on_submit() -> None:
    engine = Engine(build(), max_batch_size=2)  # 96 positions per row
    with pytest.raises(ValueError, match="a 90-token prompt \\+ max_new_tokens 7 exceed the 96 positions of a row"):
        engine.submit(Request(prompt(90, seed=0), 7))
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.submit(Request([], 5))
    engine.submit(Request(prompt(90, seed=0), 6))  # exactly fills a row


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="the written-out CPU decode step needs PyTorch's oneDNN bf16 kernels (x86)")
def test_a_frozen_bf16_model_serves_through_the_cpu_decode_step_with_the_forwards_tokens(monkeypatch) -> None:
    """A frozen bf16 model (eval_model --serve's) decodes through model/decode.py's step, each row at its own
    position and seeing only its own columns; requests joining and leaving get the tokens the model's forward
    gives them."""
    from model.decode import CPUDecodeStep
    from model.cpu_linear import CPULinear

    monkeypatch.setattr(CPULinear, "pack", True)  # the packed products, whatever this CPU's default
    monkeypatch.setattr(CPULinear, "pack_max_rows", None)
    real_call, calls = CPUDecodeStep.__call__, []
    monkeypatch.setattr(CPUDecodeStep, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    model = build(dim=128).to(torch.bfloat16).requires_grad_(False)
    spec = [(5, 30), (17, 12), (2, 25), (40, 9), (9, 33), (23, 20)]  # (prompt length, max_new_tokens)

    def served() -> list[list[int]]:
        reqs = [Request(prompt(n, seed=i), new) for i, (n, new) in enumerate(spec)]
        Engine(model, max_batch_size=3).run(reqs)
        return [r.tokens for r in reqs]

    fast = served()
    assert len(calls) > 30 and all(len(tokens) == new for tokens, (_, new) in zip(fast, spec))
    calls.clear()
    monkeypatch.setattr(CPUDecodeStep, "build", lambda *a: None)
    assert served() == fast and calls == []
