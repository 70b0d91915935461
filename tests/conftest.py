"""Shared fixtures: a small training corpus and a runner for train.py with tiny settings."""
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
