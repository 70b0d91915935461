"""The fine-tuning datasets, one per mode, read from .jsonl chat files, and the collators that batch them.

SFTDataset (conversations, loss on the assistant's tokens), DPODataset (preference pairs) and GRPODataset
(prompts, plus the fields the reward functions read). Each line's format is detected per line and checked
by the mode's parser (sft_messages, dpo_pair, grpo_prompt), which raises a BadRecord for a defective one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .chat import chat_messages, chat_tokenizer, last_reply_mask, render_chat, render_prompt
from .records import BadRecord, BadRecords, DataError, check_text, iter_jsonl_objects
from .rows import RowsDataset

IGNORE_INDEX = -100

SFT_FORMATS = ('{"conversations": [{"role": ..., "content": ...}, ...]} (chat) or '
               '{"instruction": ..., "input": ..., "output": ...} (Alpaca)')
DPO_FORMATS = ('{"chosen": [messages], "rejected": [messages]} (MiniMind) or {"prompt": str | [messages], '
               '"chosen": str | [assistant message], "rejected": ...} (TRL)')
GRPO_FORMAT = ('{"prompt": str | [messages], "answer": str | number (optional), ...} (other fields are passed '
               'to the reward functions)')


class ChatDataset(RowsDataset):
    """The base of the datasets read from a .jsonl file of chats: one row per good line.

    A bad line raises a DataError naming it; with skip_bad_records it is skipped and counted per reason
    (`bad_skipped`: reason -> lines skipped, `bad_report`: the stderr line about them, or None).
    """

    EXPECTED: str  # the line formats read, for the error messages
    ROW_NOUN: str  # what a row is ("conversations"), for the error on a file without any

    def _read(self, path: str | Path, parse: Callable[[dict, Path, int], object], skip_bad_records: bool
              ) -> Iterator[tuple[int, object]]:
        """(line number, what `parse` makes of the line) of each good line of `path`; sets `n_rows` and the
        bad-record report once all are read. A file without one good line is a DataError."""
        self.path = Path(path)
        bad = BadRecords(skip=skip_bad_records)
        self.n_rows = 0
        for line_no, record in iter_jsonl_objects(self.path, self.EXPECTED, parse, bad):
            self.n_rows += 1
            yield line_no, record
        if not self.n_rows:
            raise DataError(f"{self.path}: no {self.ROW_NOUN} (expected one JSON object per line: {self.EXPECTED})")
        self.bad_skipped = bad.skipped(self.path)
        self.bad_report = bad.report(self.path)


def shifted_example(tokens: np.ndarray, trained: np.ndarray) -> dict[str, torch.Tensor]:
    """{"input_ids": x_0..x_{n-1}, "labels": x_{t+1} where trained[t+1], else -100} (pre-shifted)."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    labels = ids[1:].masked_fill(~torch.from_numpy(np.asarray(trained[1:], dtype=bool)), IGNORE_INDEX)
    return {"input_ids": ids[:-1], "labels": labels}


def _format_counts(formats: dict[str, int]) -> str:
    """The rows read per line format, for the summaries: "2 chat, 1 alpaca"."""
    return ", ".join(f"{n:,} {k}" for k, n in formats.items() if n)


# ----------------------------------------------------------------------------- SFT conversations


def sft_messages(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], str]:
    """The chat messages of one SFT line and its format ("chat" or "alpaca"), detected per line.

    Chat: an optional first system message, then user/assistant messages (at least one assistant).
    Alpaca: user = instruction (+ a blank line + input when input is not empty), assistant = output;
    an optional "system" field becomes the system message.
    """
    if "conversations" in row:
        messages = chat_messages(row["conversations"], "conversations", path, line_no)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord(path, line_no, "the conversation has no assistant message, so nothing to train on",
                            "no assistant message")
        return messages, "chat"
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
        return system + turns, "alpaca"
    raise BadRecord(path, line_no, f"expected {SFT_FORMATS}; got keys {sorted(row)[:5]}", "unknown format")


class SFTDataset(ChatDataset):
    """Conversations for supervised fine-tuning: one row each, loss on the assistant's tokens only.

    Each line (chat or Alpaca, see sft_messages) is rendered with the tokenizer's chat template and
    tokenized once, up front; render_chat's mask marks what the assistant says. With tokens x_0..x_n and
    that mask m:
        input_ids = x_0..x_{n-1},  labels[t] = x_{t+1} if m_{t+1} else -100   (pre-shifted, as PackedDataset)
    A conversation longer than max_seq_len + 1 tokens is cut to that length and counted in
    `n_truncated`, never dropped (`n_truncated_untrained`: cut so early no assistant token is left).
    `lengths` (input tokens per row) lets the sampler batch rows of similar length together.
    """

    EXPECTED, ROW_NOUN = SFT_FORMATS, "conversations"

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, skip_bad_records: bool = False):
        tokenizer = chat_tokenizer(tokenizer, path, "SFT")
        self.max_seq_len = max_seq_len
        tokens: list[np.ndarray] = []
        trained: list[np.ndarray] = []
        self.formats = {"chat": 0, "alpaca": 0}
        self.n_truncated = self.n_truncated_untrained = 0
        for line_no, (messages, fmt) in self._read(path, sft_messages, skip_bad_records):
            self.formats[fmt] += 1
            ids, mask = render_chat(tokenizer, messages, self.path, line_no)
            if len(ids) > max_seq_len + 1:
                ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                self.n_truncated += 1
                self.n_truncated_untrained += int(not mask[1:].any())
            tokens.append(ids)
            trained.append(mask)
        self.offsets = np.cumsum([0] + [len(t) for t in tokens])
        self.tokens, self.trained = np.concatenate(tokens), np.concatenate(trained)
        self.row_lengths = torch.from_numpy(np.diff(self.offsets) - 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._row(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        return shifted_example(self.tokens[a:b], self.trained[a:b])

    @property
    def n_trained_tokens(self) -> int:
        """Label tokens over all conversations read (a row's first token is never a target)."""
        return int(self.trained.sum() - self.trained[self.offsets[:-1]].sum())

    def summary(self) -> str:
        """One line for the log: what was read, how much is trained, what was cut."""
        cut = (f"{self.n_truncated:,} truncated at max_seq_len {self.max_seq_len}"
               + (f" ({self.n_truncated_untrained:,} of them with no assistant token left)"
                  if self.n_truncated_untrained else ""))
        return (f"{self.path}: {self.n_rows:,} conversations ({_format_counts(self.formats)}), "
                f"{len(self.tokens):,} tokens, {self.n_trained_tokens:,} trained (assistant); {cut}")


# ----------------------------------------------------------------------------- DPO preference pairs


def dpo_pair(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """(chosen conversation, rejected conversation, format) of one DPO line; the format is detected per line.

    MiniMind: two full conversations that end with an assistant reply and share everything before it.
    TRL: a prompt (a string = one user message, or messages) and each side's completion (a string or a list
    of assistant messages) appended to it. Both conversations go through sft_messages' checks.
    """
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing and not ("prompt" in row or len(missing) == 1):
        raise BadRecord(path, line_no, f"expected {DPO_FORMATS}; got keys {sorted(row)[:5]}", "unknown format")
    if missing:
        raise BadRecord(path, line_no, f"the pair has no '{missing[0]}' side", f"missing '{missing[0]}'")
    fmt = "trl" if "prompt" in row else "minimind"
    prompt: list = []
    if fmt == "trl":
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise BadRecord(path, line_no, "'prompt' must be a string or a non-empty list of messages", "bad 'prompt'")
    sides = []
    for side in ("chosen", "rejected"):
        value = row[side]
        if fmt == "trl" and isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list) or not value:
            raise BadRecord(path, line_no, f"'{side}' must be a non-empty list of {{\"role\", \"content\"}} messages"
                            + (" or a string" if fmt == "trl" else ""), f"bad '{side}'")
        try:
            messages, _ = sft_messages({"conversations": prompt + value}, path, line_no)
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
    return sides[0], sides[1], fmt


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

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, skip_bad_records: bool = False):
        tokenizer = chat_tokenizer(tokenizer, path, "DPO")
        self.max_seq_len = max_seq_len
        tokens: dict[str, list[np.ndarray]] = {s: [] for s in self.SIDES}
        trained: dict[str, list[np.ndarray]] = {s: [] for s in self.SIDES}
        self.formats = {"minimind": 0, "trl": 0}
        self.n_truncated = self.n_truncated_untrained = 0
        self.n_truncated_identical = 0  # cut before the sides differ: loss ln 2, no gradient, whatever the model
        for line_no, (chosen, rejected, fmt) in self._read(path, dpo_pair, skip_bad_records):
            self.formats[fmt] += 1
            cut = untrained = False
            for side, messages in zip(self.SIDES, (chosen, rejected)):
                ids, mask = render_chat(tokenizer, messages, self.path, line_no)
                mask = last_reply_mask(mask)
                if len(ids) > max_seq_len + 1:
                    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                    cut, untrained = True, untrained or not mask[1:].any()
                tokens[side].append(ids)
                trained[side].append(mask)
            self.n_truncated += cut
            self.n_truncated_untrained += untrained
            self.n_truncated_identical += cut and np.array_equal(tokens["chosen"][-1], tokens["rejected"][-1])
        self.offsets = {s: np.cumsum([0] + [len(t) for t in tokens[s]]) for s in self.SIDES}
        self.tokens = {s: np.concatenate(tokens[s]) for s in self.SIDES}
        self.trained = {s: np.concatenate(trained[s]) for s in self.SIDES}
        self.row_lengths = torch.from_numpy(np.maximum(*(np.diff(self.offsets[s]) - 1 for s in self.SIDES)))
        self.ref_logps: np.ndarray | None = None  # [all pairs, 2], shared by subset views

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
        self.ref_logps[rows] = values  # in place: subset views of the same file share it

    def summary(self) -> str:
        n_tok = sum(len(t) for t in self.tokens.values())
        cut = (f"{self.n_truncated:,} truncated at max_seq_len {self.max_seq_len}"
               + (f" ({self.n_truncated_untrained:,} of them with a side left without reply tokens)"
                  if self.n_truncated_untrained else "")
               + (f" ({self.n_truncated_identical:,} cut before the sides differ: they teach nothing; raise "
                  f"--max_seq_len)" if self.n_truncated_identical else ""))
        return (f"{self.path}: {self.n_rows:,} preference pairs ({_format_counts(self.formats)}), {n_tok:,} tokens; "
                f"{cut}")


# ----------------------------------------------------------------------------- GRPO prompts


def grpo_prompt(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], dict[str, object]]:
    """(prompt messages, the line's other fields) of one GRPO line. A plain-string prompt becomes one user
    message: a chat model answers only what is rendered with its template (without it, the model never ends
    its turn). "answer", when present, is kept as text (numbers as written: 29 -> "29")."""
    if "prompt" not in row:
        raise BadRecord(path, line_no, f"missing field 'prompt' (expected {GRPO_FORMAT})", "missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": check_text(prompt, path, line_no)}]
    else:
        messages = chat_messages(prompt, "prompt", path, line_no)
    if messages[-1]["role"] != "user":
        raise BadRecord(path, line_no, f"the prompt's last message has role {messages[-1]['role']!r}; it must end "
                        f"with the user message the model answers", "prompt not ending with a user message")
    columns = {k: v for k, v in row.items() if k != "prompt"}
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
    padding).
    """

    EXPECTED, ROW_NOUN = GRPO_FORMAT, "prompts"

    def __init__(self, path: str | Path, tokenizer, max_seq_len: int, skip_bad_records: bool = False,
                 max_completion_length: int = 0):
        tokenizer = chat_tokenizer(tokenizer, path, "GRPO")
        self.max_prompt_len = max_prompt_len = max_seq_len - max_completion_length
        self.prompt_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.messages: list[list[dict[str, str]]] = []
        self.columns: list[dict[str, object]] = []

        def parse(row: dict, path: Path, line_no: int) -> tuple[list[dict[str, str]], dict, str, list[int]]:
            messages, columns = grpo_prompt(row, path, line_no)
            text, ids = render_prompt(tokenizer, messages)
            if len(ids) > max_prompt_len:
                raise BadRecord(path, line_no, f"the prompt has {len(ids)} tokens; at most {max_prompt_len} fit "
                                f"(--max_seq_len minus --max_completion_length)", "prompt too long")
            return messages, columns, text, ids

        for _, (messages, columns, text, ids) in self._read(path, parse, skip_bad_records):
            self.messages.append(messages)
            self.columns.append(columns)
            self.texts.append(text)
            self.prompt_ids.append(ids)
        self.column_names = sorted({k for c in self.columns for k in c})  # every row gets each (None if absent)
        self.row_lengths = torch.tensor([len(p) for p in self.prompt_ids])

    def __getitem__(self, i: int) -> dict[str, object]:
        i = self._row(i)
        return {"input_ids": torch.tensor(self.prompt_ids[i], dtype=torch.long), "prompt": self.texts[i],
                "prompt_messages": self.messages[i],
                "columns": {k: self.columns[i].get(k) for k in self.column_names}}

    def summary(self) -> str:
        lengths = self.row_lengths.tolist()
        n_answers = sum(c.get("answer") is not None for c in self.columns)
        return (f"{self.path}: {len(lengths):,} prompts ({n_answers:,} with an answer), {min(lengths)}-{max(lengths)} "
                f"tokens (mean {sum(lengths) / len(lengths):.0f}); at most {self.max_prompt_len} fit")


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
