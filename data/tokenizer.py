"""The tokenizer rules every part of the project shares: how one is loaded, which id pads, which ids end an answer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import DataError


def load_tokenizer(folder: str | Path) -> Any:
    """The Hugging Face tokenizer saved in `folder` (tokenizer.json + tokenizer_config.json), read offline.

    A folder without one, or with a broken one, is a DataError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # a missing folder or file, broken JSON, JSON of another schema: each raises its own type
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{folder}: cannot load a tokenizer there ({type(e).__name__}: {reason}); it needs "
                        f"tokenizer.json + tokenizer_config.json as transformers saves them") from None


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos (padding is masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad or 0


def stop_token_ids(tokenizer: Any, model_eos: int | None = None, generation_config: dict | None = None) -> list[int]:
    """Tokens that end an answer: the tokenizer's eos, ChatML's <|im_end|>, the model config's eos, and those of the
    model folder's generation_config.json (an imported Llama 3 Instruct lists <|eot_id|> there). Chat, GRPO's
    rollouts and the held-out checks all stop on these."""
    ids = {tokenizer.eos_token_id, model_eos, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    listed = (generation_config or {}).get("eos_token_id")
    ids.update(listed if isinstance(listed, list) else [listed])
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)
