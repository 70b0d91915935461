"""The fine-tuning datasets, one per mode, read from .jsonl chat files, and the collators that batch them.

SFTDataset (conversations, loss on the assistant's tokens), DPODataset (preference pairs) and GRPODataset
(prompts, plus the fields the reward functions read). Each line's format is detected per line and checked
by the mode's parser (sft_example, dpo_pair, grpo_prompt), which raises a BadRecord for a defective one.
The formats are those MiniMind, TRL and Alpaca write; a field a line has that training does not read is
reported once per file (ChatDataset.unused_report), never dropped in silence.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .chat import (Message, chat_messages, chat_tokenizer, last_reply_mask, render_chat, render_prompt,
                   unused_fields, with_tools)
from .records import (PARQUET, BadRecord, BadRecords, DataError, check_text, data_files, describe_files,
                      iter_records)
from .rows import RowsDataset

IGNORE_INDEX = -100
DataPath = str | Path | Sequence[str | Path]  # a --data_path: a file, a folder, a glob, or several (data_files)

SFT_FORMATS = ('{"conversations": [messages]} (MiniMind, ShareGPT) or {"messages": [messages]} (TRL), messages '
               '{"role", "content"} (or ShareGPT\'s {"from": "human" | "gpt" | "system", "value"}) with optional '
               'tools, tool_calls, reasoning_content and "tool" results; {"prompt": str | '
               '[messages], "completion": str | [messages]} (TRL prompt-completion: loss on the completion only); '
               '{"text": ...} (language modelling: every token trained); or {"instruction": ..., "input": ..., '
               '"output": ...} (Alpaca)')
DPO_FORMATS = ('{"chosen": [messages], "rejected": [messages]} (MiniMind), {"chosen": str, "rejected": str} (TRL '
               'implicit prompt: the shared beginning is the prompt) or {"prompt": str | [messages], "chosen": str | '
               '[assistant message], "rejected": ...} (TRL)')
GRPO_FORMAT = ('{"prompt": str | [messages], "answer": str | number (optional), ...} (other fields are passed '
               'to the reward functions), or MiniMind\'s {"conversations": [..., user message, empty assistant '
               'message]}')
# What MiniMind's RLAIF lines hold in the assistant turn the model is to write: nothing, or a placeholder.
PLACEHOLDER_REPLIES = ("", "None", "无")
KTO_HINT = ("an unpaired preference line (prompt, completion, label: KTO's format), which no mode here trains "
            "as such")


class UnusedFields:
    """The fields of a file's good lines that training does not read, counted per file: a line's own fields
    (a line-level "id"), and message fields the chat template leaves out of the rendering."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self.first: dict[tuple[str, str], int] = {}

    def add(self, path: Path, line_no: int, line_fields: Sequence[str], message_fields: Sequence[str] = ()) -> None:
        names = [f"field '{k}'" for k in line_fields] + [f"message field '{k}'" for k in message_fields]
        for name in names:
            self.counts.setdefault(str(path), Counter())[name] += 1
            self.first.setdefault((str(path), name), line_no)

    def report(self, path: Path, tokenizer_name: str) -> str | None:
        """One stderr line about `path`, or None when every field was used."""
        counts = self.counts.get(str(path))
        if not counts:
            return None
        parts = [f"{name} ({n:,} line{'s' if n != 1 else ''}, first line {self.first[(str(path), name)]})"
                 for name, n in sorted(counts.items())]
        why = (f"; message fields: the chat template of {tokenizer_name} renders the same without them"
               if any(name.startswith("message") for name in counts) else "")
        return f"{path}: not used, so ignored: {', '.join(parts)}{why}"


class ChatDataset(RowsDataset):
    """The base of the datasets read from .jsonl (or .parquet) files of chats: one row per good line.

    `path` is a --data_path: a file, a folder, a glob or several files (data_files), read in that order. A bad
    line raises a DataError naming it; with skip_bad_records it is skipped and counted per reason
    (`bad_skipped`: reason -> lines skipped over all files, `bad_report`: the stderr lines about them, or None).
    `unused_report` is the stderr lines about fields that were not used (UnusedFields), or None.
    """

    EXPECTED: str  # the line formats read, for the error messages
    ROW_NOUN: str  # what a row is ("conversations"), for the error on a file without any

    def _open(self, path: DataPath, tokenizer, mode: str, needs_template: bool = True):
        """The files of `path` (self.paths) and the tokenizer, checked before anything is read."""
        try:
            self.paths = data_files(path, (".jsonl", PARQUET))
        except DataError as e:
            raise DataError(f"{e}; {mode} reads .jsonl and .parquet files") from None
        self.path, self.source = self.paths[0], describe_files(self.paths)
        self.unused = UnusedFields()
        return chat_tokenizer(tokenizer, self.paths, mode, needs_template)

    def _read(self, parse: Callable[[dict, Path, int], object], skip_bad_records: bool
              ) -> Iterator[tuple[Path, int, object]]:
        """(file, line number, what `parse` makes of the line) of each good line of each file; sets `n_rows` and
        the reports once all are read. Files without one good line between them are a DataError."""
        bad = BadRecords(skip=skip_bad_records)
        self.n_rows = 0
        for path in self.paths:
            for line_no, record in iter_records(path, self.EXPECTED, parse, bad):
                self.n_rows += 1
                yield path, line_no, record
        if not self.n_rows:
            raise DataError(f"{self.source}: no {self.ROW_NOUN} (expected one JSON object per line, or row: "
                            f"{self.EXPECTED})")
        self.bad_skipped = dict(sum((Counter(bad.skipped(p)) for p in self.paths), Counter()).most_common())
        self.bad_report = "\n".join(r for r in map(bad.report, self.paths) if r) or None

    def _note_unused(self, tokenizer, path: Path, line_no: int, line_fields: Sequence[str],
                     conversations: Sequence[list[Message]]) -> None:
        """Count a line's unused fields: its own, and the message fields no rendering of it used."""
        rendered = [set(unused_fields(tokenizer, c, path, line_no)) for c in conversations]
        self.unused.add(path, line_no, line_fields, sorted(set.intersection(*rendered)) if rendered else ())

    def _finish_unused(self, tokenizer) -> None:
        self.unused_report = "\n".join(r for p in self.paths if (r := self.unused.report(p, tokenizer.name_or_path))
                                       ) or None


def shifted_example(tokens: np.ndarray, trained: np.ndarray) -> dict[str, torch.Tensor]:
    """{"input_ids": x_0..x_{n-1}, "labels": x_{t+1} where trained[t+1], else -100} (pre-shifted)."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    labels = ids[1:].masked_fill(~torch.from_numpy(np.asarray(trained[1:], dtype=bool)), IGNORE_INDEX)
    return {"input_ids": ids[:-1], "labels": labels}


def _format_counts(formats: dict[str, int]) -> str:
    """The rows read per line format, for the summaries: "2 chat, 1 alpaca"."""
    return ", ".join(f"{n:,} {k}" for k, n in formats.items() if n)


def _other_fields(row: dict, used: set[str]) -> tuple[str, ...]:
    """A line's fields besides `used`: what its format does not read."""
    return tuple(sorted(set(row) - used))


def conversation(conv: object, field: str, path: Path, line_no: int) -> list[Message]:
    """chat_messages, and at least one assistant message: a conversation there is something to train on."""
    messages = chat_messages(conv, field, path, line_no)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(path, line_no, "the conversation has no assistant message, so nothing to train on",
                        "no assistant message")
    return messages


def _turns(value: object, role: str, field: str, path: Path, line_no: int) -> list[Message]:
    """A prompt's or completion's messages: a list of them, or a string = one message of `role` (rendered with the
    chat template: a chat model answers what is rendered with it)."""
    if isinstance(value, str):
        return [{"role": role, "content": check_text(value, path, line_no)}]
    return chat_messages(value, field, path, line_no)


# ----------------------------------------------------------------------------- SFT conversations


class SFTExample(NamedTuple):
    """One SFT line, read: its format and what is trained of it."""
    format: str  # chat, prompt-completion, text or alpaca
    messages: list[Message]  # the conversation; empty for a text line
    text: str = ""  # a text line's document
    train_from: int = 0  # messages[:train_from] are a prompt: its assistant turns are not trained
    unused: tuple[str, ...] = ()  # the line's fields its format does not read


def sft_example(row: dict, path: Path, line_no: int) -> SFTExample:
    """One SFT line, its format detected per line.

    Chat ("conversations" or "messages"): an optional first system message, then the turns, at least one of them
    the assistant's; a line-level "tools" (TRL's column) joins the system message's. Prompt-completion: the
    prompt's messages (a string: one user message), then the completion's (a string: one assistant message);
    only the completion is trained, as TRL's completion_only_loss does. Text: a document trained on every token,
    as in pretraining. Alpaca: user = instruction (+ a blank line + input when input is not empty), assistant =
    output; an optional "system" field becomes the system message.
    """
    if "completion" in row and "label" in row:
        raise BadRecord(path, line_no, f"{KTO_HINT}; SFT would train the completions labelled undesirable too: keep "
                        f"the lines whose label is true and drop 'label'", "unpaired preference (KTO) line")
    if "chosen" in row or "rejected" in row:
        raise BadRecord(path, line_no, "a preference pair ('chosen', 'rejected'): train it with --mode dpo",
                        "preference pair")
    chat_keys = [k for k in ("conversations", "messages") if k in row]
    if len(chat_keys) == 2:
        raise BadRecord(path, line_no, "has both 'conversations' and 'messages'; keep one", "two conversations")
    if chat_keys:
        messages = conversation(row[chat_keys[0]], chat_keys[0], path, line_no)
        if "tools" in row:
            messages = with_tools(messages, row["tools"], path, line_no)
        return SFTExample("chat", messages, unused=_other_fields(row, {chat_keys[0], "tools"}))
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise BadRecord(path, line_no, f"prompt-completion format needs '{missing[0]}' too",
                            f"missing field '{missing[0]}'")
        prompt = _turns(row["prompt"], "user", "prompt", path, line_no)
        completion = _turns(row["completion"], "assistant", "completion", path, line_no)
        if completion[0]["role"] == "system" or not any(m["role"] == "assistant" for m in completion):
            raise BadRecord(path, line_no, "the completion must be assistant turns (a string, or messages with at "
                            "least one assistant message and no system message)", "bad 'completion'")
        messages = prompt + completion
        if "tools" in row:
            messages = with_tools(messages, row["tools"], path, line_no)
        return SFTExample("prompt-completion", messages, train_from=len(prompt),
                          unused=_other_fields(row, {"prompt", "completion", "tools"}))
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise BadRecord(path, line_no, "field 'text' must be a non-empty string", "bad 'text'")
        return SFTExample("text", [], text=check_text(row["text"], path, line_no), unused=_other_fields(row, {"text"}))
    if "instruction" in row or "output" in row:
        fields = {}
        for key, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
            value = row.get(key, None if required else "")
            if value is None and required:
                raise BadRecord(path, line_no, f"Alpaca format needs a string field '{key}'", f"missing field '{key}'")
            if not isinstance(value, str):
                raise BadRecord(path, line_no, f"field '{key}' must be a string, got {type(value).__name__}",
                                f"field '{key}' not a string")
            fields[key] = check_text(value, path, line_no)
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
        system = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
        return SFTExample("alpaca", system + turns,
                          unused=_other_fields(row, {"instruction", "input", "output", "system"}))
    label = next((k for k in row if k.lower() in ("label", "labels")), None)
    if label is not None:  # a classifier's line (LLM_training's spam data): no task here trains a class head
        raise BadRecord(path, line_no, f"a classification line ({', '.join(sorted(row)[:5])}): SFT trains replies, "
                        f"not a class head; write it as {{\"prompt\": <the text>, \"completion\": <its {label}, as "
                        f"a word>}} to train the model to answer with the class", "classification line")
    raise BadRecord(path, line_no, f"expected {SFT_FORMATS}; got keys {sorted(row)[:5]}", "unknown format")


class SFTDataset(ChatDataset):
    """Conversations for supervised fine-tuning: one row each, loss on the assistant's tokens only.

    Each line (see sft_example) is rendered with the tokenizer's chat template and tokenized once, up front;
    render_chat's mask marks what the assistant says (in a prompt-completion line, what the completion's
    assistant says). A text line is its tokens + eos, all trained. With tokens x_0..x_n and that mask m:
        input_ids = x_0..x_{n-1},  labels[t] = x_{t+1} if m_{t+1} else -100   (pre-shifted, as PackedDataset)
    A conversation longer than max_seq_len + 1 tokens is cut to that length and counted in
    `n_truncated`, never dropped (`n_truncated_untrained`: cut so early no assistant token is left).
    `lengths` (input tokens per row) lets the sampler batch rows of similar length together.
    """

    EXPECTED, ROW_NOUN = SFT_FORMATS, "conversations"

    def __init__(self, path: DataPath, tokenizer, max_seq_len: int, skip_bad_records: bool = False):
        tokenizer = self._open(path, tokenizer, "SFT", needs_template=False)  # {"text"} lines need none
        self.max_seq_len = max_seq_len
        tokens: list[np.ndarray] = []
        trained: list[np.ndarray] = []
        self.formats = {"chat": 0, "prompt-completion": 0, "text": 0, "alpaca": 0}
        self.n_truncated = self.n_truncated_untrained = 0
        for file, line_no, ex in self._read(sft_example, skip_bad_records):
            self.formats[ex.format] += 1
            if ex.format == "text":
                eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # where a document ends
                ids = np.asarray(tokenizer(ex.text, add_special_tokens=False)["input_ids"] + eos, dtype=np.int32)
                mask = np.ones(len(ids), dtype=bool)
                self._note_unused(tokenizer, file, line_no, ex.unused, [])
            else:
                if not tokenizer.chat_template:
                    raise DataError(f"{file} line {line_no}: a conversation, and the tokenizer "
                                    f"({tokenizer.name_or_path}) has no chat_template to render it: pass "
                                    "--tokenizer_path, a tokenizer folder with one, or train on {\"text\": ...} lines")
                ids, mask = render_chat(tokenizer, ex.messages, file, line_no, train_from=ex.train_from)
                self._note_unused(tokenizer, file, line_no, ex.unused, [ex.messages])
            if len(ids) > max_seq_len + 1:
                ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                self.n_truncated += 1
                self.n_truncated_untrained += int(not mask[1:].any())
            tokens.append(ids)
            trained.append(mask)
        self._finish_unused(tokenizer)
        self.offsets = np.cumsum([0] + [len(t) for t in tokens])
        self.tokens, self.trained = np.concatenate(tokens), np.concatenate(trained)
        self.row_lengths = torch.from_numpy(np.diff(self.offsets) - 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._row(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        return shifted_example(self.tokens[a:b], self.trained[a:b])

    def check_trainable(self) -> None:
        """DataError when no row of this view has a token to train on (every reply cut off by max_seq_len): as
        training data, every step would be empty and the run would end with the model unchanged."""
        rows = range(self.n_rows) if self.rows is None else self.rows
        if not any(self.trained[self.offsets[r] + 1:self.offsets[r + 1]].any() for r in rows):
            why = (f"{self.n_truncated_untrained:,} of {self.n_rows:,} conversations lost their replies to the cut at "
                   f"max_seq_len {self.max_seq_len}: raise --max_seq_len or shorten the prompts"
                   if self.n_truncated_untrained else "the replies are empty")
            raise DataError(f"{self.source}: no assistant token to train on; {why}")

    @property
    def n_trained_tokens(self) -> int:
        """Label tokens over all conversations read (a row's first token is never a target)."""
        return int(self.trained.sum() - self.trained[self.offsets[:-1]].sum())

    def summary(self) -> str:
        """One line for the log: what was read, how much is trained, what was cut."""
        cut = (f"{self.n_truncated:,} truncated at max_seq_len {self.max_seq_len}"
               + (f" ({self.n_truncated_untrained:,} of them with no assistant token left)"
                  if self.n_truncated_untrained else ""))
        trained = "assistant" + (", and every token of the text lines" if self.formats.get("text") else "")
        return (f"{self.source}: {self.n_rows:,} conversations ({_format_counts(self.formats)}), "
                f"{len(self.tokens):,} tokens, {self.n_trained_tokens:,} trained ({trained}); {cut}")


# ----------------------------------------------------------------------------- DPO preference pairs


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of a pair of plain strings without a prompt, as TRL extracts it:
    the prompt is their shared beginning. It is cut back to the start of a word it would split ("12 + 7 = 19." and
    "12 + 7 = 18." share "12 + 7 =", not "12 + 7 = 1"); the prompt and the replies become chat turns, so the
    whitespace between them is the template's."""
    n = len(os.path.commonprefix([chosen, rejected]))

    def word_char(text: str, i: int) -> bool:
        return i < len(text) and text[i].isascii() and text[i].isalnum()

    while n > 0 and word_char(chosen, n - 1) and (word_char(chosen, n) or word_char(rejected, n)):
        n -= 1
    return chosen[:n].rstrip(), chosen[n:].lstrip(), rejected[n:].lstrip()


def _repeats(side: object, prompt: list) -> bool:
    """Whether a DPO side (a list of messages) begins with the prompt's messages, the same roles and contents."""
    def turns(messages: list) -> list:
        return [(m.get("role"), m.get("content")) if isinstance(m, dict) else m for m in messages]
    return isinstance(side, list) and len(side) > len(prompt) and turns(side[:len(prompt)]) == turns(prompt)


def dpo_pair(row: dict, path: Path, line_no: int) -> tuple[list[Message], list[Message], str, tuple[str, ...]]:
    """(chosen conversation, rejected conversation, format, the line's unused fields) of one DPO line; the format
    is detected per line.

    MiniMind: two full conversations that end with an assistant reply and share everything before it.
    TRL: a prompt (a string = one user message, or messages) and each side's completion (a string or a list
    of assistant messages) appended to it; without a prompt, two plain strings whose shared beginning is the
    prompt (implicit_prompt); sides that repeat the prompt before their replies are whole conversations (the
    prompt is not added twice). Both conversations go through the SFT checks.
    """
    if "completion" in row and "label" in row:
        raise BadRecord(path, line_no, f"{KTO_HINT}; --mode dpo trains pairs: put a desirable and an undesirable "
                        f"completion of one prompt on one line as {{\"prompt\", \"chosen\", \"rejected\"}} (the "
                        f"desirable ones alone train with --mode sft as prompt-completion lines)",
                        "unpaired preference (KTO) line")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing and not ("prompt" in row or len(missing) == 1):
        raise BadRecord(path, line_no, f"expected {DPO_FORMATS}; got keys {sorted(row)[:5]}", "unknown format")
    if missing:
        raise BadRecord(path, line_no, f"the pair has no '{missing[0]}' side", f"missing '{missing[0]}'")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        fmt, prompt = "trl", row["prompt"]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        fmt, (prompt, chosen, rejected) = "trl", implicit_prompt(chosen, rejected)
        if not prompt:
            raise BadRecord(path, line_no, "'chosen' and 'rejected' are plain strings that share no beginning, so "
                            "there is no prompt; give it in 'prompt'", "no shared prompt")
    else:
        fmt, prompt = "minimind", []
    if fmt == "trl":
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise BadRecord(path, line_no, "'prompt' must be a string or a non-empty list of messages", "bad 'prompt'")
        if _repeats(chosen, prompt) and _repeats(rejected, prompt):
            prompt = []  # each side is the whole conversation, its prompt included (hh-rlhf in TRL's layout)
    sides = []
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if fmt == "trl" and isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list) or not value:
            raise BadRecord(path, line_no, f"'{side}' must be a non-empty list of {{\"role\", \"content\"}} messages"
                            + (" or a string" if fmt == "trl" else ""), f"bad '{side}'")
        try:
            messages = conversation(prompt + value, "conversations", path, line_no)
        except BadRecord as e:
            raise BadRecord(path, line_no, f"'{side}': {e.detail}", e.reason) from None
        if messages[-1]["role"] != "assistant":
            raise BadRecord(path, line_no, f"the '{side}' conversation does not end with an assistant reply",
                            "no final assistant reply")
        sides.append(messages)
    if sides[0][:-1] != sides[1][:-1]:
        raise BadRecord(path, line_no, "'chosen' and 'rejected' differ before their final assistant reply; a pair "
                        "shares its prompt", "different prompts")
    if sides[0] == sides[1]:  # DPO's loss is then ln 2 whatever the model: no gradient, a wasted row
        raise BadRecord(path, line_no, "'chosen' and 'rejected' are the same reply; a pair must prefer one answer "
                        "over another", "identical sides")
    return sides[0], sides[1], fmt, _other_fields(row, {"prompt", "chosen", "rejected"})


class DPODataset(ChatDataset):
    """Preference pairs for DPO: one row per pair, each side a conversation rendered with the chat template.

    Labels (pre-shifted, as SFTDataset's) train only the FINAL assistant reply and its <|im_end|>: the
    prompt, earlier turns and role headers are -100 (render_chat's mask cut to its last run). A side longer
    than max_seq_len + 1 tokens is cut and the pair counted in `n_truncated`. `lengths` is the longer side of
    each pair (both sides are padded to one length in a batch), for the sampler's length grouping.
    `ref_logps` ([pairs, 2]: chosen, rejected; NaN = not computed), once set (set_ref_logps), travels with
    each item so the reference model need not run.
    """

    EXPECTED, ROW_NOUN = DPO_FORMATS, "preference pairs"
    SIDES = ("chosen", "rejected")

    def __init__(self, path: DataPath, tokenizer, max_seq_len: int, skip_bad_records: bool = False):
        tokenizer = self._open(path, tokenizer, "DPO")
        self.max_seq_len = max_seq_len
        tokens: dict[str, list[np.ndarray]] = {s: [] for s in self.SIDES}
        trained: dict[str, list[np.ndarray]] = {s: [] for s in self.SIDES}
        self.formats = {"minimind": 0, "trl": 0}
        self.n_truncated = self.n_truncated_untrained = 0
        self.n_truncated_identical = 0  # cut before the sides differ: loss ln 2, no gradient, whatever the model
        for file, line_no, (chosen, rejected, fmt, unused) in self._read(dpo_pair, skip_bad_records):
            self.formats[fmt] += 1
            self._note_unused(tokenizer, file, line_no, unused, [chosen, rejected])
            cut = untrained = False
            for side, messages in zip(self.SIDES, (chosen, rejected)):
                ids, mask = render_chat(tokenizer, messages, file, line_no)
                mask = last_reply_mask(mask)
                if len(ids) > max_seq_len + 1:
                    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                    cut, untrained = True, untrained or not mask[1:].any()
                tokens[side].append(ids)
                trained[side].append(mask)
            self.n_truncated += cut
            self.n_truncated_untrained += untrained
            self.n_truncated_identical += cut and np.array_equal(tokens["chosen"][-1], tokens["rejected"][-1])
        self._finish_unused(tokenizer)
        self.offsets = {s: np.cumsum([0] + [len(t) for t in tokens[s]]) for s in self.SIDES}
        self.tokens = {s: np.concatenate(tokens[s]) for s in self.SIDES}
        self.trained = {s: np.concatenate(trained[s]) for s in self.SIDES}
        self.row_lengths = torch.from_numpy(np.maximum(*(np.diff(self.offsets[s]) - 1 for s in self.SIDES)))
        self.ref_logps: np.ndarray | None = None  # [all pairs of the file, 2]; a view fills its own rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._row(i)
        item = {}
        for s in self.SIDES:
            a, b = self.offsets[s][i], self.offsets[s][i + 1]
            for k, v in shifted_example(self.tokens[s][a:b], self.trained[s][a:b]).items():
                item[f"{s}_{k}"] = v
        if self.ref_logps is not None:
            item["ref_logps"] = torch.from_numpy(self.ref_logps[i].copy())
        return item

    def set_ref_logps(self, values: torch.Tensor | np.ndarray) -> None:
        """Reference log-probs [len(self), 2] of this view's pairs (chosen, rejected), in this view's order."""
        values = np.asarray(values, dtype=np.float32).reshape(len(self), 2)
        if self.ref_logps is None:
            self.ref_logps = np.full((self.n_rows, 2), np.nan, dtype=np.float32)
        rows = np.arange(len(self)) if self.rows is None else self.rows
        self.ref_logps[rows] = values  # by the file's row numbers, which __getitem__ reads them by

    def summary(self) -> str:
        n_tok = sum(len(t) for t in self.tokens.values())
        cut = (f"{self.n_truncated:,} truncated at max_seq_len {self.max_seq_len}"
               + (f" ({self.n_truncated_untrained:,} of them with a side left without reply tokens)"
                  if self.n_truncated_untrained else "")
               + (f" ({self.n_truncated_identical:,} cut before the sides differ: they teach nothing; raise "
                  f"--max_seq_len)" if self.n_truncated_identical else ""))
        return (f"{self.source}: {self.n_rows:,} preference pairs ({_format_counts(self.formats)}), {n_tok:,} "
                f"tokens; {cut}")


# ----------------------------------------------------------------------------- GRPO prompts


def _placeholder_turn(message: object) -> bool:
    """Whether a message is the empty assistant turn that marks where an RLAIF line's answer goes."""
    if not isinstance(message, dict) or message.get("role") != "assistant" or message.get("tool_calls"):
        return False
    content = message.get("content")
    return content is None or (isinstance(content, str) and content.strip() in PLACEHOLDER_REPLIES)


def grpo_prompt(row: dict, path: Path, line_no: int) -> tuple[list[Message], dict[str, object]]:
    """(prompt messages, the line's other fields) of one GRPO line. A plain-string prompt becomes one user
    message: a chat model answers only what is rendered with its template (without it, the model never ends
    its turn). A MiniMind RLAIF line is a conversation whose last, empty assistant turn (PLACEHOLDER_REPLIES) is
    the one the model writes: the messages before it are the prompt. "answer", when present, is kept as text
    (numbers as written: 29 -> "29")."""
    chat_key = next((k for k in ("conversations", "messages") if k in row), None)
    if "prompt" in row:
        prompt, key = row["prompt"], "prompt"
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": check_text(prompt, path, line_no)}]
        else:
            messages = chat_messages(prompt, "prompt", path, line_no)
    elif chat_key is not None:
        conv, key = row[chat_key], chat_key
        if isinstance(conv, list) and len(conv) > 1 and _placeholder_turn(conv[-1]):
            conv = conv[:-1]
        messages = chat_messages(conv, chat_key, path, line_no)
        if messages[-1]["role"] == "assistant":
            raise BadRecord(path, line_no, "the conversation ends with an assistant reply, but GRPO samples the "
                            "reply itself: end the line with the user message (or an empty assistant turn) and "
                            "put a reference answer in 'answer'", "conversation ending with a reply")
    else:
        raise BadRecord(path, line_no, f"missing field 'prompt' (expected {GRPO_FORMAT})", "missing field 'prompt'")
    if messages[-1]["role"] != "user":
        raise BadRecord(path, line_no, f"the prompt's last message has role {messages[-1]['role']!r}; it must end "
                        f"with the user message the model answers", "prompt not ending with a user message")
    columns = {k: v for k, v in row.items() if k != key}
    answer = columns.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        raise BadRecord(path, line_no, f"'answer' must be a string or a number, got {type(answer).__name__}",
                        "bad 'answer'")
    columns["answer"] = None if answer is None else check_text(str(answer), path, line_no)
    return messages, columns


class GRPODataset(ChatDataset):
    """Prompts for GRPO: one row each, rendered with the chat template and the generation prompt, plus the
    line's other fields ("answer", ...) for the reward functions.

    There are no labels: the completions are sampled during training. A prompt longer than max_seq_len -
    max_completion_length tokens (the completion must fit after it) is a bad record: it stops the run naming
    the line, or is skipped and counted with skip_bad_records. Cutting it would drop either the system prompt
    or the question. `lengths` (prompt tokens per row) lets the sampler batch similar lengths (less left
    padding). `room` names, for that error, the settings the prompt's limit comes from.
    """

    EXPECTED, ROW_NOUN = GRPO_FORMAT, "prompts"

    def __init__(self, path: DataPath, tokenizer, max_seq_len: int, skip_bad_records: bool = False,
                 max_completion_length: int = 0, room: str = "--max_seq_len minus --max_completion_length"):
        tokenizer = self._open(path, tokenizer, "GRPO")
        self.max_prompt_len = max_prompt_len = max_seq_len - max_completion_length
        self.prompt_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.messages: list[list[Message]] = []
        self.columns: list[dict[str, object]] = []

        def parse(row: dict, path: Path, line_no: int) -> tuple[list[Message], dict, str, list[int]]:
            messages, columns = grpo_prompt(row, path, line_no)
            text, ids = render_prompt(tokenizer, messages)
            if len(ids) > max_prompt_len:
                raise BadRecord(path, line_no, f"the prompt has {len(ids)} tokens; at most {max_prompt_len} fit "
                                f"({room})", "prompt too long")
            return messages, columns, text, ids

        for file, line_no, (messages, columns, text, ids) in self._read(parse, skip_bad_records):
            self._note_unused(tokenizer, file, line_no, (), [messages])  # other fields go to the reward functions
            self.messages.append(messages)
            self.columns.append(columns)
            self.texts.append(text)
            self.prompt_ids.append(ids)
        self._finish_unused(tokenizer)
        self.column_names = sorted({k for c in self.columns for k in c})  # every row gets each (None if absent)
        self.row_lengths = torch.tensor([len(p) for p in self.prompt_ids])

    @property
    def has_answers(self) -> bool:
        """Whether any line has an "answer" (what the accuracy reward compares with)."""
        return any(c.get("answer") is not None for c in self.columns)

    def __getitem__(self, i: int) -> dict[str, object]:
        i = self._row(i)
        return {"input_ids": torch.tensor(self.prompt_ids[i], dtype=torch.long), "prompt": self.texts[i],
                "prompt_messages": self.messages[i],
                "columns": {k: self.columns[i].get(k) for k in self.column_names}}

    def summary(self) -> str:
        lengths = self.row_lengths.tolist()
        n_answers = sum(c.get("answer") is not None for c in self.columns)
        return (f"{self.source}: {len(lengths):,} prompts ({n_answers:,} with an answer), {min(lengths)}-"
                f"{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); at most {self.max_prompt_len} fit")


# ----------------------------------------------------------------------------- collators


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-shaped examples (packed pretraining rows) into a batch."""
    return {k: torch.stack([ex[k] for ex in batch]) for k in batch[0]}


def pad_collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Collator for variable-length LM examples: right-pads input_ids with `pad_id`, labels with -100.

    Returns {"input_ids", "labels", "attention_mask"} (mask 1 = real token). Right padding keeps
    position ids 0..n-1 of every example identical to unpadded training.
    """

    def fn(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        T = max(len(ex["input_ids"]) for ex in batch)
        out = {"input_ids": torch.full((len(batch), T), pad_id, dtype=torch.long),
               "labels": torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), T), dtype=torch.long)}
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            if len(ex["labels"]) != n:
                raise ValueError(f"example {i}: input_ids has {n} tokens but labels {len(ex['labels'])}")
            out["input_ids"][i, :n] = torch.as_tensor(ex["input_ids"])
            out["labels"][i, :n] = torch.as_tensor(ex["labels"])
            out["attention_mask"][i, :n] = 1
        return out

    return fn


def pair_collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Collator for DPODataset items: B pairs -> ONE right-padded batch of 2B rows, the B chosen sides first,
    then the B rejected ones, all padded to one common length, so a single forward pass serves both sides.
    Returns pad_collate's {"input_ids", "labels", "attention_mask"}, plus "ref_logps" [2B] when the items
    carry precomputed reference log-probs (same row order)."""
    pad = pad_collate(pad_id)

    def fn(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]}
                for side in DPODataset.SIDES for ex in batch]
        out = pad(rows)
        if "ref_logps" in batch[0]:
            ref = torch.stack([ex["ref_logps"] for ex in batch]).float()  # [B, 2]
            out["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return out

    return fn


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids [B, T], attention_mask [B, T]) padded on the LEFT, so every
    row's next token lands in the same column (what batched generation with one KV cache needs)."""
    rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def prompt_collate(pad_id: int) -> Callable[[list[dict[str, object]]], dict[str, object]]:
    """Collator for GRPODataset items: left-padded {"input_ids", "attention_mask"} plus, untouched, the rendered
    "prompts", their "prompt_messages" and "columns" (field -> one value per row) for the reward functions.
    (The loop moves only tensors to the device.)"""

    def fn(batch: list[dict[str, object]]) -> dict[str, object]:
        ids, mask = left_pad([ex["input_ids"] for ex in batch], pad_id)
        names = batch[0]["columns"].keys()
        return {"input_ids": ids, "attention_mask": mask, "prompts": [ex["prompt"] for ex in batch],
                "prompt_messages": [ex["prompt_messages"] for ex in batch],
                "columns": {k: [ex["columns"][k] for ex in batch] for k in names}}

    return fn
