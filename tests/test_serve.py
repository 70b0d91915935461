"""eval_model.py --serve: OpenAI's API through the official client, concurrent clients in one batch, hang-ups that
free their row, bad requests answered as OpenAI error objects, and the chat page in a real headless browser.

The server runs in this process (uvicorn on a thread, the engine on another), so a test can see what the engine
was asked: the requests' prompt tokens, each decode step's batch, and how each request ended.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import torch

import eval_model
import serve
from conftest import ROOT, endless_chat_model
from data import render_prompt, stop_token_ids
from model import ModelConfig, Transformer, generate
from model.engine import Engine, Request
from model.generate import decode_stream
from model.lora import apply_lora, lora_layers, merge_lora, save_adapter
from scripts.chat_screenshot import wait_for
from serve.protocol import StopStrings

CONTEXT = 128  # the tiny chat model's context: long prompts and answers are easy to make
SYSTEM_AND_QUESTION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12 + 7?"}]


@dataclass
class Served:
    """A running server and what its engine saw."""
    url: str
    engine: Engine
    model: Transformer
    tokenizer: Any
    stop: list[int]
    submitted: list[Request] = field(default_factory=list)  # every request the engine was given, in order
    batch_sizes: list[int] = field(default_factory=list)  # the rows of each decode step

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def greedy(self, ids: list[int], n: int) -> tuple[str, int, str]:
        return greedy(self.model, self.tokenizer, self.stop, ids, n)


def greedy(model: Transformer, tok, stop: list[int], ids: list[int], n: int) -> tuple[str, int, str]:
    """(text, tokens generated, finish reason) of today's one-request loop (model/generate.py) on `ids`."""
    tokens = [int(t[0]) for t in generate(model, torch.tensor([ids]), n, temperature=0, eos_token_id=stop)]
    stopped = tokens[-1] in stop
    text = "".join(decode_stream(tok, tokens[:-1] if stopped else tokens))
    return text, len(tokens), "stop" if stopped else "length"


@contextmanager
def serving(model: Transformer, tok, api_key: str | None = None, max_tokens: int = 16,
            step_delay: float = 0.0) -> Iterator[Served]:
    """The app of `eval_model.py --serve` on a free local port. step_delay slows each engine step down (so that
    a browser can watch an answer stream at a human pace)."""
    stop = stop_token_ids(tok, model.config.eos_token_id)
    engine = Engine(model, max_batch_size=8)
    sock = serve.app.listen("127.0.0.1", 0)
    served = Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, model, tok, stop)
    submit, decode, step = engine.submit, engine._decode, engine.step

    def recording_submit(request: Request) -> None:
        served.submitted.append(request)
        submit(request)

    def recording_decode() -> None:
        served.batch_sizes.append(len(engine.running))
        decode()

    def slowed_step() -> None:
        time.sleep(step_delay)
        step()

    engine.submit, engine._decode = recording_submit, recording_decode
    if step_delay:
        engine.step = slowed_step
    defaults = serve.Defaults(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.0, max_tokens=max_tokens)
    server = serve.server(serve.build_app(engine, tok, stop, "tiny", defaults, api_key), log_level="warning")
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the server to start")
        yield served
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()


@pytest.fixture(scope="module")
def chat_model(tok) -> Transformer:
    """A random model whose greedy answer depends on the whole prompt: untied embeddings (tied, it mostly repeats
    the prompt's last token) and sharp attention (initializer_range 0.2)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=len(tok), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                   max_seq_len=CONTEXT, tie_word_embeddings=False, initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def server(chat_model, tok) -> Iterator[Served]:
    with serving(chat_model, tok) as s:
        yield s


@pytest.fixture(scope="module")
def endless(tok) -> Iterator[Served]:
    """A server whose model never emits a stop token: an answer runs until max_tokens or a hang-up."""
    with serving(endless_chat_model(tok), tok) as s:
        yield s


# ----------------------------------------------------------------------------- the official client


def test_models_lists_the_one_model(server: Served) -> None:
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4o' does not exist; this server serves 'tiny'"):
        server.client().models.retrieve("gpt-4o")


def test_openai_fields_at_their_neutral_values_are_accepted(server: Served, tok) -> None:
    """Clients that send OpenAI's penalties, logit_bias and logprobs at their defaults get the plain answer."""
    reply = server.client().chat.completions.create(
        model="tiny", messages=SYSTEM_AND_QUESTION, temperature=0, max_tokens=8, presence_penalty=0,
        frequency_penalty=0.0, logit_bias={}, logprobs=False)
    assert reply.choices[0].message.content == server.greedy(render_prompt(tok, SYSTEM_AND_QUESTION)[1], 8)[0]
    reply = server.client().completions.create(model="tiny", prompt="hello", temperature=0, max_tokens=4, logprobs=0)
    assert reply.choices[0].text == server.greedy(eval_model.encode_completion(tok, "hello"), 4)[0]


def test_a_completion_prompt_may_be_a_list_of_one_text_or_token_ids(server: Served, tok) -> None:
    """OpenAI's other forms of a prompt, as evaluation harnesses send them: the same answer as the text's."""
    ids = eval_model.encode_completion(tok, "Once upon a time")
    text = server.greedy(ids, 6)[0]
    for prompt in (["Once upon a time"], ids):
        reply = server.client().completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=6)
        assert reply.choices[0].text == text and server.submitted[-1].prompt == ids


def test_chat_completion_is_the_greedy_answer_with_its_usage(server: Served, tok) -> None:
    reply = server.client().chat.completions.create(model="anything", messages=SYSTEM_AND_QUESTION, temperature=0,
                                                    max_tokens=20)
    ids = render_prompt(tok, SYSTEM_AND_QUESTION)[1]  # the chat template, with the generation prompt
    text, n, reason = server.greedy(ids, 20)
    assert server.submitted[-1].prompt == ids
    assert reply.object == "chat.completion" and reply.model == "tiny"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == text and choice.finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (len(ids), n,
                                                                                                 len(ids) + n)


def test_chat_completion_streams_in_openai_chunks(server: Served, tok) -> None:
    chunks = list(server.client().chat.completions.create(
        model="tiny", messages=SYSTEM_AND_QUESTION, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    ids = render_prompt(tok, SYSTEM_AND_QUESTION)[1]
    text, n, reason = server.greedy(ids, 20)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and len(pieces) > 1  # streamed piece by piece, not sent whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_completions_stream_and_not(server: Served, tok) -> None:
    client = server.client()
    ids = eval_model.encode_completion(tok, "Once upon a time")
    text, n, reason = server.greedy(ids, 24)
    whole = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=24)
    assert server.submitted[-1].prompt == ids
    assert whole.object == "text_completion" and whole.choices[0].text == text
    assert whole.choices[0].finish_reason == reason and whole.usage.completion_tokens == n
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=24,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and len(chunks) > 2
    assert chunks[-1].choices[0].finish_reason == reason


def test_an_answer_ends_before_its_stop_string(server: Served, tok) -> None:
    client = server.client()
    text, _, _ = server.greedy(eval_model.encode_completion(tok, "Once upon a time"), 30)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[:text.find(stop)]
    whole = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=30,
                                      stop=[stop, "never appears"])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=30,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("text, stop", [("hello world, how are you", ["o w"]), ("abcabcabd", ["abd", "zz"]),
                                        ("no stop here at all", ["xyz"]), ("aaab", ["aab"])])
def test_stop_strings_split_anyhow_over_pieces(text: str, stop: list[str]) -> None:
    expected = text[:min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))]
    for cut in range(1, len(text)):
        for pieces in ([text[:cut], text[cut:]], list(text[:cut]) + [text[cut:]]):
            stops, out, reached = StopStrings(stop), [], False
            for piece in pieces:
                sent, reached = stops.feed(piece)
                out.append(sent)
                if reached:
                    break
            if not reached:
                out.append(stops.flush())
            assert "".join(out) == expected and reached == (expected != text), pieces


def test_a_sampled_answer_follows_its_seed(server: Served) -> None:
    def ask(seed: int) -> str:
        return server.client().completions.create(model="tiny", prompt="hi", temperature=1.0, seed=seed,
                                                  max_tokens=12).choices[0].text

    assert ask(7) == ask(7) != ask(8)


def test_eight_concurrent_clients_share_the_batch_and_get_their_solo_answers(server: Served, tok) -> None:
    prompts = [f"client {i} says" + " hello" * i for i in range(8)]
    clients = [server.client() for _ in prompts]
    start = threading.Barrier(len(prompts))
    first_step = len(server.batch_sizes)

    def ask(i: int):
        start.wait()
        return clients[i].completions.create(model="tiny", prompt=prompts[i], temperature=0, max_tokens=40)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    for prompt, answer in zip(prompts, answers):
        text, n, reason = server.greedy(eval_model.encode_completion(tok, prompt), 40)
        assert answer.choices[0].text == text and answer.usage.completion_tokens == n
    assert max(server.batch_sizes[first_step:]) > 1  # decoded together, not one after another


# ----------------------------------------------------------------------------- hang-ups


def test_a_client_that_hangs_up_mid_stream_frees_its_row(endless: Served) -> None:
    body = {"messages": [{"role": "user", "content": "tell me a long story"}], "stream": True, "max_tokens": 3000}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{endless.url}/v1/chat/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(6):
                next(events)
            request = endless.submitted[-1]
            assert request.finish_reason is None and endless.engine.running == [request]
    wait_for(lambda: request.finish_reason, 5, "the row to be freed")
    assert request.finish_reason == "cancelled" and len(request.tokens) < 3000
    assert endless.engine.running == []
    again = endless.client().chat.completions.create(model="tiny", messages=body["messages"], max_tokens=5)
    assert again.usage.completion_tokens == 5  # and the server goes on


def test_a_client_that_hangs_up_while_waiting_for_a_whole_answer_frees_its_row(endless: Served) -> None:
    body = json.dumps({"prompt": "tell me a long story", "max_tokens": 3000}).encode()
    host, port = endless.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        request = wait_for(lambda: endless.engine.running and endless.engine.running[0], 10, "the request to run")
    wait_for(lambda: request.finish_reason, 5, "the row to be freed")
    assert request.finish_reason == "cancelled" and len(request.tokens) < 3000 and endless.engine.running == []


def test_a_client_gone_before_its_body_arrived_leaves_no_traceback(server: Served) -> None:
    """A request cut off while its body is being sent: answered 499 (one access-log line), where uvicorn used to log
    "Exception in ASGI application" with the whole ClientDisconnect traceback; the server goes on."""
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"messages\": [")
            time.sleep(0.3)
        time.sleep(0.5)  # the server sees the hang-up
        assert httpx.post(f"{server.url}/v1/chat/completions", json=GOOD_CHAT).status_code == 200
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not errors, [r.getMessage() for r in errors]


def test_prompts_are_tokenized_off_the_event_loop(server: Served, monkeypatch) -> None:
    """Rendering and tokenizing a prompt can take seconds (a huge one): they run in the server's tokenizing thread,
    so every other client's stream goes on meanwhile."""
    threads = []
    real = serve.app.render_prompt

    def recording(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(serve.app, "render_prompt", recording)
    assert httpx.post(f"{server.url}/v1/chat/completions", json=GOOD_CHAT).status_code == 200
    assert len(threads) == 1 and threads[0].startswith("tokenize"), threads


# ----------------------------------------------------------------------------- errors

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, param, message", [
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', None, "the request body is not valid JSON"),
    ("chat/completions", {**GOOD_CHAT, "temperature": "hot"}, "temperature", "temperature: Input should be a valid number"),
    ("chat/completions", {**GOOD_CHAT, "stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
    ("chat/completions", {**GOOD_CHAT, "temperature": 5}, "temperature", "temperature: Input should be less than or "
                                                                         "equal to 2"),
    ("chat/completions", {**GOOD_CHAT, "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options: is only allowed when stream is true"),
    ("chat/completions", {**GOOD_CHAT, "max_tokens": 2.5}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "messages.0.role: "),
    ("chat/completions", {"messages": []}, "messages", "messages: List should have at least 1 item"),
    ("chat/completions", {**GOOD_CHAT, "frequency_penalty": 0.5}, "frequency_penalty",
     "frequency_penalty: is not supported by this server"),
    ("chat/completions", {**GOOD_CHAT, "best_of": 2}, "best_of", "unrecognized request argument: best_of"),
    ("completions", {"prompt": "hi", "logprobs": 5}, "logprobs", "logprobs: is not supported"),
    ("chat/completions", {**GOOD_CHAT, "n": 2}, "n", "n: this server gives one answer per request: send n requests"),
    ("chat/completions", {**GOOD_CHAT, "presence_penalty": "x"}, "presence_penalty",  # not ".float": pydantic's
     "presence_penalty: Input should be a valid number"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     "messages.0.content: Input should be a valid string"),
    ("chat/completions", {**GOOD_CHAT, "max_tokens": 1000}, "max_tokens",
     "-token conversation exceed the model's 128-token context; ask for at most"),
    ("completions", {"prompt": "hello " * 200}, "prompt",
     "tokens and the model's context is 128: no room is left for an answer; shorten the prompt"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes up to 4"),
    ("completions", {"prompt": 42}, "prompt", "prompt: must be a string, a list of one string, or a "
                                              "non-empty list of token ids"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "prompt: takes one prompt per request"),
    ("completions", {"prompt": [5, 10**6]}, "prompt", "prompt: token ids must be in [0, "),
    ("completions", {"max_tokens": 3}, "prompt", "prompt: Field required"),
    ("completions", b'{"prompt": "caf\xe9 au lait"}', None, "the request body is not UTF-8: byte 0xe9 at position 15"),
    ("completions", b'{"prompt": "\\ud800"}', None, "unpaired surrogate escape"),
    ("completions", b'{"prompt": "hi", "temperature": NaN}', None, "NaN is not a JSON value"),
    ("completions", b'["hi"]', None, "the request body must be a JSON object"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server: Served, path: str, body, param: str | None,
                                                                 message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{path}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    if "context" in message:
        assert error["code"] == "context_length_exceeded"
    assert httpx.post(f"{server.url}/v1/chat/completions", json=GOOD_CHAT).json()["usage"]["completion_tokens"] == 2


def test_null_fields_are_left_out_as_openai_reads_them(server: Served) -> None:
    """Clients send `"n": null`, `"stream": null`, `"presence_penalty": null` for arguments left unset (the openai
    client, when a wrapper passes n=None): null is the field's default, as OpenAI reads it."""
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None, "top_logprobs": None,
             "parallel_tool_calls": None, "stop": None}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**GOOD_CHAT, **nulls, "temperature": 0})
    plain = httpx.post(f"{server.url}/v1/chat/completions", json={**GOOD_CHAT, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_the_official_client_raises_the_servers_error(server: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="ask for at most"):
        server.client().chat.completions.create(model="tiny", messages=SYSTEM_AND_QUESTION, max_tokens=500)


def test_unknown_endpoints_and_methods_are_openai_errors(server: Served) -> None:
    r = httpx.get(f"{server.url}/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such endpoint: GET /v1/engines"
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and "method not allowed" in r.json()["error"]["message"]


def test_an_api_key_is_required_when_the_server_has_one(chat_model, tok) -> None:
    with serving(chat_model, tok, api_key="s3cret") as s:
        for key in ("wrong", "s3cre"):
            with pytest.raises(openai.AuthenticationError, match="this server needs an API key"):
                s.client(api_key=key).models.list()
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and s.submitted == []
        assert s.client(api_key="s3cret").completions.create(model="tiny", prompt="hi", max_tokens=3).usage
        assert httpx.get(s.url + "/").status_code == 200  # the page holds no secret; its requests send the key


# ----------------------------------------------------------------------------- the command line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_eval_model_serves_a_lora_adapter_on_localhost_until_ctrl_c(chat_model, tok, tmp_path) -> None:
    """The command as a user runs it, on an adapter folder (base model + LoRA, merged when loaded)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    chat_model.save_pretrained(base)
    tok.save_pretrained(base)
    tuned = Transformer.from_pretrained(base)
    apply_lora(tuned, rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            layer.lora_B.weight.normal_(0, 0.05)  # B starts at zero: make the adapter change the answers
    save_adapter(tuned, adapter, base_model_path=str(base))
    stop, ids = stop_token_ids(tok, chat_model.config.eos_token_id), eval_model.encode_completion(tok, "Once upon a time")
    expected = greedy(merge_lora(tuned).eval(), tok, stop, ids, 12)[0]
    assert expected != greedy(chat_model, tok, stop, ids, 12)[0]

    port, log = free_port(), tmp_path / "log"
    cmd = [sys.executable, str(ROOT / "eval_model.py"), "--model_path", str(adapter), "--serve", "--port", str(port),
           "--device", "cpu", "--dtype", "float32"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "[serving" in log.read_text() or proc.poll() is not None, 120, "the server")
        assert f"chat page at http://127.0.0.1:{port}/" in log.read_text()  # this machine only, by default
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x").completions.create(
            model="whatever", prompt="Once upon a time", max_tokens=12, temperature=0)
        assert answer.model == str(adapter) and answer.choices[0].text == expected
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(30)
    assert proc.returncode in (0, 130) and "Traceback" not in log.read_text(), log.read_text()


def test_a_port_in_use_is_one_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"error: cannot listen on 127.0.0.1:{port} \\(Address already in use\\); "
                           "pass another --port or --host"):
            serve.app.listen("127.0.0.1", port)


@pytest.mark.parametrize("flags, message", [
    (["--port", "9000"], "--port is a setting of the server: add --serve"),
    (["--api_key", "k"], "--api_key is a setting of the server: add --serve"),
    (["--serve", "--prompt", "hi"], "--prompt does not go with --serve: clients send their own prompts"),
    (["--serve", "--mode", "chat"], "--mode does not go with --serve"),
    (["--serve", "--max_batch_size", "0"], "--max_batch_size 0: must be >= 1"),
    (["--serve", "--api_key", ""], '--api_key "": must be a non-empty key'),
])
def test_serve_flags_are_checked_before_loading(tmp_path, capsys, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        eval_model.main(["--model_path", str(tmp_path / "missing"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_readme_client_example_runs_against_the_server(endless: Served) -> None:
    """The README's openai example, as printed there, with only the server's address changed."""
    from test_readme import README, readme_blocks

    (block,) = [b for b in readme_blocks(README.read_text()) if "from openai import OpenAI" in b.code]
    assert block.marker[0] == "skip" and len(block.code.splitlines()) == 5
    code = block.code.replace("http://127.0.0.1:8000/v1", f"{endless.url}/v1")
    assert code != block.code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    assert endless.submitted[-1].finish_reason == "length"


# ----------------------------------------------------------------------------- the chat page, in a browser


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium through selenium. CI installs it (.ci/run); elsewhere a missing one skips."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing; .ci/run installs them before the tests")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from scripts.chat_screenshot import chromium

    driver = chromium(tmp_path / "profile")
    yield driver
    driver.quit()


def test_the_chat_page_streams_answers_and_carries_the_conversation(browser, tok) -> None:
    from selenium.webdriver.common.by import By

    with serving(endless_chat_model(tok), tok, step_delay=0.01) as s:
        browser.get(s.url + "/")
        page = browser.page_source
        assert not re.search(r"https?://", page), "the page must load nothing from elsewhere"

        def field(name: str, value: str) -> None:
            element = browser.find_element(By.ID, name)
            element.clear()
            element.send_keys(value)

        def state() -> str:
            return browser.execute_script("return document.body.dataset.state")

        def answers() -> list[str]:
            return browser.execute_script(
                "return [...document.querySelectorAll('.msg.assistant')].map((m) => m.textContent)")

        field("system", "be brief")
        field("temperature", "0")
        field("max_tokens", "1500")
        field("input", "hello there\n")  # Enter sends
        first = wait_for(lambda: state() == "streaming" and answers() and answers()[-1], 30, "streamed text")
        wait_for(lambda: state() == "streaming" and len(answers()[-1]) > len(first), 30, "more streamed text")
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: state() == "idle", 10, "the stop button to end the answer")
        reply = answers()[-1]
        request = s.submitted[-1]
        wait_for(lambda: request.finish_reason, 5, "the stopped answer's row to be freed")
        assert request.finish_reason == "cancelled" and len(request.tokens) < 1500 and len(reply) >= len(first)

        field("max_tokens", "5")
        field("input", "and a second question\n")
        wait_for(lambda: len(answers()) == 2 and state() == "idle", 30, "the second answer")
        second = s.submitted[-1]
        conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                        {"role": "assistant", "content": reply}, {"role": "user", "content": "and a second question"}]
        assert second.prompt == render_prompt(tok, conversation)[1]  # the second turn carries the first
        assert second.finish_reason == "length" and len(second.tokens) == 5 and answers()[-1]
        assert browser.find_element(By.ID, "input").get_attribute("value") == ""


def test_the_chat_page_leaves_out_the_oldest_exchange_when_the_context_is_full(browser, tok) -> None:
    """A chat longer than the model's context: the page leaves out its oldest exchange and asks again, as the
    terminal chat does, where every later message used to be answered with an error until New chat."""
    from selenium.webdriver.common.by import By

    with serving(endless_chat_model(tok, max_seq_len=CONTEXT), tok, max_tokens=CONTEXT) as s:
        browser.get(s.url + "/")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")

        def idle_with(n: int) -> bool:
            return browser.execute_script("return document.body.dataset.state") == "idle" and len(
                browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n

        browser.find_element(By.ID, "input").send_keys("hello there\n")
        wait_for(lambda: idle_with(1), 60, "the first answer, to the end of the context")
        first = s.submitted[-1]
        assert len(first.prompt) + len(first.tokens) == CONTEXT  # the answer took all the room the prompt left
        browser.find_element(By.ID, "input").send_keys("and a second question\n")
        wait_for(lambda: idle_with(2), 60, "the second answer")
        second = render_prompt(tok, [{"role": "user", "content": "and a second question"}])[1]
        assert s.submitted[-1].prompt == second and len(s.submitted) == 2  # the refused request never ran
        notes = browser.execute_script("return [...document.querySelectorAll('.meta')].map((m) => m.textContent)")
        assert notes[-1].startswith("2 earlier messages left out to fit the model's context")
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
