"""Train the shipped byte-level BPE tokenizer and write a folder transformers loads as-is.

    python tokenizer/train_tokenizer.py                    # -> tokenizer/ (vocab 6400), the same bytes as shipped
    python tokenizer/train_tokenizer.py --vocab_size 8000 --out_dir my_tok

A folder that holds a different tokenizer (the shipped tokenizer/, by default) is replaced only with --overwrite:
models and tokenized data need the tokenizer they were made with.

Byte-level: every string encodes (no unknown token) and decode(encode(x)) == x.
Digits are split one per token so arithmetic is written digit by digit (a tiny model learns
"12 + 7 = 19." far better than with merged, arbitrary number chunks).
Trained on dataset/pretrain.jsonl plus the message texts of the chat data, so both prose and
chat answers tokenize compactly (--data takes other .jsonl files, a Hugging Face dataset's .parquet files, and
plain .txt). Same inputs -> byte-identical files.

Token ids:  0 <|endoftext|>  end of a pretraining document, and the padding token
            1 <|im_start|>   2 <|im_end|>   ChatML turn markers (special: stripped by skip_special_tokens)
            3 <think>  4 </think>  reasoning markers for GRPO format rewards; regular (non-special)
                                   added tokens, so they survive decode(skip_special_tokens=True)
            the last 4 ids: <tool_call> </tool_call> <tool_response> </tool_response>, tool-calling markers
                                   (regular added tokens too, as in Qwen's tokenizers)

The chat template is ChatML, and renders tool calling and reasoning as Qwen2.5/Qwen3 templates do (the
names and shapes MiniMind-3's data uses): apply_chat_template(messages, tools=[schemas]) lists the tools in
the system turn, an assistant's "tool_calls" become <tool_call>{"name", "arguments"}</tool_call>, a
"role": "tool" result is a <tool_response> in a user turn, and "reasoning_content" is written inside
<think>...</think> before the reply. A conversation without those fields renders as plain ChatML.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.records import BadRecords, DataError, data_files, iter_lines, iter_records  # noqa: E402
from trainer import other_flags  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS + THINK_TOKENS + TOOL_TOKENS)  # every byte, the added tokens, no merge yet
SUFFIXES = (".jsonl", ".parquet", ".txt")
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what save writes
MODEL_MAX_LENGTH = 32768  # a tokenizer limit only (silences length warnings); the model's is max_seq_len

# The generation block of an assistant turn: reasoning, reply, tool calls and <|im_end|> (what SFT trains).
_ASSISTANT = (
    "{%- if message['reasoning_content'] %}"
    "{{- '<think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- set call = call['function'] or call %}"
    "{{- ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + call['name']"
    " + '\", \"arguments\": ' + (call['arguments'] if call['arguments'] is string else (call['arguments'] | tojson))"
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
)
# Qwen2.5's tool prompt, in the system turn (after the conversation's own system message, if any).
_TOOLS = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
)
# ChatML. Each assistant turn's content + <|im_end|> sits inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens SFT trains on; tool
# results (consecutive ones share one user turn) are outside it: they are never trained.
CHAT_TEMPLATE = (
    _TOOLS
    + "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}" + _ASSISTANT + "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _message_texts(value: Any) -> Iterator[str]:
    """The texts of a chat field: a string, or the contents (and reasoning) of a list of messages, ShareGPT's
    {"from", "value"} ones included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for m in value:
            for key in ("content", "reasoning_content", "value"):
                if isinstance(m, dict) and isinstance(m.get(key), str):
                    yield m[key]


TEXT_FIELDS = ("text", "conversations", "messages", "chosen", "rejected", "prompt", "completion",  # every mode's
               "instruction", "input", "output", "system")  # Alpaca's


def corpus_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Texts of .jsonl and .parquet files ({"text"} documents, the messages of chat data of any mode, MiniMind's,
    TRL's and ShareGPT's field names, and Alpaca's fields) and of .txt files (line by line; the <|endoftext|> lines
    that separate documents are left out, as the token is added, not learned). Read as training reads them
    (data/records.py): a line that is not UTF-8 or not a JSON object, or a file that is not Parquet, is a
    DataError naming it, and so is a file none of whose lines has one of those fields (other data, which would
    leave a tokenizer of bytes alone)."""
    for path in paths:
        if path.suffix == ".txt":
            yield from (line for _, line in iter_lines(path, BadRecords()) if line.rstrip("\r\n") != SPECIAL_TOKENS[0])
            continue
        read, keys = False, set()
        for _, row in iter_records(path, "(a {'text'} document or chat messages)"):
            for key in TEXT_FIELDS:
                for text in _message_texts(row.get(key)):
                    read = True
                    yield text
            keys.update(row)
        if not read:
            raise DataError(f"{path}: no text read: its lines have {', '.join(sorted(keys)[:8]) or 'no fields'}; "
                            f"the text is read from {', '.join(TEXT_FIELDS)} (messages: content or value)")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
    """Train byte-level BPE on `texts`. Deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),  # one digit per token
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),  # the tool tokens take the last ids
        special_tokens=SPECIAL_TOKENS + THINK_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer registers every token it was given as special; <think> </think> must stay in decoded text,
    # and so must the tool-call markers added after the learned ones.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS + TOOL_TOKENS])
    return tok


def save(tok: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, stable byte for byte."""
    write_files(tokenizer_files(tok), out_dir)


def write_files(files: dict[str, bytes], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out_dir / name).write_bytes(content)


def tokenizer_files(tok: Tokenizer) -> dict[str, bytes]:
    """The bytes of each file save writes."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # True would turn "a ." into "a." and break round trips
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    return {"tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
            **{name: (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
               for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=[str(ROOT / "dataset" / f) for f in
                                                  ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "grpo.jsonl")],
                   help=".jsonl or .parquet files ({'text'} documents and/or chat messages) or .txt files (plain "
                        "text) to train on; as train.py's --data_path, each may be a folder (its files of those "
                        "kinds), a glob or a comma-separated list")
    p.add_argument("--vocab_size", type=int, default=6400,
                   help=f"vocabulary size including the 9 added tokens (at least {MIN_VOCAB}: the 256 bytes and them)")
    p.add_argument("--out_dir", default=str(ROOT / "tokenizer"), help="folder to write the tokenizer files to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different tokenizer already in --out_dir (the shipped one, by default)")
    args, unknown = p.parse_known_args()
    if unknown:  # another tool's flags (SentencePiece's): one line each saying what to write here
        other_flags.refuse_unknown(p, unknown, other_flags.TOKENIZER)
    if args.vocab_size < MIN_VOCAB:
        p.error(f"--vocab_size {args.vocab_size}: must be at least {MIN_VOCAB} (the 256 bytes and the "
                f"{MIN_VOCAB - 256} added tokens)")
    try:
        paths = [path for spec in args.data for path in data_files(spec, SUFFIXES)]
    except DataError as e:
        p.error(f"--data {e}")
    out_dir = Path(args.out_dir)
    for path in paths:
        if path.suffix not in SUFFIXES:
            p.error(f"--data {path}: not a .jsonl, .parquet or .txt file")

    # Models and tokenized data made with a tokenizer need it as it is, so one is replaced only when asked. Other
    # data or another size make other files: refused before training; the default run, which reproduces the
    # shipped files, is checked once they are made.
    def refuse(what: str) -> None:
        p.error(f"--out_dir {out_dir} already holds {what}, which models and tokenized data made with it need as it "
                f"is; pass --overwrite to replace it, or choose another --out_dir")

    held = [name for name in FILES if (out_dir / name).exists()]
    defaults = [p.get_default("data"), p.get_default("vocab_size")]
    if held and not args.overwrite and [args.data, args.vocab_size] != defaults:
        refuse(f"a tokenizer ({held[0]})")
    try:
        tok = build_tokenizer(corpus_texts(paths), args.vocab_size)
    except DataError as e:
        raise SystemExit(f"train_tokenizer.py: error: {e}") from None
    if tok.get_vocab_size() < args.vocab_size:  # BPE ran out of pairs to merge: too little text for the size
        print(f"train_tokenizer.py: the data holds only {tok.get_vocab_size() - MIN_VOCAB:,} merges: the vocabulary "
              f"is {tok.get_vocab_size():,}, not {args.vocab_size:,}; add text for a larger one", file=sys.stderr)
    files = tokenizer_files(tok)
    if not args.overwrite and any((out_dir / name).read_bytes() != files[name] for name in held):
        refuse("a different tokenizer")
    write_files(files, out_dir)


if __name__ == "__main__":
    main()
