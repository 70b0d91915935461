"""Continuous batching: many generations share one decode loop and one preallocated KV cache.

    engine = Engine(model, max_batch_size=16)
    engine.start()                                   # the decode loop, on a thread of its own
    engine.submit(Request(prompt_ids, max_new_tokens=128, on_token=print))   # from any thread
    engine.cancel(request)                           # its row is freed before the next step

generate() (model/generate.py) runs a fixed batch from start to end: every row begins together and the
batch lasts as long as its longest answer. A server's requests arrive and finish at any time, so here
each request owns one row of the cache only while it runs. One step of the loop:

    admit    a waiting request takes the next free row; its prompt is run alone (prefill) into that row,
             and its first token sampled
    decode   every running row feeds its newest token, all rows in one forward; each row has its own
             length, so each feeds its own position and sees only its own columns of the cache
    finish   a row that produced a stop token or reached max_new_tokens leaves; the last row moves into
             its place, so the running rows stay rows 0..n-1 and every forward slices one block of the cache

A request's tokens do not depend on what else runs: its prompt is prefilled alone, and in a decode step
each row attends to exactly its own keys, at its own positions, as it would alone (batched greedy output
equals solo output; tests/test_engine.py checks it token by token). Sampling is per request, with the
request's own random generator when it has a seed.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .decode import CPUDecodeStep
from .generate import apply_repetition_penalty, sample_next_token
from .model import Transformer


class RowKVCache:
    """Keys/values of max_batch_size requests, one row each, every row with its own length.

    The buffers are [max_batch_size, n_kv_heads, max_len, head_dim] per layer, allocated once. The model's
    forward uses it as it uses a KVCache (length, update, advance) on the rows `select` chose:
      prefill:  one row of length 0 and its T prompt tokens: columns 0..T-1, plainly causal;
      decode:   rows 0..n-1 and one new token each: row b writes column lengths[b]. `length` is the longest
                row's, so the forward sees length + 1 columns; the engine's attention_mask lets row b see
                columns 0..lengths[b] only (a shorter row's later columns hold a former request's keys).
    """

    def __init__(self, config: ModelConfig, max_batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (max_batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.lengths = [0] * max_batch_size  # positions written in each row
        self.rows = slice(0, 0)  # the rows of the next forward
        self.length = 0  # the longest of those rows: the forward's number of cached columns
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, rows: slice, new_tokens: int) -> None:
        """The next forward runs `rows` (a block of rows), each appending `new_tokens` after its own length."""
        lengths = self.lengths[rows]
        if max(lengths) + new_tokens > self.max_len:
            raise ValueError(f"RowKVCache is full: {max(lengths) + new_tokens} positions needed, max_len={self.max_len}")
        device = self.k[0].device
        row_ids = torch.arange(rows.start, rows.stop, device=device)[:, None]  # [n, 1]
        cols = torch.tensor(lengths, device=device)[:, None] + torch.arange(new_tokens, device=device)  # [n, T]
        self.rows, self.length, self._index = rows, max(lengths), (row_ids, cols)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new k/v ([n, heads, T, head_dim]) at each row's own columns; return the rows'
        keys/values over the columns the forward sees."""
        row_ids, cols = self._index
        self.k[layer][row_ids, :, cols] = k.transpose(1, 2)  # the indexed view is [n, T, heads, head_dim]
        self.v[layer][row_ids, :, cols] = v.transpose(1, 2)
        end = self.length + k.shape[2]
        return self.k[layer][self.rows, :, :end], self.v[layer][self.rows, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer wrote its n new positions."""
        for row in range(self.rows.start, self.rows.stop):
            self.lengths[row] += n

    def move(self, src: int, dst: int) -> None:
        """Row src's keys/values and length become row dst's."""
        n = self.lengths[src]
        for buffers in (self.k, self.v):
            for layer in buffers:
                layer[dst, :, :n] = layer[src, :, :n]
        self.lengths[dst] = n


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps requests in sets and lists
class Request:
    """One generation: a prompt, how to sample its continuation, and where its tokens go.

    on_token(token) is called for every generated token, stop token included, and on_finish(reason) once at
    the end; both on the engine's thread, so they should only hand the value on (e.g. to an event loop).
    The engine also appends the tokens to `tokens` and sets `finish_reason`: "stop" (a stop token was
    generated, the last of `tokens`), "length" (max_new_tokens reached), "cancelled", or "error" (then
    `error` says what went wrong).
    """
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: Collection[int] = ()
    seed: int | None = None  # its own random generator, so its samples do not depend on the other rows
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[[str], None] | None = None
    tokens: list[int] = field(default_factory=list, init=False)
    finish_reason: str | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False)  # [1, vocab]: for repetition_penalty


class Engine:
    """The decode loop of continuous batching (see the module docstring).

    submit and cancel may be called from any thread; step runs one step on the calling thread, and start runs
    steps on a thread of its own until close. run(requests) is the synchronous form: submit, step until done.
    """

    def __init__(self, model: Transformer, max_batch_size: int = 16, max_len: int | None = None) -> None:
        """model: in eval mode, on its device and dtype. max_len: positions per row (default: the model's
        context); the cache holds max_batch_size x max_len positions per layer."""
        self.model = model
        self.max_batch_size = max_batch_size
        param = model.lm_head.weight
        self.device = param.device
        self.cache = RowKVCache(model.config, max_batch_size, max_len or model.config.max_seq_len, param.device,
                                param.dtype)
        # A frozen bf16 model on a CPU: the decode step written out (model/decode.py), its packed weights taken now
        # (a server's weights never change).
        with torch.inference_mode():
            self.fast_step = CPUDecodeStep.build(model, max_batch_size)
        self.running: list[Request] = []  # running[i] owns cache row i
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Request] = set()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------------------- any thread

    def submit(self, request: Request) -> None:
        """Queue a request: it joins the batch at the next step with a free row. A prompt that cannot fit is
        a ValueError here, on the caller's thread."""
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token (start from bos_token_id)")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {request.max_new_tokens}: must be >= 1")
        if len(request.prompt) + request.max_new_tokens > self.cache.max_len:
            raise ValueError(f"a {len(request.prompt)}-token prompt + max_new_tokens {request.max_new_tokens} "
                             f"exceed the {self.cache.max_len} positions of a row")
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (a client hung up): its row is freed before the next step. A finished one is left as is."""
        with self._wakeup:
            self._cancelled.add(request)
            self._wakeup.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()

    # ----------------------------------------------------------------------------- the loop

    def run(self, requests: Iterable[Request]) -> None:
        """Generate all `requests` on this thread, batched (their tokens end up in request.tokens)."""
        requests = list(requests)
        for r in requests:
            self.submit(r)
        while any(r.finish_reason is None for r in requests):
            self.step()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._closed or self._waiting or self._cancelled or self.running):
                    self._wakeup.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                traceback.print_exc(file=sys.stderr)
                for r in list(self.running):
                    self._finish(r, "error", f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """One step: drop cancelled requests, admit waiting ones into free rows (prefill), decode all rows."""
        with self._wakeup:
            cancelled, self._cancelled = self._cancelled, set()
            for r in cancelled:
                if r in self._waiting:
                    self._waiting.remove(r)
            admitted = []
            while self._waiting and len(self.running) + len(admitted) < self.max_batch_size:
                admitted.append(self._waiting.popleft())
        for r in cancelled:
            if r.finish_reason is None:
                self._finish(r, "cancelled")
        if admitted:
            first = len(self.running)
            self.running += admitted  # rows first, so that a failing forward fails these requests too
            logits = torch.cat([self._prefill(first + i, r) for i, r in enumerate(admitted)])
            self._emit(admitted, logits)
        if self.running:
            self._decode()

    def _prefill(self, row: int, r: Request) -> torch.Tensor:
        """Run a request's prompt alone into its (empty) row; the logits [1, vocab] of its first token."""
        if r.seed is not None:
            r._generator = torch.Generator(self.device).manual_seed(r.seed)
        prompt = torch.tensor([r.prompt], device=self.device)
        if r.repetition_penalty != 1.0:
            r._seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            r._seen[0, prompt[0]] = True
        self.cache.select(slice(row, row + 1), prompt.shape[1])
        return self.model(prompt, kv_cache=self.cache, logits_to_keep=1).logits[:, -1]

    def _decode(self) -> None:
        """One token for every running row, in one forward."""
        n = len(self.running)
        self.cache.select(slice(0, n), 1)
        positions = torch.tensor(self.cache.lengths[:n], device=self.device)[:, None]  # [n, 1]: each row's next
        columns = torch.arange(self.cache.length + 1, device=self.device)
        mask = columns[None, :] <= positions  # [n, length + 1]: row b sees its own columns 0..lengths[b]
        tokens = torch.tensor([r.tokens[-1] for r in self.running], device=self.device)
        if self.fast_step is not None:
            logits = self.fast_step(tokens, self.cache, attention_mask=mask, position_ids=positions)
        else:
            logits = self.model(tokens[:, None], attention_mask=mask, position_ids=positions,
                                kv_cache=self.cache).logits[:, -1]
        self._emit(list(self.running), logits)

    def _emit(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of logits [n, vocab], hand it on, finish those done."""
        picks = []
        for i, r in enumerate(requests):
            row = logits[i:i + 1]
            if r._seen is not None:
                row = apply_repetition_penalty(row.float(), r._seen, r.repetition_penalty)
            picks.append(sample_next_token(row, r.temperature, r.top_k, r.top_p, r._generator))
        for r, token in zip(requests, torch.cat(picks).tolist()):  # one device sync for all rows
            r.tokens.append(token)
            if r._seen is not None:
                r._seen[0, token] = True
            if r.on_token is not None:
                r.on_token(token)
            if token in r.stop_token_ids:
                self._finish(r, "stop")
            elif len(r.tokens) == r.max_new_tokens:
                self._finish(r, "length")

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """Free the request's row (the last running row moves into it) and tell the request."""
        if r in self.running:
            row, last = self.running.index(r), len(self.running) - 1
            if row != last:
                self.cache.move(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
            self.cache.lengths[last] = 0  # free
        r.finish_reason, r.error = reason, error
        r._seen = None
        if r.on_finish is not None:
            r.on_finish(reason)
