"""Conversations: checking chat messages, rendering them with the tokenizer's chat template, and finding the
assistant's tokens in the rendering (the tokens SFT and DPO train on)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .records import BadRecord, DataError, check_text

CHAT_ROLES = ("system", "user", "assistant")
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")  # a chat template's assistant-token marks


def chat_tokenizer(tokenizer, path: str | Path, mode: str):
    """The tokenizer for a chat data file, after checking the file exists and the tokenizer can render chats."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file")
    if not tokenizer.chat_template:
        raise DataError(f"the tokenizer ({tokenizer.name_or_path}) has no chat_template; {mode} needs one")
    return tokenizer


def chat_messages(conv: object, field: str, path: Path, line_no: int) -> list[dict[str, str]]:
    """A checked list of {"role", "content"} messages (the value of `field` of one line): string values, known
    roles, a system message only first. The one check of every chat format (SFT, DPO, GRPO prompts)."""
    if not isinstance(conv, list) or not conv:
        raise BadRecord(path, line_no, f"'{field}' must be a non-empty list of {{\"role\", \"content\"}} messages",
                        f"bad '{field}'")
    messages = []
    for i, m in enumerate(conv, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord(path, line_no, f"message {i} must be an object {{\"role\": \"...\", \"content\": "
                            f"\"...\"}} with string values", "malformed message")
        if m["role"] not in CHAT_ROLES:
            raise BadRecord(path, line_no, f"message {i} has role {m['role']!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}", "unknown role")
        if m["role"] == "system" and i > 1:
            raise BadRecord(path, line_no, f"message {i} is a system message; only the first message may be one",
                            "late system message")
        messages.append({"role": m["role"], "content": check_text(m["content"], path, line_no)})
    return messages


def render_chat(tokenizer, messages: list[dict[str, str]], path: Path, line_no: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation rendered with the chat template, and the mask of the assistant's tokens.

    The mask covers what the assistant says: its reply and the end-of-turn token that closes it (<|im_end|>,
    <|eot_id|>; so the model learns to stop), never the role header ("<|im_start|>assistant\n"), nor
    system/user turns. A template with {% generation %} blocks marks those tokens itself
    (return_assistant_tokens_mask); the templates real models ship (Qwen, Llama) have none, and are read
    by rendering prefixes instead (assistant_spans). The one place SFT and DPO get their masks from."""
    if not GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        return _render_chat_by_prefixes(tokenizer, messages, path, line_no)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"], dtype=np.int32)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    if not mask.any():
        raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} marks no "
                        f"assistant tokens; it needs {{% generation %}} ... {{% endgeneration %}} around "
                        f"assistant replies (see tokenizer/tokenizer_config.json)")
    return ids, mask


def assistant_spans(tokenizer, messages: list[dict[str, str]], path: Path, line_no: int
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply in it, for templates without
    {% generation %} marks.

    For assistant message i: `before` = messages[:i] rendered with the generation prompt (ends with the
    assistant header), `upto` = messages[:i+1] rendered. The reply is upto[len(before):] minus trailing
    whitespace (ChatML's "\n" after <|im_end|> is the next turn's business). That needs the template to be
    prefix-stable: `before` a prefix of `upto` and of the whole rendering. Templates that render a reply
    differently once later turns follow (Qwen3 drops the <think> block of earlier replies) are still read
    when the reply's content and closing text appear right there; anything else is refused, naming the line.
    """
    name = tokenizer.name_or_path

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise DataError(f"{path} line {line_no}: the chat template of {name} fails on this conversation: "
                            f"{type(e).__name__}: {e}") from None

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1], False)
        reply = upto[len(before):].rstrip()
        start = len(before)
        if upto.startswith(before) and full.startswith(before):
            if full.startswith(reply, start):
                spans.append((start, start + len(reply)))
                continue
            content = message["content"]
            at, closing = full.find(content, start), reply[reply.rfind(content) + len(content):]
            if content and content in reply and at >= 0 and full.startswith(closing, at + len(content)):
                spans.append((start, at + len(content) + len(closing)))
                continue
        raise DataError(f"{path} line {line_no}: the chat template of {name} is not prefix-stable: the conversation "
                        f"rendered up to assistant message {i + 1} is not how the whole conversation renders it, so "
                        f"its tokens cannot be told apart. Put {{% generation %}} ... {{% endgeneration %}} around "
                        f"assistant replies in the template (tokenizer_config.json's chat_template)")
    return full, spans


def _render_chat_by_prefixes(tokenizer, messages: list[dict[str, str]], path: Path, line_no: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """render_chat for templates without {% generation %}: the assistant_spans' characters, mapped to tokens
    through the tokenizer's offsets (a token is trained when it overlaps a reply)."""
    if not tokenizer.is_fast:
        raise DataError(f"{tokenizer.name_or_path}: its chat template has no {{% generation %}} marks and it is not "
                        f"a fast tokenizer (no character offsets), so assistant tokens cannot be found")
    text, spans = assistant_spans(tokenizer, messages, path, line_no)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    return ids, mask


def last_reply_mask(mask: np.ndarray) -> np.ndarray:
    """Only the last contiguous run of a render_chat mask: the final assistant reply (+ its <|im_end|>)."""
    end = int(np.flatnonzero(mask)[-1]) + 1
    before = np.flatnonzero(~mask[:end])
    start = int(before[-1]) + 1 if before.size else 0
    out = np.zeros_like(mask)
    out[start:end] = True
    return out


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """A conversation so far as the model sees it when asked to answer: the chat template with the generation
    prompt (<|im_start|>assistant\n), as text and as ids. Rendered as text first: apply_chat_template's
    tokenize=True returns a list or a BatchEncoding depending on the transformers version; the template
    already holds every special token, so none is added (no double BOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
