#!/usr/bin/env python
"""Serving: concurrent clients against `eval_model.py --serve` vs the same requests one after another.

For each number of clients (1, 4, 8, 16), that many clients send one streamed /v1/completions request each, all
at once: a ~32-token prompt (a piece of the shipped corpus) and exactly --new_tokens new tokens (greedy; the model
is the default one, randomly initialised, with its stop tokens' output rows zeroed so that greedy decoding never
stops early; every answer's usage is checked). The server is a separate process, as a user runs it. Reported:

  new tokens/s     all clients' new tokens over the wall time from the first request to the last token
  TTFT p50, p95    time to first token: from sending a request to receiving its first text
  inter-token      a client's time per token after its first (median over clients)

Baseline: the same requests served one after another by eval_model.py's loop (model/generate.py, streamed
through the same detokenizer), in the same dtype and thread count; all arrive at once, so a request's time to
first token includes the requests before it. Targets on a CPU: 8 clients >= 4x one client's tokens/s, and a
time to first token below 1 s at 8 clients. Rounds alternate baseline and server; tokens/s is the median over
rounds, the latencies pool every request of every round. "same text" compares each greedy answer with the
baseline's (equal in fp32; in bf16 a batch's other matmul shapes round differently, and a near-tie can flip).

    python bench/serving.py                   # the default model (preset small), CPU, 1/4/8/16 clients
    python bench/serving.py --record          # append the table to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import HelpFormatter, CONFIGS, ROOT, load_after, machine_line, model_config, report
from data import load_tokenizer, stop_token_ids
from eval_model import REPO_TOKENIZER, answer_tokens, encode_completion
from model import Transformer, generate
from model.generate import decode_stream
from trainer.distributed import resolve_device, resolve_dtype


@dataclass
class Timing:
    sent: float
    first: float  # the first text
    last: float  # the last text
    tokens: int
    text: str


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prompts(tokenizer, n: int, length: int) -> list[str]:
    """n prompts of about `length` tokens: consecutive pieces of the shipped corpus."""
    text = " ".join(json.loads(line)["text"] for line in (ROOT / "dataset" / "pretrain.jsonl").open().readlines()[:50])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i * length:(i + 1) * length]) for i in range(n)]


def never_stopping_model(config, tokenizer, folder: Path) -> None:
    """A random model whose stop tokens score 0 while some other token always scores more (greedy never stops)."""
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for stop in stop_token_ids(tokenizer, config.eos_token_id):
            model.lm_head.weight[stop] = 0.0  # tied: the input embedding too (a zero vector in, harmless)
    model.save_pretrained(folder)


async def client_round(url: str, texts: list[str], new_tokens: int) -> list[Timing]:
    import httpx

    async def one(client: httpx.AsyncClient, prompt: str) -> Timing:
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent, first, last, tokens, pieces = time.perf_counter(), None, None, 0, []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(chunk["choices"][0]["text"])
        return Timing(sent, first, last, tokens, "".join(pieces))

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(texts))) as client:
        return list(await asyncio.gather(*(one(client, t) for t in texts)))


def baseline_round(model: Transformer, tokenizer, texts: list[str], new_tokens: int, stop: list[int]) -> list[Timing]:
    """eval_model.py's loop, one request after another; every request arrived at the start."""
    start, out = time.perf_counter(), []
    for text in texts:
        ids = torch.tensor([encode_completion(tokenizer, text)], device=model.lm_head.weight.device)
        first = last = None
        pieces = []
        for piece in decode_stream(tokenizer, answer_tokens(generate(model, ids, new_tokens, temperature=0,
                                                                     eos_token_id=stop), stop)):
            last = time.perf_counter()
            first = first or last
            pieces.append(piece)
        # new_tokens each: the model never stops early (never_stopping_model)
        out.append(Timing(start, first, last, new_tokens, "".join(pieces)))
    return out


def summary(rounds: list[list[Timing]]) -> tuple[float, float, float, float]:
    """(new tokens/s: median over rounds, TTFT p50, TTFT p95, inter-token seconds: median over requests)."""
    rates = [sum(t.tokens for t in r) / (max(t.last for t in r) - min(t.sent for t in r)) for r in rounds]
    ttft = [t.first - t.sent for r in rounds for t in r]
    itl = [(t.last - t.first) / (t.tokens - 1) for r in rounds for t in r]
    return statistics.median(rates), percentile(ttft, 0.5), percentile(ttft, 0.95), statistics.median(itl)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="small", choices=CONFIGS, help="model dimensions (bench/common.py CONFIGS)")
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--new_tokens", type=int, default=128, help="new tokens per request")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per request (about)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="eval_model.py's --dtype")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (each runs the baseline and the server once)")
    p.add_argument("--port", type=int, default=8799, help="local port of the server")
    p.add_argument("--record", action="store_true", help="append the result table to bench/RESULTS.md")
    args = p.parse_args()

    counts = [int(c) for c in args.clients.split(",")]
    device = resolve_device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(REPO_TOKENIZER)
    config = model_config(args.config)
    stop = stop_token_ids(tokenizer, config.eos_token_id)
    texts = prompts(tokenizer, max(counts), args.prompt_len)
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as folder:
        never_stopping_model(config, tokenizer, Path(folder))
        model = Transformer.from_pretrained(folder, device=device, dtype=dtype).eval().requires_grad_(False)
        log = Path(folder) / "server.log"
        with open(log, "w") as out:
            server = subprocess.Popen(
                [sys.executable, str(ROOT / "eval_model.py"), "--model_path", folder, "--serve", "--port",
                 str(args.port), "--device", "cpu", "--dtype", args.dtype, "--max_batch_size", str(max(counts))],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            while "[serving" not in log.read_text():
                if server.poll() is not None:
                    raise SystemExit(f"error: the server did not start:\n{log.read_text()}")
                time.sleep(0.2)
            asyncio.run(client_round(url, texts[:2], 8))  # warm-up: allocator, kernels, connections
            baseline_round(model, tokenizer, texts[:1], 8, stop)
            results: dict[tuple[str, int], list[list[Timing]]] = {}
            for _ in range(args.rounds):
                for n in counts:
                    results.setdefault(("baseline", n), []).append(
                        baseline_round(model, tokenizer, texts[:n], args.new_tokens, stop))
                    served = asyncio.run(client_round(url, texts[:n], args.new_tokens))
                    short = [t.tokens for t in served if t.tokens != args.new_tokens]
                    if short:
                        raise SystemExit(f"error: answers of {short} tokens, not {args.new_tokens}: the model stopped")
                    results.setdefault(("server", n), []).append(served)
        finally:
            server.terminate()
            server.wait(30)

    stats = {key: summary(rounds) for key, rounds in results.items()}
    one = {kind: stats[(kind, counts[0])][0] for kind in ("baseline", "server")}
    labels = {"baseline": "eval_model loop, one after another", "server": "eval_model --serve (one batch)"}
    rows = []
    for n in counts:
        alone = [t.text for t in results[("baseline", n)][0]]
        for kind in ("baseline", "server"):
            rate, p50, p95, itl = stats[(kind, n)]
            same = sum(t.text == a for r in results[(kind, n)] for t, a in zip(r, alone))
            rows.append(f"| {n} | {labels[kind]} | {rate:,.0f} | {rate / one[kind]:.2f}x | {p50:.3f} | {p95:.3f} | "
                        f"{itl * 1000:.1f} | {same}/{n * len(results[(kind, n)])} |")
    lines = [f"serving, config {args.config}, cpu, {str(dtype).removeprefix('torch.')}, greedy, ~{args.prompt_len}-token "
             f"prompts + {args.new_tokens} new tokens per client, streamed /v1/completions, {args.rounds} rounds — "
             f"{machine_line(device)} ({load_after()}); server and baseline at the same thread count", "",
             "| clients | served by | new tokens/s | vs 1 client | TTFT p50 (s) | TTFT p95 (s) | inter-token (ms) | "
             "same text as one at a time |",
             "|---|---|---|---|---|---|---|---|", *rows]
    if 8 in counts and counts[0] == 1:
        gain, p95 = stats[("server", 8)][0] / one["server"], stats[("server", 8)][2]
        lines += ["", f"Targets: 8 clients get {gain:.2f}x one client's tokens/s (target >= 4x: "
                  f"{'met' if gain >= 4 else 'missed'}); time to first token at 8 clients p95 {p95:.3f} s "
                  f"(target < 1 s: {'met' if p95 < 1 else 'missed'})."]
    report(lines, args.record)


if __name__ == "__main__":
    main()
