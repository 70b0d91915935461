"""GRPO reward functions: plain Python callables that score completions.

A reward function is called with keywords, as TRL's GRPOTrainer calls its reward functions, so functions
written for TRL (string prompts and completions) port as they are:

    f(prompts=[str], completions=[str], completion_ids=[[int]], answer=[str | None], **kwargs) -> [float | None]

  prompts          each prompt as rendered with the chat template (what the model saw)
  completions      the decoded completions, without the end-of-turn token
  completion_ids   their token ids, with the end-of-turn token when the model produced one
  answer, ...      every field of the data line besides "prompt", one value per completion (None if absent)
  prompt_messages  the prompt as a list of {"role", "content"} messages
  max_completion_length   the --max_completion_length of the run

Accept **kwargs to ignore what you do not use. Return one float per completion, or None where the function
does not apply (e.g. a prompt without a reference answer): it then adds nothing to that completion's reward
and is left out of its logged mean. `--reward_funcs accuracy,format,my_rewards:brevity` picks built-in ones by
name and the user's by `module:function` (the current folder is importable) or `path/to/file.py:function`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UsageError

RewardFunc = Callable[..., list[float | None]]

# A number as people write it: sign, thousands separators, decimals (1,234.5  -7  .5).
_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_FORMAT = re.compile(r"<think>\n(.*?)\n</think>\n(.*\S.*)", re.DOTALL)


def _boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(completion: str) -> str:
    r"""Where a completion states its answer: the last \boxed{...}; else what follows the last "####" (GSM8K's
    mark); else what follows the last "the answer is"; else the text after the last </think> (the reply after the
    reasoning), else the whole completion."""
    boxed = _boxed(completion)
    if boxed is not None:
        return boxed
    if "####" in completion:
        return completion.rsplit("####", 1)[1]
    said = _ANSWER_IS.findall(completion)
    if said:
        return said[-1]
    return completion.rsplit("</think>", 1)[-1]


def parse_number(text: str) -> float | None:
    """The number `text` is (commas and a trailing period allowed), or None."""
    text = text.strip().rstrip(".").replace("−", "-")
    if not text or _NUMBER.fullmatch(text) is None:
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(completion: str, answer: str) -> bool:
    """Does the completion's final answer (see final_answer) match the reference answer?

    A numeric answer matches the LAST number of the final answer ("21 + 19 - 11 = 29." -> 29; "1,000" = 1000;
    equal to 1e-6 relative). Any other answer matches when the final answer, lower-cased with punctuation
    removed, is it or ends with it as whole words ("'crown' reversed is 'nworc'." matches "nworc"). A reference
    written as GSM8K's are, the worked solution then "#### 72", is the part after the mark.
    """
    stated = final_answer(completion)
    answer = answer.rsplit("####", 1)[-1]
    target = parse_number(answer)
    if target is not None:
        numbers = [m.group() for m in _NUMBER.finditer(stated) if any(c.isdigit() for c in m.group())]
        value = parse_number(numbers[-1]) if numbers else None
        return value is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9)
    want, got = _normalise(answer), _normalise(stated)
    return bool(want) and (got == want or got.endswith(" " + want))


def accuracy_reward(completions: list[str], answer: list[str | None], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's final answer matches the line's "answer" (is_correct), else 0.0; None for
    prompts without an answer."""
    return [None if a is None else float(is_correct(c, a)) for c, a in zip(completions, answer)]


def format_reward(completions: list[str], **kwargs: Any) -> list[float | None]:
    """1.0 for a completion shaped "<think>\\n reasoning \\n</think>\\n answer" (one think block, then a
    non-empty answer), else 0.0. Prompts whose groups all miss (or all hit) the format get no advantage from it,
    so it only steers where the model varies."""
    out = []
    for c in completions:
        m = _FORMAT.fullmatch(c.strip())
        ok = m is not None and "think>" not in m.group(1) and "think>" not in m.group(2)
        out.append(float(ok))
    return out


def length_penalty(completion_ids: list[list[int]], max_completion_length: int, **kwargs: Any
                   ) -> list[float | None]:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to the last quarter of --max_completion_length,
    then falling linearly to -1 at the limit (a completion cut there, without an end of turn, gets -1)."""
    cache = max(1, max_completion_length // 4)
    free = max_completion_length - cache
    return [max(-1.0, min(0.0, (free - len(ids)) / cache)) for ids in completion_ids]


BUILTIN_REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward,
                                          "length": length_penalty}


def _import_function(spec: str) -> RewardFunc:
    """`module:function` or `path/to/file.py:function` -> the function, or a UsageError saying what is wrong."""
    where, _, name = spec.rpartition(":")
    flag = f"--reward_funcs {spec}"
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"{flag}: no such file {path}")
        # Registered under a name of its own while it runs: dataclasses (and pickle) look a module up in
        # sys.modules, and the file's plain stem could replace a module of that name (json.py, for one).
        module_name = f"reward_file_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise UsageError(f"{flag}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        if os.getcwd() not in sys.path:  # `python train.py` puts the script's folder on the path, not the cwd
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise UsageError(f"{flag}: cannot import module {where!r} ({e}); run from the folder that holds it, "
                             f"add it to PYTHONPATH, or give a file: path/to/{where.replace('.', '/')}.py:{name}"
                             ) from None
        except Exception as e:
            raise UsageError(f"{flag}: importing {where!r} failed: {type(e).__name__}: {e}") from None
    func = getattr(module, name, None)
    if func is None:
        raise UsageError(f"{flag}: {where} has no attribute {name!r}")
    if not callable(func):
        raise UsageError(f"{flag}: {where}.{name} is a {type(func).__name__}, not a function")
    return func


def load_reward_funcs(spec: str) -> list[tuple[str, RewardFunc]]:
    """(name, function) for each comma-separated entry of --reward_funcs: a built-in name or module:function."""
    funcs = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        if ":" in entry:
            funcs.append((entry.rpartition(":")[2], _import_function(entry)))
        elif entry in BUILTIN_REWARDS:
            funcs.append((entry, BUILTIN_REWARDS[entry]))
        else:
            raise UsageError(f"--reward_funcs: unknown reward {entry!r}; built in: {', '.join(BUILTIN_REWARDS)}, "
                             f"or your own as module:function or path/to/file.py:function")
    names = [n for n, _ in funcs]
    if len(set(names)) != len(names):
        raise UsageError(f"--reward_funcs {spec}: two rewards named the same ({', '.join(names)}); each is logged "
                         f"as rewards/<name>")
    return funcs


def parse_weights(spec: str, n: int) -> list[float]:
    """--reward_weights: one float per reward (model included); empty = all 1."""
    if not spec.strip():
        return [1.0] * n
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise UsageError(f"--reward_weights {spec}: expected comma-separated numbers") from None
    if len(weights) != n:
        raise UsageError(f"--reward_weights {spec}: {len(weights)} weight(s) for {n} reward(s) (--reward_funcs, "
                         f"then --reward_model_path if given)")
    return weights


def remote_code_class(folder: str | Path) -> str | None:
    """The class a model folder's config.json maps to code of its own (auto_map) for a model type transformers
    does not know, or None: what loading it with trust_remote_code would import and run."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the loader then names what is wrong with the folder
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map or config.get("model_type") in CONFIG_MAPPING:
        return None
    return auto_map.get("AutoModelForSequenceClassification") or auto_map.get("AutoModel") or next(
        iter(auto_map.values()))


class RewardModel:
    """A reward model as a reward function: a Hugging Face sequence-classification model (any
    AutoModelForSequenceClassification folder), the score of prompt + completion being its first logit; or a model
    with its own scoring method, get_scores(tokenizer, conversations) (InternLM2-reward's API), loaded as AutoModel.
    Loaded offline. A folder whose model is its own code loads only with trust_remote_code (--trust_remote_code),
    since loading runs that code.

    The conversation (prompt messages + the completion as the assistant's reply) is rendered with the reward
    model's own chat template when it has one, else prompt text and completion are joined."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16, trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        own_code = remote_code_class(path)
        if own_code and not trust_remote_code:
            raise UsageError(f"--reward_model_path {path}: its model is code of its own ({own_code}, config.json's "
                             f"auto_map), which loading runs; pass --trust_remote_code if you trust that folder")
        options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **options)
            auto_map = getattr(AutoConfig.from_pretrained(path, **options), "auto_map", None) or {}
            # Its own code without a sequence-classification class: a model that scores with get_scores.
            self.scorer = bool(own_code) and "AutoModelForSequenceClassification" not in auto_map
            loader = AutoModel if self.scorer else AutoModelForSequenceClassification
            self.model = loader.from_pretrained(path, **options)
        except (OSError, ValueError, ImportError) as e:  # ImportError: a package its own code needs
            raise UsageError(f"--reward_model_path {path}: cannot load a sequence-classification model and its "
                             f"tokenizer there ({str(e).splitlines()[0]})") from None
        if self.scorer and not callable(getattr(self.model, "get_scores", None)):
            raise UsageError(f"--reward_model_path {path}: its model ({type(self.model).__name__}) is neither a "
                             f"sequence classifier nor has get_scores(tokenizer, conversations)")
        self.model.to(device).eval().requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size

    def texts(self, prompts: list[str], completions: list[str], prompt_messages: list[list[dict[str, str]]]
              ) -> list[str]:
        if not self.tokenizer.chat_template:
            return [p + c for p, c in zip(prompts, completions)]
        return [self.tokenizer.apply_chat_template(m + [{"role": "assistant", "content": c}], tokenize=False)
                for m, c in zip(prompt_messages, completions)]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], prompt_messages: list[list[dict[str, str]]],
                 **kwargs: Any) -> list[float | None]:
        if self.scorer:
            conversations = [m + [{"role": "assistant", "content": c}] for m, c in zip(prompt_messages, completions)]
            return [float(x) for i in range(0, len(conversations), self.batch_size)
                    for x in self.model.get_scores(self.tokenizer, conversations[i:i + self.batch_size])]
        texts, scores = self.texts(prompts, completions, prompt_messages), []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 add_special_tokens=False).to(self.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores
