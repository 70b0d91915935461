"""Token-by-token sampling with a KV cache, as a Python generator (so callers can stream).

    for tokens in generate(model, prompt_ids, max_new_tokens=64, temperature=0.7, eos_token_id=eos):
        ...  # tokens: LongTensor [B], the next token of every row

The prompt is run once (prefill), then each step feeds only the newest token. Batched
prompts are left-padded with an attention_mask, so every row's next token lands in the
same column and one KV cache serves the batch (what GRPO needs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .decode import CPUDecodeStep
from .model import KVCache, Transformer


DEFAULT_MAX_NEW_TOKENS = 256


def answer_budget(context: int, max_new_tokens: int | None) -> tuple[int, str | None]:
    """Tokens to generate per answer in a model of `context` positions, and a note when the default was shrunk.

    None (no explicit choice) means DEFAULT_MAX_NEW_TOKENS, or half the context when that leaves a prompt less
    room: a small model's answers then fit beside their prompt. An explicit length that leaves no room for a
    prompt is an error, since the user asked for something this model cannot do.
    """
    if max_new_tokens is None:
        budget = min(DEFAULT_MAX_NEW_TOKENS, context // 2)
        note = None if budget == DEFAULT_MAX_NEW_TOKENS else (
            f"max_new_tokens {budget} (half of the model's {context}-token context, leaving the rest for the prompt)")
        return budget, note
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context}-token context; use at most {context - 1}")
    return max_new_tokens, None


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 = greedy; top_k 0 / top_p 1.0 = off."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus: keep the smallest set of most-likely tokens whose probability reaches top_p.
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already exceeds top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style (as HF): seen tokens' positive logits are divided by penalty, negative ones multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@torch.inference_mode()
def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] LongTensor), one step at a time.

    input_ids: [B, T] (or [T]) prompt, left-padded when rows differ in length, with attention_mask
        [B, T] (1 = real token). Stops after max_new_tokens or once every row has produced an eos;
        rows that already finished get pad_token_id (default: the first eos id).
    The model is used as is: call model.eval() first (dropout, MoE aux loss are training-only).
    Yielded tensors are inference tensors; torch.stack/cat them before using them in autograd.
    compile: run the one-token decode step through torch.compile (dynamic shapes: one graph for every cache
        length and batch size). The step is many small ops whose Python dispatch rivals the bandwidth-bound
        matmuls at batch 1; compiled, they become a few fused kernels, after a one-off compilation (quick when
        Inductor's cache already has it).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("generate needs at least one prompt token (start from bos_token_id)")
    if max_new_tokens <= 0:
        return
    if T + max_new_tokens > model.config.max_seq_len:  # positions past the context were never trained
        raise ValueError(f"a {T}-token prompt + max_new_tokens {max_new_tokens} exceed the model's "
                         f"{model.config.max_seq_len}-token context; shorten the prompt or max_new_tokens")
    device = input_ids.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    total = T + max_new_tokens
    cache = KVCache(model.config, B, total, device=device, dtype=model.lm_head.weight.dtype)
    # One pre-allocated mask for the whole run; each forward sees the prefix written so far.
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.ones(B, total, dtype=torch.bool, device=device)
        full_mask[:, :T] = attention_mask.bool()
    seen = None
    if repetition_penalty != 1.0:
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.long, device=device)
        seen = seen.scatter_add_(1, input_ids, prompt_mask) > 0  # padding never counts as "seen"

    mask = full_mask[:, :T] if full_mask is not None else None
    logits = model(input_ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1).logits[:, -1]
    step_model = torch.compile(model, dynamic=True) if compile else model  # the prefill stays eager
    # A frozen bf16 model on a CPU: the same step written out (model/decode.py), with far fewer calls.
    fast_step = None if compile else CPUDecodeStep.build(model, B)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, pad)
        if len(eos):
            finished |= torch.isin(token, eos)
        yield token
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        mask = full_mask[:, : cache.length + 1] if full_mask is not None else None
        if fast_step is not None:
            logits = fast_step(token, cache, attention_mask=mask)
        else:
            logits = step_model(token[:, None], attention_mask=mask, kv_cache=cache).logits[:, -1]


def generate_answers(
    model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
    stop_token_ids: list[int], temperature: float = 0.0, **sampling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole batch of answers at once: (tokens [B, C], mask [B, C]) with C <= max_new_tokens.

    mask is 1 for each row's tokens up to AND including its first stop token (the end of turn the model
    produced, which RL and SFT both train), 0 after it; a row without a stop token was cut at max_new_tokens.
    """
    steps = list(generate(model, input_ids, max_new_tokens, temperature=temperature, eos_token_id=stop_token_ids,
                          attention_mask=attention_mask, **sampling))
    if not steps:
        empty = torch.zeros((input_ids.shape[0], 0), dtype=torch.long, device=input_ids.device)
        return empty, empty
    tokens = torch.stack(steps, dim=1)
    is_stop = torch.isin(tokens, torch.tensor(stop_token_ids, device=tokens.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stop tokens strictly before each position
    return tokens, (stops_before == 0).long()


class Detokenizer:
    """The text of a growing list of token ids, piece by piece, each piece whole characters.

    A byte-level BPE token can end inside a multi-byte UTF-8 character (a Chinese character or an emoji is 3-4
    bytes, often split over tokens), so the decoded text then ends in U+FFFD: those bytes are held back until
    the character completes, as transformers' TextStreamer does. Bytes that can never complete a character (a
    model may emit a lead byte followed by plain text) are dropped rather than printed as U+FFFD. The growing
    id list is decoded whole, since decoding tokens one by one would also lose SentencePiece's leading spaces.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token: int) -> str:
        """The new whole characters that `token` completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
            return ""
        text = text.replace("\ufffd", "")
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        return piece


def decode_stream(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """The text of a stream of token ids, piece by piece, each piece whole characters (see Detokenizer)."""
    detokenizer = Detokenizer(tokenizer)
    for token in token_ids:
        if piece := detokenizer.push(token):
            yield piece
