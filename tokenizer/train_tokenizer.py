"""Train the shipped byte-level BPE tokenizer and write a folder transformers loads as-is.

    python tokenizer/train_tokenizer.py                    # -> tokenizer/ (vocab 6400)
    python tokenizer/train_tokenizer.py --vocab_size 8000 --out_dir my_tok

Byte-level: every string encodes (no unknown token) and decode(encode(x)) == x.
Digits are split one per token so arithmetic is written digit by digit (a tiny model learns
"12 + 7 = 19." far better than with merged, arbitrary number chunks).
Trained on dataset/pretrain.jsonl plus the message texts of the chat data, so both prose and
chat answers tokenize compactly. Same inputs -> byte-identical files.

Token ids:  0 <|endoftext|>  end of a pretraining document, and the padding token
            1 <|im_start|>   2 <|im_end|>   ChatML turn markers (special: stripped by skip_special_tokens)
            3 <think>  4 </think>  reasoning markers for GRPO format rewards; regular (non-special)
                                   added tokens, so they survive decode(skip_special_tokens=True)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
MODEL_MAX_LENGTH = 32768  # a tokenizer limit only (silences length warnings); the model's is max_seq_len

# ChatML. Assistant content + <|im_end|> sit inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens SFT trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Texts of .jsonl files: {"text"} documents and the contents of chat messages of any mode."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if "text" in row:
                    yield row["text"]
                for key in ("conversations", "chosen", "rejected", "prompt"):
                    value = row.get(key)
                    if isinstance(value, str):
                        yield value
                    elif isinstance(value, list):
                        yield from (m["content"] for m in value)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
    """Train byte-level BPE on `texts`. Deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),  # one digit per token
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + THINK_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer registers every token it was given as special; <think> </think> must stay in decoded text.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def save(tok: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, stable byte for byte."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
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
    for name, obj in [("tokenizer_config.json", config), ("special_tokens_map.json", special)]:
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=[str(ROOT / "dataset" / f) for f in
                                                  ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "grpo.jsonl")],
                   help=".jsonl files to train on ({'text'} documents and/or chat messages)")
    p.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size including the 5 added tokens")
    p.add_argument("--out_dir", default=str(ROOT / "tokenizer"), help="folder to write the tokenizer files to")
    args = p.parse_args()
    tok = build_tokenizer(corpus_texts(Path(d) for d in args.data), args.vocab_size)
    save(tok, Path(args.out_dir))


if __name__ == "__main__":
    main()
