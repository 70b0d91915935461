#!/usr/bin/env python
"""Side by side with TRL: the same model, data lines and settings through our loop and through TRL's trainers.

For each case a tiny model (one of our exports; TRL loads it with transformers) is trained for --steps steps
twice: by train.py's loop and by TRL's SFTTrainer, DPOTrainer or GRPOTrainer. Recorded per case: the step-1 loss
of both, the largest |difference| of the losses over the steps, the losses themselves, and the median step time
of both with their ratio, measured in the same run.

What makes the two runs comparable:
  - one batch is the whole sample (16 conversations, 8 pairs, or 4 prompts x 4 completions), so every step of
    both trains on the same rows; the order in which each trainer draws rows is no part of the comparison
  - the same settings: constant learning rate (HF's warmup starts from lr 0, ours from lr / warmup), AdamW
    (fused, betas 0.9 / 0.95, weight decay 0.1 on matrices only), gradient clipping at 1.0, float32, no dropout,
    no gradient checkpointing (TRL's default is on, ours off)
  - GRPO: the rollouts are fixed completions fed to both (ours through GRPOObjective.sample, TRL's through
    rollout_func), scored by seeded_reward, a pseudo-random function of the completion's tokens that returns
    None for about a fifth of them (so unscorable completions are part of every GRPO case)
  - TRL's loss is the one it logs each step; its step time runs from one step's end to the next, ours is the
    time metrics.jsonl's tokens/s was measured over (also one whole step: data, rollouts, forward, backward,
    optimizer, logging)

Where our semantics differ from TRL's on purpose, a case shows the numbers both ways (see the README's
"Side by side with TRL"): DPO's reply tokens (TRL's own tokenization also trains on the newline after
<|im_end|>), IPO (summed vs per-token-averaged log-probs), GRPO's KL gradient (TRL's default weights the KL by
the ratio), CISPO's --epsilon_high (a cap of 1 + epsilon_high vs epsilon_high) and the MoE balancing loss of an
imported Qwen3-MoE checkpoint.

    python bench/peers.py                       # every case; prints the table
    python bench/peers.py --cases sft,dpo       # cases whose name starts with these
    python bench/peers.py --record              # and appends it to bench/RESULTS.md

Needs TRL (bench/requirements.txt); it is never a dependency of the framework itself.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from common import ROOT, HelpFormatter, load_after, machine_line, report
from data import DPODataset, load_tokenizer, render_prompt
from model import Transformer
from model.config import config_from_preset
from trainer.modes import Components

IM_END = "<|im_end|>"
SEED = 0


# ----------------------------------------------------------------------------- what both are given


@dataclass
class Settings:
    """One case's settings, spelled for both trainers by ours_flags and trl_config."""
    mode: str  # sft, dpo, grpo
    learning_rate: float
    batch_size: int  # rows per step: conversations, pairs, or prompts (GRPO)
    steps: int = 20
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    num_generations: int = 4
    max_completion_length: int = 16
    temperature: float = 0.7
    beta: float = 0.04  # GRPO's KL weight
    epsilon: float = 0.2
    epsilon_high: float | None = None  # ours: the ratio's upper clip is 1 + this; None = epsilon
    trl_epsilon_high: float | None = None  # TRL's spelling when it differs (cispo: the cap itself)
    loss_type: str = "dapo"
    num_iterations: int = 2
    aux_loss: bool = True  # MoE balancing loss (ours: --aux_loss_alpha as imported; TRL: router_aux_loss_coef)
    trl_kl_correction: bool = False  # TRL's use_bias_correction_kl (its default: on); ours has none


@dataclass
class Case:
    name: str
    settings: Settings
    model: str = "dense"  # dense: our export; qwen3_moe: a checkpoint transformers made, imported by ours
    trl_tokens: str = "ours"  # dpo: "ours" = TRL trains on DPODataset's tokens, "trl" = on its own tokenization
    note: str = ""


def cases(steps: int) -> list[Case]:
    sft = Settings("sft", learning_rate=1e-3, batch_size=16, steps=steps)
    dpo = Settings("dpo", learning_rate=1e-3, batch_size=8, steps=steps)
    grpo = Settings("grpo", learning_rate=1e-3, batch_size=4, steps=steps)
    return [
        Case("sft", sft),
        Case("dpo sigmoid", dpo),
        Case("dpo sigmoid, TRL tokenizes", dpo, trl_tokens="trl",
             note="TRL's own tokenization also trains on the newline after <|im_end|>; ours stops at <|im_end|>"),
        Case("dpo ipo", replace(dpo, dpo_loss="ipo"),
             note="ours: IPO on summed log-probs (as DPO's h); TRL averages each side per token first"),
        Case("grpo dapo", grpo),
        Case("grpo dapo, TRL's KL correction", replace(grpo, trl_kl_correction=True),
             note="TRL's default use_bias_correction_kl=True weights the KL by the ratio: same values, another "
                  "gradient; ours is the k3 KL of the GRPO paper"),
        Case("grpo grpo", replace(grpo, loss_type="grpo")),
        Case("grpo dr_grpo", replace(grpo, loss_type="dr_grpo")),
        Case("grpo cispo, same cap", replace(grpo, loss_type="cispo", epsilon_high=0.0, trl_epsilon_high=1.0),
             note="a cap of 1: --epsilon_high 0 here, epsilon_high 1.0 in TRL"),
        Case("grpo cispo, same number", replace(grpo, loss_type="cispo", epsilon_high=1.0, trl_epsilon_high=1.0),
             note="--epsilon_high 1.0 here caps at 2, TRL's epsilon_high 1.0 at 1"),
        Case("sft qwen3-moe, no aux loss", replace(sft, aux_loss=False), model="qwen3_moe",
             note="--aux_loss_alpha 0 here, router_aux_loss_coef=0 in TRL"),
        Case("sft qwen3-moe, default aux loss", sft, model="qwen3_moe",
             note="ours: per-sequence balancing (seq_aux) x 0.001; TRL: Mixtral's batch-level loss x 0.001"),
    ]


def dense_model(folder: Path, tokenizer: Any) -> Path:
    """Our tiny export: dim 64, 2 layers, the shipped tokenizer, random weights (seed 0)."""
    torch.manual_seed(SEED)
    Transformer(config_from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def qwen3_moe_model(folder: Path, tokenizer: Any) -> Path:
    """A tiny Qwen3-MoE checkpoint as transformers makes one (4 experts, top 2, router_aux_loss_coef 0.001): what
    an imported Hub model looks like, without our "zero2llm" config block."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                            tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    Qwen3MoeForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sample_lines(mode: str, n: int) -> list[dict]:
    """The first n lines of the shipped training file of `mode`."""
    with open(ROOT / "dataset" / f"{mode}.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


def seeded_reward(completion_ids: list[list[int]], **kwargs: Any) -> list[float | None]:
    """A reward in [0, 1) drawn from a generator seeded by the completion's tokens: the same value whoever asks and
    in whatever order; None (no reward applies) for about a fifth of the completions."""
    out = []
    for ids in completion_ids:
        value = random.Random(f"{SEED} {list(ids)}").random()
        out.append(None if value < 0.2 else value)
    return out


class FixedCompletions:
    """G fixed replies per prompt (ending with <|im_end|>), for both trainers: what each prompt's rollouts are."""

    def __init__(self, tokenizer: Any, lines: list[dict], num_generations: int) -> None:
        self.G = num_generations
        self.pad = tokenizer.pad_token_id
        self.by_prompt: dict[tuple[int, ...], list[list[int]]] = {}
        self.prompt_ids: dict[str, list[int]] = {}
        end = tokenizer.convert_tokens_to_ids(IM_END)
        for line in lines:
            answer = str(line["answer"])
            replies = [answer, f"The answer is {answer}.", f"<think>\nStep by step.\n</think>\n{answer}",
                       f"It is {answer}, I think, or maybe not", f"{answer}!", "I do not know."][:num_generations]
            ids = render_prompt(tokenizer, line["prompt"])[1]
            self.prompt_ids[json.dumps(line["prompt"])] = ids
            self.by_prompt[tuple(ids)] = [tokenizer(r, add_special_tokens=False)["input_ids"] + [end] for r in replies]

    def ours(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPOObjective.sample: row i (completion i % G of its prompt) gets that fixed reply, right-padded."""
        rows = [self.by_prompt[tuple(ids[mask.bool()].tolist())][i % self.G]
                for i, (ids, mask) in enumerate(zip(prompt_ids, prompt_mask))]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], device=prompt_ids.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=prompt_ids.device)
        return tokens, mask

    def trl(self, prompts: list[list[dict]], trainer: Any) -> dict[str, Any]:
        """TRL's rollout_func: each prompt comes num_generations times in a row; the k-th gets fixed reply k."""
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for messages in prompts:
            key = json.dumps(messages)
            k = seen[key] = seen.get(key, -1) + 1
            prompt_ids.append(self.prompt_ids[key])
            completion_ids.append(self.by_prompt[tuple(self.prompt_ids[key])][k % self.G])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


# ----------------------------------------------------------------------------- the two runs


@dataclass
class Trajectory:
    losses: list[float]
    step_times: list[float]  # seconds per step, from step 2 on (step 1 includes one-off set-up)
    aux_losses: list[float] = field(default_factory=list)  # the MoE balancing loss inside each loss

    @property
    def step_time(self) -> float:
        return statistics.median(self.step_times)


def ours_flags(s: Settings, model_dir: Path, data: Path, out: Path) -> list[str]:
    flags = ["--mode", s.mode, "--init_from", str(model_dir), "--data_path", str(data), "--val_data_path", str(data),
             "--out_dir", str(out), "--batch_size", str(s.batch_size), "--max_steps", str(s.steps),
             "--learning_rate", str(s.learning_rate), "--warmup_iters", "0", "--min_lr_ratio", "1.0",
             "--weight_decay", "0.1", "--beta1", "0.9", "--beta2", "0.95", "--grad_clip", "1.0", "--log_interval", "1",
             "--eval_interval", "0", "--eval_iters", "1", "--save_interval_steps", "0", "--no-save_last",
             "--device", "cpu", "--dtype", "float32", "--seed", str(SEED), "--dropout", "0"]
    if not s.aux_loss:
        flags += ["--aux_loss_alpha", "0"]
    if s.mode == "dpo":
        flags += ["--dpo_beta", str(s.dpo_beta), "--dpo_loss", s.dpo_loss]
    if s.mode == "grpo":
        flags += ["--num_generations", str(s.num_generations), "--max_completion_length", str(s.max_completion_length),
                  "--temperature", str(s.temperature), "--beta", str(s.beta), "--epsilon", str(s.epsilon),
                  "--loss_type", s.loss_type, "--num_iterations", str(s.num_iterations),
                  "--reward_funcs", f"{Path(__file__).resolve()}:seeded_reward", "--log_completions_interval", "0"]
        if s.epsilon_high is not None:
            flags += ["--epsilon_high", str(s.epsilon_high)]
    return flags


def run_ours(s: Settings, model_dir: Path, data: Path, out: Path,
             adjust: Callable[[Components], None] | None = None) -> Trajectory:
    """train.py's loop, in this process; losses and step times from its metrics.jsonl."""
    import train

    train.main(ours_flags(s, model_dir, data, out), adjust=adjust)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    times = [(b["tokens_seen"] - a["tokens_seen"]) / b["tokens_per_sec"] for a, b in zip(steps, steps[1:])]
    return Trajectory([r["loss"] for r in steps], times, [r.get("aux_loss", 0.0) for r in steps])


def trl_config(s: Settings, out: Path) -> Any:
    """TRL's config class of the mode, with the same settings."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    common = dict(output_dir=str(out), per_device_train_batch_size=s.batch_size, max_steps=s.steps,
                  learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1,
                  adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
                  logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", bf16=False, fp16=False,
                  use_cpu=True, gradient_checkpointing=False, seed=SEED, disable_tqdm=True,
                  router_aux_loss_coef=None if s.aux_loss else 0.0)
    if s.mode == "sft":
        return SFTConfig(**common, assistant_only_loss=True, max_length=None)
    if s.mode == "dpo":
        return DPOConfig(**common, beta=s.dpo_beta, loss_type=[s.dpo_loss], max_length=None)
    epsilon_high = s.trl_epsilon_high if s.trl_epsilon_high is not None else s.epsilon_high
    return GRPOConfig(**{**common, "per_device_train_batch_size": s.batch_size * s.num_generations},
                      num_generations=s.num_generations, max_completion_length=s.max_completion_length,
                      temperature=s.temperature, beta=s.beta, epsilon=s.epsilon, epsilon_high=epsilon_high,
                      loss_type=s.loss_type, num_iterations=s.num_iterations,
                      use_bias_correction_kl=s.trl_kl_correction,
                      scale_rewards="none" if s.loss_type == "dr_grpo" else "group")


def trl_recorder() -> tuple[Any, Trajectory]:
    """A TrainerCallback that keeps each step's logged loss (and MoE aux loss) and the time between step ends."""
    from transformers import TrainerCallback

    trajectory = Trajectory([], [])
    ends: list[float] = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            if len(ends) > 1:
                trajectory.step_times.append(ends[-1] - ends[-2])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                trajectory.losses.append(float(logs["loss"]))
                trajectory.aux_losses.append(float(logs.get("aux_loss", 0.0)))

    return Recorder(), trajectory


def dpo_trainer_on_our_tokens(dataset: DPODataset) -> type:
    """TRL's DPOTrainer, trained on the tokens DPODataset trains on: each side's reply and its <|im_end|>, the
    shared prompt before it (TRL's own tokenization also counts the template's newline after <|im_end|>)."""
    from datasets import Dataset
    from trl import DPOTrainer

    rows = []
    for i in range(len(dataset)):
        sides = {}
        for side in dataset.SIDES:
            a, b = dataset.offsets[side][i], dataset.offsets[side][i + 1]
            ids, trained = dataset.tokens[side][a:b].tolist(), dataset.trained[side][a:b]
            start = int(trained.argmax())
            end = len(trained) - int(trained[::-1].argmax())
            sides[side] = (ids[:start], ids[start:end])
        assert sides["chosen"][0] == sides["rejected"][0]
        rows.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                     "rejected_ids": sides["rejected"][1]})

    class OnOurTokens(DPOTrainer):
        def _prepare_dataset(self, *args: Any, **kwargs: Any) -> Any:
            return Dataset.from_list(rows)

    return OnOurTokens


def run_trl(case: Case, model_dir: Path, lines: list[dict], tokenizer: Any, out: Path,
            fixed: FixedCompletions | None, data_file: Path) -> Trajectory:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    s = case.settings
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    recorder, trajectory = trl_recorder()
    args = trl_config(s, out)
    if s.mode == "sft":
        data = Dataset.from_list([{"messages": line["conversations"]} for line in lines])
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[recorder])
    elif s.mode == "dpo":
        cls = DPOTrainer if case.trl_tokens == "trl" else dpo_trainer_on_our_tokens(
            DPODataset(data_file, tokenizer, 128))
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(lines), processing_class=tokenizer,
                      callbacks=[recorder])
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
        data = Dataset.from_list([{"prompt": line["prompt"], "answer": str(line["answer"])} for line in lines])
        trainer = GRPOTrainer(model=model, reward_funcs=[seeded_reward], args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[recorder], rollout_func=fixed.trl)
    trainer.remove_callback(PrinterCallback)  # it prints every log line; the table is the output here
    trainer.train()
    # TRL logs the balancing loss unweighted; what its loss holds is router_aux_loss_coef times it (ours logs that)
    trajectory.aux_losses = [a * getattr(trainer, "router_aux_loss_coef", 0.0) for a in trajectory.aux_losses]
    return trajectory


def compare(case: Case, folder: Path, tokenizer: Any, trl_first: bool = False) -> tuple[Trajectory, Trajectory]:
    """(ours, TRL's) trajectories of one case, in `folder` (models, data and run folders); `trl_first` runs TRL's
    first (rounds alternate the order, so neither always runs on a warmer or quieter machine)."""
    s = case.settings
    model_dir = folder / case.model
    if not model_dir.exists():
        (dense_model if case.model == "dense" else qwen3_moe_model)(model_dir, tokenizer)
    lines = sample_lines(s.mode, s.batch_size)
    data = folder / f"{s.mode}.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fixed = FixedCompletions(tokenizer, lines, s.num_generations) if s.mode == "grpo" else None

    def feed_fixed(parts: Components) -> None:
        parts.objective.sample = fixed.ours

    run_dir = Path(tempfile.mkdtemp(dir=folder))
    runs = {"ours": lambda: run_ours(s, model_dir, data, run_dir / "ours", feed_fixed if fixed else None),
            "trl": lambda: run_trl(case, model_dir, lines, tokenizer, run_dir / "trl", fixed, data)}
    done = {name: runs[name]() for name in (("trl", "ours") if trl_first else ("ours", "trl"))}
    return done["ours"], done["trl"]


# ----------------------------------------------------------------------------- the record


def max_difference(a: Trajectory, b: Trajectory) -> float:
    return max(abs(x - y) for x, y in zip(a.losses, b.losses, strict=True))


def settings_text(case: Case) -> str:
    s = case.settings
    text = f"lr {s.learning_rate:g}, batch {s.batch_size}"
    if s.mode == "dpo":
        text += f", beta {s.dpo_beta:g}, {s.dpo_loss}"
    if s.mode == "grpo":
        eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
        trl_high = eps_high if s.trl_epsilon_high is None else s.trl_epsilon_high
        high = f"{eps_high:g}" if trl_high == eps_high else f"{eps_high:g} / TRL {trl_high:g}"
        text += (f" x {s.num_generations}, {s.loss_type}, beta {s.beta:g}, epsilon {s.epsilon:g}, epsilon_high "
                 f"{high}, {s.num_iterations} iterations, temperature {s.temperature:g}")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per run.")
    parser.add_argument("--cases", default="", help="Comma-separated prefixes of case names to run; empty = all.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs of both per case; the step-time ratio is the "
                        "median over rounds of the ratio measured in each (the losses are round 1's).")
    parser.add_argument("--record", action="store_true", help="Append the table to bench/RESULTS.md.")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import accelerate
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    wanted = [p.strip() for p in args.cases.split(",") if p.strip()]
    selected = [c for c in cases(args.steps) if not wanted or any(c.name.startswith(p) for p in wanted)]
    tokenizer = load_tokenizer(ROOT / "tokenizer")
    header = (f"Side by side with TRL {trl.__version__} (transformers {transformers.__version__}, accelerate "
              f"{accelerate.__version__}): {args.steps} steps, {args.rounds} rounds, tiny model (dim 64, 2 layers, "
              f"vocab {len(tokenizer)}), float32, cpu — {machine_line(torch.device('cpu'))}")
    table = ["| case | settings | step-1 loss, ours | step-1 loss, TRL | largest difference | step ms, ours | "
             "step ms, TRL | TRL / ours |", "|---|---|---|---|---|---|---|---|"]
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in selected:
            rounds = [compare(case, Path(tmp), tokenizer, trl_first=r % 2 == 1) for r in range(args.rounds)]
            ours, theirs = rounds[0]
            ratio = statistics.median(t.step_time / o.step_time for o, t in rounds)
            ours_ms = statistics.median(o.step_time for o, _ in rounds) * 1e3
            trl_ms = statistics.median(t.step_time for _, t in rounds) * 1e3
            row = (f"| {case.name} | {settings_text(case)} | {ours.losses[0]:.6f} | {theirs.losses[0]:.6f} | "
                   f"{max_difference(ours, theirs):.1e} | {ours_ms:.0f} | {trl_ms:.0f} | {ratio:.2f}x |")
            table.append(row)
            print(row, flush=True)
            losses = [f"- {case.name}" + (f" ({case.note})" if case.note else "") + ":",
                      "  ours " + " ".join(f"{x:.5f}" for x in ours.losses),
                      "  TRL  " + " ".join(f"{x:.5f}" for x in theirs.losses)]
            if case.model != "dense" and case.settings.aux_loss:
                losses += ["  the MoE balancing loss in them:",
                           "  ours " + " ".join(f"{x:.5f}" for x in ours.aux_losses),
                           "  TRL  " + " ".join(f"{x:.5f}" for x in theirs.aux_losses)]
            details += losses
    report([header + f" ({load_after()})", "", *table, "", "Losses, step 1 on:", "", *details], args.record)


if __name__ == "__main__":
    main()
