"""Datasets and collators: text files -> batches of tensors.

(Named data, not datasets: that name would shadow Hugging Face's `datasets` package.)

A batch is a dict of tensors. Language-model batches are {"input_ids": Long[B,T], "labels": Long[B,T]}
with labels ALREADY shifted (labels[:, t] is the target of position t) and -100 = ignored; variable-length
batches add "attention_mask" (1 = real token).

  records.py   DataError, the bad-record policy (BadRecords: stop, or skip and count), JSONL/line readers,
               the files a --data_path names (a file, a folder, a glob, or several)
  rows.py      RowsDataset, the base of every dataset: rows seen through a subset (train/val), `lengths`
  pretrain.py  .jsonl/.txt corpora -> cached .bin token file + sidecar -> PackedDataset; split_train_val
  chat.py      chat messages (tools, tool calls, reasoning), rendering with the chat template, the assistant's
               tokens (masks), the fields a template leaves out
  finetune.py  SFTDataset, DPODataset, GRPODataset (one per mode, with its line formats) and the collators
  tokenizer.py loading a tokenizer, its padding id, the ids that end an answer
"""

from .chat import (CHAT_ROLES, GENERATION_BLOCK, apply_template, assistant_spans, chat_messages, chat_tokenizer,
                   last_reply_mask, render_chat, render_prompt, tool_calls, tools_of, unused_fields)
from .finetune import (DPO_FORMATS, GRPO_FORMAT, IGNORE_INDEX, SFT_FORMATS, ChatDataset, DPODataset, GRPODataset,
                       SFTDataset, SFTExample, collate, conversation, dpo_pair, grpo_prompt, implicit_prompt, left_pad,
                       pad_collate, pair_collate, prompt_collate, sft_example, shifted_example)
from .pretrain import (SIDECAR_FORMAT, PackedDataset, check_bin, iter_record_pieces, iter_txt_pieces, prepare_pretrain,
                       pretrain_bin, read_sidecar, split_train_val, summary, token_dtype, tokenizer_fingerprint)
from .records import (BadRecord, BadRecords, DataError, check_text, data_files, describe_files, iter_records,
                      iter_record_texts, iter_lines)
from .rows import RowsDataset
from .tokenizer import load_tokenizer, pad_token_id, stop_token_ids

__all__ = [
    "CHAT_ROLES", "GENERATION_BLOCK", "apply_template", "assistant_spans", "chat_messages", "chat_tokenizer",
    "last_reply_mask", "render_chat", "render_prompt", "tool_calls", "tools_of", "unused_fields",
    "DPO_FORMATS", "GRPO_FORMAT", "IGNORE_INDEX", "SFT_FORMATS", "ChatDataset", "DPODataset", "GRPODataset",
    "SFTDataset", "SFTExample", "collate", "conversation", "dpo_pair", "grpo_prompt", "implicit_prompt", "left_pad",
    "pad_collate", "pair_collate", "prompt_collate", "sft_example", "shifted_example",
    "SIDECAR_FORMAT", "PackedDataset", "check_bin", "iter_record_pieces", "iter_txt_pieces", "prepare_pretrain",
    "pretrain_bin", "read_sidecar", "split_train_val", "summary", "token_dtype", "tokenizer_fingerprint",
    "BadRecord", "BadRecords", "DataError", "check_text", "data_files", "describe_files", "iter_records",
    "iter_record_texts", "iter_lines",
    "RowsDataset",
    "load_tokenizer", "pad_token_id", "stop_token_ids",
]
