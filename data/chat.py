"""Conversations: checking chat messages, rendering them with the tokenizer's chat template, and finding the
assistant's tokens in the rendering (the tokens SFT and DPO train on).

A message is {"role", "content"} plus, where the data has them, the fields of tool calling and reasoning
(MiniMind-3's and Hugging Face's names): a system message's "tools" (the function schemas the model may call;
they travel on the conversation's first message), an assistant's "tool_calls" and "reasoning_content", and
"role": "tool" messages holding a call's result. Any other field of a message is passed to the template as it
is; unused_fields says which ones the template left out of the rendering.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .records import BadRecord, DataError, check_text

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's messages ({"from": "human" | "gpt" | "system", "value": ...}: Belle, LLaMA-Factory, axolotl) as ours
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")  # a chat template's assistant-token marks
# Optional fields this module checks and normalises; empty or null values count as absent.
MESSAGE_FIELDS = {"tools": "system", "tool_calls": "assistant", "reasoning_content": "assistant"}
# Fields whose loss changes what a conversation says (a tool call would train as an empty reply): a template
# that does not render them is refused, not reported.
STRUCTURAL_FIELDS = ("tools", "tool_calls")

Message = dict[str, Any]


def chat_tokenizer(tokenizer, paths: list[Path], mode: str, needs_template: bool = True):
    """The tokenizer for chat data files, after checking the files exist and (`needs_template`) that the tokenizer
    can render chats."""
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such data file")
    if needs_template and not tokenizer.chat_template:
        raise DataError(f"the tokenizer ({tokenizer.name_or_path}) has no chat_template; {mode} needs one "
                        "(--tokenizer_path: a tokenizer folder with one)")
    return tokenizer


def _json_value(value: object, expected: type, field: str, where: str, path: Path, line_no: int) -> Any:
    """`value`, or the JSON it holds when it is a string (MiniMind writes tools and tool calls as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(path, line_no, f"{where}'s '{field}' is a string but not JSON ({e.msg} at column "
                            f"{e.colno})", f"bad '{field}'") from None
    if not isinstance(value, expected):
        raise BadRecord(path, line_no, f"{where}'s '{field}' must be a {expected.__name__} (or JSON text of one), got "
                        f"{type(value).__name__}", f"bad '{field}'")
    return value


def tool_list(value: object, where: str, path: Path, line_no: int) -> list[dict]:
    """The function schemas of "tools": a list of objects, or the JSON text of one."""
    tools = _json_value(value, list, "tools", where, path, line_no)
    if not all(isinstance(t, dict) for t in tools):
        raise BadRecord(path, line_no, f"{where}'s 'tools' must be a list of function schemas (objects)", "bad 'tools'")
    return tools


def tool_calls(value: object, where: str, path: Path, line_no: int) -> list[dict]:
    """An assistant's tool calls as Hugging Face's templates take them: [{"type": "function", "function": {"name",
    "arguments": {...}}}]. Given as that, as MiniMind's [{"name", "arguments"}], or as the JSON text of either;
    arguments written as JSON text are parsed (every template then renders them alike)."""
    calls = []
    for call in _json_value(value, list, "tool_calls", where, path, line_no):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord(path, line_no, f"{where}'s 'tool_calls' must each be {{\"name\": \"...\", \"arguments\": "
                            f"{{...}}}} (or {{\"type\": \"function\", \"function\": ...}})", "bad 'tool_calls'")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json_value(arguments, dict, "arguments", f"{where}'s tool call", path, line_no)
        if not isinstance(arguments, dict):
            raise BadRecord(path, line_no, f"{where}'s tool call {function['name']!r} has arguments of type "
                            f"{type(arguments).__name__}; expected an object", "bad 'tool_calls'")
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def chat_messages(conv: object, field: str, path: Path, line_no: int) -> list[Message]:
    """A checked list of messages (the value of `field` of one line): known roles, string contents, a system
    message only first, and the tool-calling and reasoning fields in the shapes templates take. The one check of
    every chat format (SFT, DPO, GRPO prompts). ShareGPT's messages ({"from", "value"}) are read as ours."""
    if not isinstance(conv, list) or not conv:
        raise BadRecord(path, line_no, f"'{field}' must be a non-empty list of {{\"role\", \"content\"}} messages",
                        f"bad '{field}'")
    messages = []
    for i, m in enumerate(conv, start=1):
        if isinstance(m, dict) and "role" not in m and "from" in m and "value" in m:  # ShareGPT's
            sender = m["from"]
            if not isinstance(sender, str) or sender not in SHAREGPT_ROLES:
                raise BadRecord(path, line_no, f"message {i} is from {sender!r}; ShareGPT messages here are from "
                                f"{', '.join(SHAREGPT_ROLES)}", "unknown role")
            m = {"role": SHAREGPT_ROLES[sender], "content": m["value"],
                 **{k: v for k, v in m.items() if k not in ("from", "value")}}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRecord(path, line_no, f"message {i} must be an object {{\"role\": \"...\", \"content\": "
                            f"\"...\"}} with string values", "malformed message")
        # null = absent: what a `datasets` export writes for the fields a message lacks
        m = {k: v for k, v in m.items() if v is not None and not (k in MESSAGE_FIELDS and v in ("", []))}
        role, where = m["role"], f"message {i}"
        if role not in CHAT_ROLES:
            raise BadRecord(path, line_no, f"message {i} has role {role!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}", "unknown role")
        if role == "system" and i > 1:
            raise BadRecord(path, line_no, f"message {i} is a system message; only the first message may be one",
                            "late system message")
        for key, owner in MESSAGE_FIELDS.items():
            if key in m and role != owner:
                raise BadRecord(path, line_no, f"message {i} ({role}) has '{key}'; only a {owner} message may",
                                f"'{key}' on a {role} message")
        content = m.get("content", "" if "tool_calls" in m else None)  # a call alone may have no content
        if not isinstance(content, str) or not isinstance(m.get("reasoning_content", ""), str):
            raise BadRecord(path, line_no, f"message {i} must be an object {{\"role\": \"...\", \"content\": "
                            f"\"...\"}} with string values", "malformed message")
        message = {**m, "content": check_text(content, path, line_no)}
        if "tools" in m:
            message["tools"] = tool_list(m["tools"], where, path, line_no)
        if "tool_calls" in m:
            message["tool_calls"] = tool_calls(m["tool_calls"], where, path, line_no)
        if "reasoning_content" in m:
            message["reasoning_content"] = check_text(m["reasoning_content"], path, line_no)
        messages.append(message)
    return messages


def with_tools(messages: list[Message], tools: object, path: Path, line_no: int) -> list[Message]:
    """`messages` with a line's own "tools" field (TRL's column) put where tools travel, on the first message."""
    first = {**messages[0], "tools": tool_list(tools, "the line", path, line_no)}
    return [first, *messages[1:]]


def tools_of(messages: list[Message]) -> list[dict] | None:
    """The function schemas a conversation offers the model (its first message's "tools"), for the template."""
    return messages[0].get("tools") if messages else None


def apply_template(tokenizer, messages: list[Message], path: Path, line_no: int, generation_prompt: bool = False,
                   tools: list[dict] | None = None, **kwargs: Any) -> Any:
    """apply_chat_template as text (or what `kwargs` ask for), with the conversation's tools (or `tools`, when
    rendering a prefix of it); a template that fails is a DataError naming the line."""
    kwargs = {"tokenize": False, **kwargs}
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or tools_of(messages),
                                             add_generation_prompt=generation_prompt, **kwargs)
    except Exception as e:  # the template's own raise_exception, or a Jinja error
        raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} fails on this "
                        f"conversation: {type(e).__name__}: {e}") from None


def unused_fields(tokenizer, messages: list[Message], path: Path, line_no: int) -> list[str]:
    """The message fields (besides role and content) that the template leaves out: the rendering is the same
    without them. A template that drops tools or tool calls is refused here (DataError): training on what is
    left would teach empty replies."""
    fields = sorted({k for m in messages for k in m} - {"role", "content"})
    if not fields:
        return []
    full = apply_template(tokenizer, messages, path, line_no)
    unused = []
    for key in fields:
        without = [{k: v for k, v in m.items() if k != key} for m in messages]
        if apply_template(tokenizer, without, path, line_no) == full:
            unused.append(key)
    dropped = [k for k in unused if k in STRUCTURAL_FIELDS]
    if dropped:
        raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} does not render "
                        f"'{dropped[0]}' (it renders the conversation the same without it), so tool calls would "
                        f"train as empty replies; use a tokenizer whose template renders tools (the shipped "
                        f"tokenizer/ does: --tokenizer_path tokenizer)")
    return unused


def render_chat(tokenizer, messages: list[Message], path: Path, line_no: int, train_from: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation rendered with the chat template, and the mask of the assistant's tokens.

    The mask covers what the assistant says: its reasoning, reply and tool calls and the end-of-turn token that
    closes them (<|im_end|>, <|eot_id|>; so the model learns to stop), never the role header
    ("<|im_start|>assistant\n"), nor system/user turns, nor tool results. `train_from` > 0 leaves the
    assistant turns of messages[:train_from] (a prompt's history) untrained too. A template with
    {% generation %} blocks marks those tokens itself (return_assistant_tokens_mask); the templates real models
    ship (Qwen, Llama) have none, and are read by rendering prefixes instead (assistant_spans). The one place
    SFT and DPO get their masks from."""
    if not GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        ids, mask = _render_chat_by_prefixes(tokenizer, messages, path, line_no)
    else:
        out = apply_template(tokenizer, messages, path, line_no, tokenize=True, return_dict=True,
                             return_assistant_tokens_mask=True)
        ids = np.asarray(out["input_ids"], dtype=np.int32)
        mask = np.asarray(out["assistant_masks"], dtype=bool)
        if not mask.any():
            raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} marks no "
                            f"assistant tokens; it needs {{% generation %}} ... {{% endgeneration %}} around "
                            f"assistant replies (see tokenizer/tokenizer_config.json)")
    if train_from:
        prompt = apply_template(tokenizer, messages[:train_from], path, line_no, tools=tools_of(messages))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)].tolist() != prompt_ids:
            raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} renders the prompt "
                            f"differently once the completion follows it, so the completion's tokens cannot be told "
                            f"apart; put the prompt's turns into the completion or use a prefix-stable template")
        mask[:len(prompt_ids)] = False
    return ids, mask


def assistant_spans(tokenizer, messages: list[Message], path: Path, line_no: int
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
    tools = tools_of(messages)
    full = apply_template(tokenizer, messages, path, line_no)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], path, line_no, generation_prompt=True, tools=tools)
        upto = apply_template(tokenizer, messages[:i + 1], path, line_no, tools=tools)
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
        raise DataError(f"{path} line {line_no}: the chat template of {tokenizer.name_or_path} is not prefix-stable: "
                        f"the conversation rendered up to assistant message {i + 1} is not how the whole conversation "
                        f"renders it, so its tokens cannot be told apart. Put {{% generation %}} ... "
                        f"{{% endgeneration %}} around assistant replies in the template (tokenizer_config.json's "
                        f"chat_template)")
    return full, spans


def _render_chat_by_prefixes(tokenizer, messages: list[Message], path: Path, line_no: int
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


def render_prompt(tokenizer, messages: list[Message]) -> tuple[str, list[int]]:
    """A conversation so far as the model sees it when asked to answer: the chat template with the generation
    prompt (<|im_start|>assistant\n), as text and as ids. Rendered as text first: apply_chat_template's
    tokenize=True returns a list or a BatchEncoding depending on the transformers version; the template
    already holds every special token, so none is added (no double BOS)."""
    text = tokenizer.apply_chat_template(messages, tools=tools_of(messages), tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
