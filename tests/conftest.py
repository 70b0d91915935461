"""Shared fixtures: a small training corpus, SFT data, a tiny base model, and train.py argv with tiny settings."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tokenizer"
# A multi-turn chat with a system prompt: what the chat template and the SFT masks are tested on.
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
    {"role": "user", "content": "And if you add 3 more?"},
    {"role": "assistant", "content": "19 + 3 = 22."},
]


@pytest.fixture(scope="session")
def tok():
    """The shipped tokenizer, loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))

# Small, repetitive English: a tiny model's loss falls quickly and measurably on it.
_WORDS = ("the king and the queen walk to the castle , where a knight waits by the gate . "
          "she reads a letter from her brother and smiles . the night is cold and the fire is warm .").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train.jsonl / val.jsonl of short documents built from a fixed word sequence."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    paths = {}
    for name, n_docs in (("train", 300), ("val", 30)):
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(n_docs):
                start = rng.randrange(len(_WORDS))
                words = [_WORDS[(start + i) % len(_WORDS)] for i in range(rng.randrange(20, 60))]
                f.write(json.dumps({"text": " ".join(words)}) + "\n")
        paths[name] = path
    return paths


TINY = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
        "--max_seq_len", "32", "--batch_size", "4", "--log_interval", "1", "--warmup_iters", "2",
        "--eval_iters", "4", "--device", "cpu", "--dtype", "float32"]


def train_args(corpus: dict[str, Path], out_dir: Path, *extra: str) -> list[str]:
    return ["--data_path", str(corpus["train"]), "--val_data_path", str(corpus["val"]),
            "--out_dir", str(out_dir), *TINY, *extra]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl (later records win, as after a resume)."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: dicts as JSON, strings as they are (to write malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    """The rows as a .parquet file, as a Hugging Face dataset's (small row groups: several batches to read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))  # every row's (from_pylist takes the first's)
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory) -> dict[str, Path]:
    """A small mix of the shipped chats and Alpaca rows (train) and held-out chats (val)."""
    folder = tmp_path_factory.mktemp("sft")
    chats = (ROOT / "dataset" / "sft.jsonl").read_text().splitlines()[:200]
    alpaca = (ROOT / "dataset" / "sft_alpaca.jsonl").read_text().splitlines()[:40]
    val = (ROOT / "dataset" / "sft_val.jsonl").read_text().splitlines()[:32]
    return {"train": write_jsonl(folder / "train.jsonl", chats + alpaca), "val": write_jsonl(folder / "val.jsonl", val)}


def sft_args(files: dict[str, Path], base: Path, out: Path, *extra: str) -> list[str]:
    """train.py argv for a short --mode sft run on `files` from the `base` model folder."""
    return ["--mode", "sft", "--init_from", str(base), "--data_path", str(files["train"]),
            "--val_data_path", str(files["val"]), "--out_dir", str(out), "--batch_size", "8", "--log_interval", "1",
            "--warmup_iters", "2", "--device", "cpu", "--dtype", "float32", *extra]


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tok) -> Path:
    """A tiny randomly initialised model folder (weights, config, tokenizer) to fine-tune from."""
    import torch

    from model import Transformer
    from model.config import config_from_preset

    folder = tmp_path_factory.mktemp("base") / "final"
    torch.manual_seed(0)
    Transformer(config_from_preset("tiny", vocab_size=len(tok), max_seq_len=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def check_resume_is_exact(args_for, tmp_path: Path, total: int, split: int, *common: str) -> None:
    """`total` steps straight vs `split` steps + --resume to `total`: the losses after the resume must be equal
    (same data, same dropout masks, same optimizer state). `args_for(out_dir, *extra)` gives train.py's argv."""
    import train

    straight, resumed = tmp_path / "straight", tmp_path / "split"
    train.main(args_for(straight, "--max_steps", str(total), *common))
    train.main(args_for(resumed, "--max_steps", str(split), *common))
    train.main(args_for(resumed, "--max_steps", str(total), "--resume", *common))
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == list(range(1, total + 1))
    for step in range(split + 1, total + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step


def endless_chat_model(tok, max_seq_len: int = 4096):
    """A model for the shipped tokenizer that never emits a stop token, so an answer runs until it is stopped.

    Its blocks add nothing (o_proj, down_proj = 0), so the final hidden state is the normed token embedding, whose
    first feature is always positive; the stop tokens' output rows point the other way.
    """
    import torch

    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tok), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                    max_seq_len=max_seq_len, tie_word_embeddings=False))
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 3.0
        for stop in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")):
            model.lm_head.weight[stop] = 0.0
            model.lm_head.weight[stop, 0] = -100.0
    return model.eval()
