"""--mode grpo: reinforcement learning from rewards on the model's own sampled answers (trainer/grpo.py)."""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data import GRPODataset, prompt_collate, stop_token_ids
from model import ModelConfig
from trainer.config import flag
from trainer.errors import UsageError
from trainer.grpo import LOSS_TYPES, GRPOObjective
from trainer.modes.base import Components, Run, hf_export
from trainer.modes.finetune import (FinetuneMode, ReferenceConfig, check_reference_path, load_init_model,
                                    load_reference, read_chat_data)
from trainer.rewards import RewardModel, load_reward_funcs, parse_weights


@dataclass
class GRPOConfig(ReferenceConfig):
    flag_group = "grpo"

    mode: str = "grpo"
    # batch_size counts prompts; each gets num_generations completions (8 x 8 = 64 rows). The learning rate,
    # steps and KL weight were chosen by held-out accuracy on the shipped data (README, GRPO: the runs compared).
    out_dir: str = "out/grpo"
    data_path: str = "dataset/grpo.jsonl"
    sample_val_data: ClassVar[str] = "dataset/grpo_val.jsonl"
    learning_rate: float = 5e-5
    batch_size: int = 8
    max_steps: int = 300
    warmup_iters: int = 5
    eval_interval: int = 50
    log_interval: int = 5
    num_generations: int = flag(8, "Completions sampled per prompt: the group whose mean reward is each one's "
                                "baseline (--batch_size counts prompts).")
    max_completion_length: int = flag(32, "Most tokens sampled per completion; prompts get --max_seq_len minus this. "
                                      "The default fits the shipped task (its answers are under 15 tokens); "
                                      "reasoning or chat data needs far more (TRL's default is 256).")
    temperature: float = flag(0.7, "Sampling temperature of the rollouts; below 1 the samples stay near what the "
                              "model answers greedily, so the rewards sort its likely answers (validation answers "
                              "greedily).")
    beta: float = flag(0.04, "Weight of the KL penalty to the frozen reference (k3 estimator); 0 = no penalty and no "
                       "reference model in memory.")
    epsilon: float = flag(0.2, "Clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high].")
    epsilon_high: float | None = flag(None, "Upper clip of the policy ratio, 1 + epsilon_high (DAPO's clip-higher, "
                                      "e.g. 0.28); default: --epsilon. cispo caps its ratio weights at 1 + "
                                      "epsilon_high too (MiniMax-M1), where TRL caps them at epsilon_high itself: "
                                      "TRL's cispo epsilon_high 5.0 (ScaleRL's) is --epsilon_high 4 here.")
    num_iterations: int = flag(1, "Policy updates (optimizer steps) per batch of rollouts; > 1 reuses them with the "
                               "clipped ratio to the sampling policy, and multiplies the steps per epoch.")
    loss_type: str = flag("dapo", "GRPO loss normalisation: grpo (mean over each completion's tokens, then over "
                          "completions), dr_grpo (sum / (completions x max_completion_length)), dapo (mean over all "
                          "completion tokens), cispo (dapo's, with clipped-ratio weights instead of clipping).",
                          choices=LOSS_TYPES)
    scale_rewards: bool | None = flag(None, "Divide advantages by their group's reward std; default: on, off for "
                                      "--loss_type dr_grpo.")
    reward_funcs: str = flag("accuracy,format", "Comma-separated reward functions: built-in accuracy, format, "
                             "length, or your own as module:function or path/to/file.py:function (see "
                             "trainer/rewards.py); your file or module is imported, so its code runs in this run. "
                             "accuracy compares with the lines' 'answer': without any, it is left out (and says so).")
    reward_weights: str = flag("", "Comma-separated weights of --reward_funcs (then of --reward_model_path); empty = "
                               "all 1.")
    reward_model_path: str = flag("", "A Hugging Face sequence-classification model folder whose first logit is one "
                                  "more reward (loaded offline), or a reward model with its own get_scores (such as "
                                  "InternLM2-1.8B-reward, with --trust_remote_code).")
    trust_remote_code: bool = flag(False, "Let --reward_model_path load the Python code its folder ships (config.json's "
                                   "auto_map, e.g. InternLM2-1.8B-reward's); that code then runs in this run, as a "
                                   "--reward_funcs file does. Off: such a folder is refused, naming this flag.")
    dynamic_sampling: bool = flag(False, "DAPO's dynamic sampling: drop the groups whose completions all score the "
                                  "same (advantage 0: they teach nothing) and roll out fresh prompts in their place "
                                  "(logged: prompts_sampled, frac_trained_zero_std).")
    dynamic_sampling_draws: int = flag(3, "With --dynamic_sampling, the most prompt batches rolled out per batch "
                                       "trained (the first included); short of a full batch after them, dropped "
                                       "groups fill the rest.")
    log_completions_interval: int = flag(50, "Steps between sample completions shown on the console and appended to "
                                         "out_dir/completions.jsonl (and at step 1); 0 = never.")

    def check(self) -> None:
        if self.fsdp:
            raise UsageError("--fsdp with --mode grpo: sampling stops at a different length on each rank, and FSDP "
                             "needs every rank in each forward; train GRPO with DDP (torchrun without --fsdp)")
        if self.num_generations < 2:
            raise UsageError(f"--num_generations {self.num_generations}: must be >= 2 (a completion's baseline is "
                             f"the mean reward of its group)")
        if self.max_completion_length < 1 or self.num_iterations < 1:
            bad = "max_completion_length" if self.max_completion_length < 1 else "num_iterations"
            raise UsageError(f"--{bad} {getattr(self, bad)}: must be >= 1")
        if not self.temperature > 0:
            raise UsageError(f"--temperature {self.temperature:g}: must be > 0 (greedy completions of a prompt are "
                             f"all the same, so their advantages are 0)")
        if self.beta < 0 or not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UsageError(f"--beta {self.beta:g}, --epsilon {self.epsilon:g}, --epsilon_high {self.epsilon_high}: "
                             f"need beta >= 0, 0 <= epsilon < 1 and epsilon_high >= 0")
        if self.dynamic_sampling_draws < 1:
            raise UsageError(f"--dynamic_sampling_draws {self.dynamic_sampling_draws}: must be >= 1 (1 = the batch "
                             f"fetched, nothing more)")
        if self.log_completions_interval < 0:
            raise UsageError(f"--log_completions_interval {self.log_completions_interval}: must be >= 0 (0 = never)")
        check_reference_path(self.reward_model_path, "reward_model_path")
        super().check()


class GRPO(FinetuneMode):
    name = "grpo"
    Config = GRPOConfig

    def refused_flag(self, flag: str, args: argparse.Namespace) -> str | None:
        if flag == "--per_device_train_batch_size":  # TRL counts completions; here a batch is of prompts
            return (f"{flag} is TRL's count of completions per device; --batch_size counts prompts, each sampled "
                    f"--num_generations ({args.num_generations}) times: use --batch_size COMPLETIONS / "
                    f"{args.num_generations}")
        return super().refused_flag(flag, args)

    def model_config(self, cfg: GRPOConfig, overrides: dict[str, Any], tokenizer: Any) -> ModelConfig:
        model_cfg = super().model_config(cfg, overrides, tokenizer)
        if cfg.max_completion_length >= self.seq_len(cfg, model_cfg):
            raise UsageError(f"--max_completion_length {cfg.max_completion_length}: leaves no room for the prompt in "
                             f"--max_seq_len {self.seq_len(cfg, model_cfg)}")
        return model_cfg

    def build(self, run: Run) -> Components:
        """Samples --num_generations completions per prompt, the reward functions score them, and the objective
        raises the likelihood of the better ones; a frozen reference (when --beta > 0) holds it near where it
        started."""
        cfg: GRPOConfig = run.cfg
        funcs = load_reward_funcs(cfg.reward_funcs)
        if cfg.reward_model_path:
            funcs.append(("reward_model", RewardModel(cfg.reward_model_path, run.env.device,
                                                      trust_remote_code=cfg.trust_remote_code)))
        weights = parse_weights(cfg.reward_weights, len(funcs))
        epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        if cfg.loss_type == "cispo" and run.env.is_main:  # the one flag whose meaning differs from TRL's
            print(f"cispo: ratio weights capped at 1 + --epsilon_high = {1 + epsilon_high:g} (TRL's cispo caps them "
                  f"at its epsilon_high itself)", file=sys.stderr)
        dataset = functools.partial(GRPODataset, max_completion_length=cfg.max_completion_length)
        train, val = read_chat_data(run, dataset)
        if "accuracy" in (name for name, _ in funcs) and not train.has_answers:
            # MiniMind's RLAIF lines have none: say so once, rather than a NaN accuracy at every step.
            if run.env.is_main:
                trl = (" (its 'solution' is TRL's field: rename it 'answer' where it holds the final answer)"
                       if "solution" in train.column_names else "")
                print(f"--reward_funcs accuracy: {cfg.data_path} has no 'answer' field{trl}, so accuracy scores "
                      f"nothing and is left out; the other rewards score the completions", file=sys.stderr)
            kept = [i for i, (name, _) in enumerate(funcs) if name != "accuracy"]
            funcs, weights = [funcs[i] for i in kept], [weights[i] for i in kept]
        if not funcs:
            raise UsageError("no reward left to score the completions (--reward_funcs, --reward_model_path); add one, "
                             "e.g. --reward_funcs format or a --reward_model_path")
        model = load_init_model(run)
        objective = GRPOObjective(
            run.tokenizer, funcs, weights, load_reference(run) if cfg.beta > 0 else None,
            stop_ids=stop_token_ids(run.tokenizer, model.config.eos_token_id, model.generation_config),
            num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature, beta=cfg.beta, epsilon=cfg.epsilon,
            epsilon_high=epsilon_high,
            num_iterations=cfg.num_iterations, loss_type=cfg.loss_type,
            scale_rewards=cfg.loss_type != "dr_grpo" if cfg.scale_rewards is None else cfg.scale_rewards,
            dynamic_sampling_draws=cfg.dynamic_sampling_draws if cfg.dynamic_sampling else 0,
            log_completions_interval=cfg.log_completions_interval,
            log_dir=Path(cfg.out_dir) if run.env.is_main else None)
        return Components(model, objective, train, val, prompt_collate(run.pad_id),
                          hf_export(run.tokenizer))
