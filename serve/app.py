"""The HTTP side of `eval_model.py --serve`: OpenAI's API over the batching engine, and a chat page.

    GET  /                       the chat page (serve/page.html: one file, nothing fetched from elsewhere)
    GET  /v1/models              the one model served (and /v1/models/{its id})
    POST /v1/chat/completions    messages, rendered with the model's chat template
    POST /v1/completions         a plain prompt (text, or token ids), continued

Each request becomes one model/engine.py Request; the engine's thread runs every request in one decode loop
and hands the tokens to the event loop, where they become text (whole characters, stop strings cut) and are
sent as they come (server-sent events in OpenAI's chunk format) or as one JSON answer. A client that hangs
up cancels its request, which frees its row of the KV cache before the engine's next step.

Answer length: a request without max_tokens gets the server's default, shrunk to what its prompt leaves of
the model's context; an explicit max_tokens that does not fit beside the prompt is an error (400), as is a
prompt that fills the context (eval_model.py's rule: a default adapts, an explicit choice is not changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from data import render_prompt
from model.engine import Engine
from model.engine import Request as EngineRequest
from model.generate import Detokenizer

from .protocol import ApiError, ChatRequest, CompletionRequest, RequestBody, StopStrings, parse_body

PAGE = Path(__file__).resolve().parent / "page.html"
T = TypeVar("T")


@dataclass
class Defaults:
    """What a request gets for the fields it leaves out (eval_model.py's sampling flags); top_k and
    repetition_penalty have no OpenAI field, so they apply to every request."""
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_tokens: int  # shrunk to fit beside the prompt


class Answer:
    """One request's answer on the event loop: the engine's tokens as text, stop strings applied.

    `pieces()` submits the request and yields its text as it comes; afterwards `finish_reason` ("stop" or
    "length") and `completion_tokens` (tokens generated, a stop token included) are set. However the
    iteration ends (done, a stop string, the client gone), the request is cancelled in the engine: a no-op
    when it finished, and its row freed when it did not.
    """

    def __init__(self, engine: Engine, request: EngineRequest, tokenizer, stop_ids: list[int],
                 stops: list[str]) -> None:
        self.engine, self.request, self.stop_ids = engine, request, stop_ids
        self.detokenizer, self.stops = Detokenizer(tokenizer), StopStrings(stops)
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request.on_token = lambda token: loop.call_soon_threadsafe(self.queue.put_nowait, token)
        request.on_finish = lambda reason: loop.call_soon_threadsafe(self.queue.put_nowait, None)
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    async def pieces(self) -> AsyncIterator[str]:
        self.engine.submit(self.request)
        try:
            while (token := await self.queue.get()) is not None:
                self.completion_tokens += 1
                if token in self.stop_ids:
                    continue  # the end of the answer, not part of its text; the engine finishes it now
                text, reached = self.stops.feed(self.detokenizer.push(token))
                if text:
                    yield text
                if reached:
                    self.finish_reason = "stop"
                    return
            if self.request.finish_reason == "error":
                raise ApiError(500, f"generation failed: {self.request.error}", kind="server_error")
            if tail := self.stops.flush():
                yield tail
            self.finish_reason = self.request.finish_reason
        finally:
            self.cancel()

    def cancel(self) -> None:
        self.engine.cancel(self.request)

    def usage(self) -> dict[str, int]:
        prompt = len(self.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


class HungUp(Exception):
    """The client closed the connection before its request's body had arrived: nobody to answer."""


async def request_body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:
        raise HungUp from None


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client hangs up first (then `work` is cancelled)."""

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(hangup())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(engine: Engine, tokenizer, stop_ids: list[int], model_id: str, defaults: Defaults,
              api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model (the engine's thread is started and closed by the caller)."""
    from eval_model import encode_completion  # the rule eval_model.py starts a continuation with

    context = engine.cache.max_len
    created = int(time.time())
    # Prompts are rendered and tokenized off the event loop (a long one takes seconds, and every other client's
    # stream would wait), one at a time: a fast tokenizer is not to be used by two threads at once.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    page = PAGE.read_text(encoding="utf-8")
    app = FastAPI(title="Zero2LLM", docs_url=None, redoc_url=None, openapi_url=None)  # /docs would need a CDN

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HungUp)
    async def hung_up(request: Request, e: HungUp) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": logged as one line, not a traceback

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {404: f"no such endpoint: {where}", 405: f"method not allowed: {where}"}.get(e.status_code, e.detail)
        return JSONResponse(ApiError(e.status_code, str(message)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        error = ApiError(500, f"the server failed on this request: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY' with "
                           "the key it was started with (--api_key)", code="invalid_api_key")

    def answer_length(requested: int | None, prompt_tokens: int, param: str) -> int:
        """The request's max_tokens, or the default shrunk to fit; an ApiError when the prompt leaves too little."""
        room, what = context - prompt_tokens, "conversation" if param == "messages" else "prompt"
        if room < 1:
            raise ApiError(400, f"the {what} is {prompt_tokens} tokens and the model's context is {context}: no "
                           f"room is left for an answer; shorten the {param}", param=param,
                           code="context_length_exceeded")
        if requested is None:
            return min(defaults.max_tokens, room)
        if requested > room:
            raise ApiError(400, f"max_tokens {requested} + the {prompt_tokens}-token {what} exceed the model's "
                           f"{context}-token context; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return requested

    def start(body: ChatRequest | CompletionRequest, prompt: list[int], param: str) -> Answer:
        request = EngineRequest(
            prompt, answer_length(body.answer_tokens(), len(prompt), param),
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k, repetition_penalty=defaults.repetition_penalty,
            stop_token_ids=stop_ids, seed=body.seed,
        )
        return Answer(engine, request, tokenizer, stop_ids, body.stop_strings())

    async def respond(request: Request, body: RequestBody, answer: Answer, chat: bool) -> Response:
        """The answer streamed as server-sent events, or whole as one JSON object."""
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_id}

        def choice(text: str | None, finish_reason: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            if delta:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                        "finish_reason": finish_reason}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}

        if not body.stream:
            pieces = await until_disconnected(request, collect(answer.pieces()))
            if pieces is None:  # the client is gone: nobody reads this
                return Response(status_code=499)
            return JSONResponse({**head, "object": kind, "choices": [choice("".join(pieces), answer.finish_reason,
                                                                           False)], "usage": answer.usage()})

        chunk = {**head, "object": f"{kind}.chunk" if chat else kind}

        async def events() -> AsyncIterator[str]:
            if chat:
                yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            try:
                async for text in answer.pieces():
                    yield sse({**chunk, "choices": [choice(text, None, True)]})
            except ApiError as e:  # the status line is sent already: the error is the stream's last event
                yield sse(e.body())
                return
            yield sse({**chunk, "choices": [choice(None, answer.finish_reason, True)]})
            if body.include_usage():
                yield sse({**chunk, "choices": [], "usage": answer.usage()})
            yield sse("[DONE]")

        # The background task runs however the stream ends, a hang-up included (answer.pieces() cancels too,
        # when the hang-up finds it waiting for a token).
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(answer.cancel),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    card = {"id": model_id, "object": "model", "created": created, "owned_by": "zero2llm"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_id!r}", param="model",
                           code="model_not_found")
        return card

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request_body(request), ChatRequest)
        if not tokenizer.chat_template:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            prompt = (await off_loop(render_prompt, tokenizer, [m.as_chat() for m in body.messages]))[1]
        except Exception as e:  # the template's own raise_exception (say, roles out of order), or a Jinja error
            raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        return await respond(request, body, start(body, prompt, "messages"), chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        body = parse_body(await request_body(request), CompletionRequest)
        prompt = body.text_or_ids()
        if isinstance(prompt, str):
            prompt = await off_loop(encode_completion, tokenizer, prompt)
        elif not all(0 <= i < engine.model.config.vocab_size for i in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {engine.model.config.vocab_size})", param="prompt")
        return await respond(request, body, start(body, prompt, "prompt"), chat=False)

    return app


async def collect(pieces: AsyncIterator[str]) -> list[str]:
    return [piece async for piece in pieces]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a port already taken is one clear error. Opened before the model loads,
    so that the error comes at once; a client that connects meanwhile waits in the socket's queue."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while attempting")[0]  # "Address already in use", without the call
        raise SystemExit(f"error: cannot listen on {host}:{port} ({reason}); pass another --port or --host") from None


def server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "info") -> uvicorn.Server:
    """The uvicorn server of `app` (host and port: what its start-up line says; it serves the socket it is
    given). Ctrl-C, or should_exit, stops it, letting open streams end for 2 s."""
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2))


def run(engine: Engine, tokenizer, stop_ids: list[int], model_id: str, defaults: Defaults, sock: socket.socket,
        api_key: str | None) -> None:
    """Serve on `sock` (listen()) until Ctrl-C: the engine's thread decodes, uvicorn's event loop answers."""
    app = build_app(engine, tokenizer, stop_ids, model_id, defaults, api_key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    engine.start()
    print(f"[serving {model_id}: chat page at http://{shown}:{port}/, OpenAI API at http://{shown}:{port}/v1 "
          f"(up to {engine.max_batch_size} requests at once); Ctrl-C stops]", flush=True)
    try:
        server(app, host, port).run(sockets=[sock])
    finally:
        engine.close()
