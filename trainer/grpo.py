"""GRPO: reinforcement learning from rewards on the model's own samples (Shao et al. 2024, DeepSeekMath).

For each prompt the model samples a group of G completions; reward functions score them; each completion's
advantage is its reward relative to its group's (A = (r - mean) / std); the policy gradient raises the
log-probability of better-than-average completions, with PPO's clipped ratio and a KL penalty to a frozen
reference. No value model: the group is the baseline.

It plugs into the one loop (trainer/loop.py) through its objective protocol:
  prepare(model, micro_batches, step, draw)
                                       once per batch of prompts, no grad: sample, score, advantages, and the
                                       rollout-time (old) and reference log-probs -> the batches trained on
                                       (dynamic sampling draws more prompt batches with `draw`)
  num_iterations                       optimizer steps on each prepared batch (the loop reuses it)
  __call__(model, batch)               the clipped objective on a prepared batch: (loss sum, metrics)
  eval_step(model, batch)              validation: greedy answers to held-out prompts, (-reward sum, metrics)
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from model.generate import generate_answers
from trainer.distributed import all_reduce_max
from trainer.errors import UsageError
from trainer.objectives import IGNORE_INDEX, Objective, token_logps
from trainer.rewards import RewardFunc

Batch = dict[str, Any]
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "cispo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion [N], reward std of each group [N / group_size]).

    Rows i*G .. i*G+G-1 are the completions of prompt i. A = r - mean(group), divided by the group's
    (unbiased) std when `scale` (GRPO; Dr. GRPO leaves it out: it over-weights groups that barely differ).
    A group whose rewards are all equal has std 0 and advantage 0: it teaches nothing.
    A NaN reward marks a completion that no reward function applies to: it is left out of its group's mean and
    std and its advantage is 0, since it is evidence neither way (as in TRL). A group with fewer than two scored
    completions has no std (NaN) and advantages 0.
    """
    grouped = rewards.view(-1, group_size)
    count = (~grouped.isnan()).sum(dim=1)
    mean = grouped.nanmean(dim=1, keepdim=True)
    variance = ((grouped - mean) ** 2).nanmean(dim=1) * count / (count - 1)
    std = torch.where(count > 1, variance.sqrt(), torch.nan)
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std[:, None] + eps)
    return advantages.nan_to_num(nan=0.0).flatten(), std


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                   advantages: torch.Tensor, loss_type: str, epsilon: float, epsilon_high: float,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N, L], KL [N, L] (zeros without a reference), clipped [N, L]) for each completion token.

    r = exp(logp - old_logp), the ratio to the policy that sampled the completion; A its sequence's advantage.
    Log-probs are those of the sampling distribution (logits / --temperature), as in TRL.
      grpo, dr_grpo, dapo:  -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta KL
      cispo (MiniMax-M1):   -sg(min(r, 1 + epsilon_high)) A logp + beta KL   (the clipped ratio only weights the
                            gradient; no token is dropped from it)
    KL is the k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased).
    `clipped` marks tokens where the clip is active (their gradient is cut, or for cispo capped).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    if loss_type == "cispo":
        loss = -torch.clamp(ratio, max=1 + epsilon_high).detach() * adv * logps
        clipped = ratio > 1 + epsilon_high
    elif loss_type in LOSS_TYPES:
        loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    else:
        raise ValueError(f"unknown GRPO loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, kl, clipped


def reduce_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """The SUM over this batch's items that the loop divides by the step's item count (num_items):
      grpo     sum over sequences of each one's mean token loss         / sequences  (DeepSeekMath)
      dr_grpo  sum over all tokens / max_completion_length               / sequences  (Liu et al. 2025)
      dapo, cispo  sum over all tokens                                   / tokens     (Yu et al. 2025)
    so over a whole step (every micro-batch and rank) each is exactly the published normalisation."""
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / max_completion_length
    return (loss * mask).sum()


def has_spread(group_std: torch.Tensor) -> torch.Tensor:
    """Which groups' rewards differ (a NaN std, fewer than two scored completions, counts as none): only those
    carry a gradient."""
    return group_std >= 1e-6


# What a rollout's training needs, per row, and what padding each gets when groups of rollouts of other widths
# are put together (take_groups): pads are masked out (label -100). The log-probs training also needs are
# computed afterwards, of the rows kept (GRPOObjective.add_logps).
TRAINED = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "advantages": None}


def take_groups(rollouts: list[Batch], picks: list[tuple[int, int]], group_size: int) -> Batch:
    """One training batch of the groups `picks` ((rollout index, group index) pairs) of several rollouts, whose
    prompts and completions may differ in width: prompts are left-padded and completions right-padded to the
    widest, so every row keeps its tokens, positions and targets."""
    def prompt_width(r: Batch) -> int:
        return r["input_ids"].shape[1] - r["labels"].shape[1] + 1

    P = max(prompt_width(r) for r in rollouts)
    C = max(r["labels"].shape[1] for r in rollouts)  # completion width
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in TRAINED}
    for i, g in picks:
        r = rollouts[i]
        rows = slice(g * group_size, (g + 1) * group_size)
        left, right = P - prompt_width(r), C - r["labels"].shape[1]
        for k in parts:
            v = r[k][rows]
            if k in ("input_ids", "attention_mask"):
                v = torch.nn.functional.pad(v, (left, right), value=TRAINED[k])
            elif k != "advantages":
                v = torch.nn.functional.pad(v, (0, right), value=TRAINED[k])
            parts[k].append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


class GRPOObjective(Objective):
    """Group relative policy optimisation on batches of prompts (data.prompt_collate)."""

    def __init__(self, tokenizer: Any, reward_funcs: list[tuple[str, RewardFunc]], reward_weights: list[float],
                 ref_model: torch.nn.Module | None, *, stop_ids: list[int], num_generations: int,
                 max_completion_length: int,
                 temperature: float, beta: float, epsilon: float, epsilon_high: float, num_iterations: int,
                 loss_type: str, scale_rewards: bool, dynamic_sampling_draws: int = 0,
                 log_completions_interval: int = 0, log_dir: Path | None = None) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        self.tokenizer, self.reward_funcs, self.ref_model = tokenizer, reward_funcs, ref_model
        self.reward_weights = torch.tensor(reward_weights, dtype=torch.float32)
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.temperature, self.beta, self.epsilon, self.epsilon_high = temperature, beta, epsilon, epsilon_high
        self.num_iterations, self.loss_type, self.scale_rewards = num_iterations, loss_type, scale_rewards
        self.dynamic_sampling_draws = dynamic_sampling_draws
        self.log_completions_interval, self.log_dir = log_completions_interval, log_dir
        self.stop_ids = stop_ids
        self.eval_metrics = ("reward", *(f"rewards/{name}" for name, _ in reward_funcs), "completion_length")

    # ------------------------------------------------------------------------- rewards
    def score(self, batch: Batch, completions: list[str], completion_ids: list[list[int]],
              repeat: int) -> torch.Tensor:
        """[N, functions] rewards of the completions (row i answers prompt i // repeat); NaN = not applicable."""
        def rep(values: list) -> list:
            return [v for v in values for _ in range(repeat)]

        kwargs = {**{k: rep(v) for k, v in batch["columns"].items()}, "prompt_messages": rep(batch["prompt_messages"]),
                  "max_completion_length": self.max_completion_length}
        out = []
        for name, func in self.reward_funcs:
            values = func(prompts=rep(batch["prompts"]), completions=completions, completion_ids=completion_ids,
                          **kwargs)
            if not isinstance(values, (list, tuple)) or len(values) != len(completions) or not all(
                    v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in values):
                raise UsageError(f"reward function {name!r} must return a list of {len(completions)} floats (or None "
                                 f"where it does not apply), one per completion; got {str(values)[:200]}")
            out.append([float("nan") if v is None else float(v) for v in values])
        return torch.tensor(out, dtype=torch.float32).T

    def total_reward(self, rewards: torch.Tensor) -> torch.Tensor:
        """The weighted sum over functions; a function that does not apply (NaN) adds nothing, so a completion no
        function applies to totals 0 (what is logged; its advantage is 0, see rollout)."""
        return (rewards * self.reward_weights).nansum(dim=1)

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[list[str], list[list[int]]]:
        """(completion texts without the stop token, ids with it) of each row."""
        ids = [row[:n] for row, n in zip(tokens.tolist(), mask.sum(dim=1).tolist())]
        texts = [self.tokenizer.decode(r[:-1] if r and r[-1] in self.stop_ids else r, skip_special_tokens=False)
                 for r in ids]
        return texts, ids

    def reward_metrics(self, rewards: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
        metrics = {"reward": total.mean().item()}
        for j, (name, _) in enumerate(self.reward_funcs):
            metrics[f"rewards/{name}"] = rewards[:, j].nanmean().item()
        return metrics

    # ------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def prepare(self, model: torch.nn.Module, micro_batches: list[Batch], step: int,
                draw: Callable[[], Batch] | None = None) -> list[Batch]:
        """Prompt batches -> training batches: sample G completions per prompt with the current weights (eval mode,
        KV cache), score them, group advantages, old/reference log-probs. `step` is the optimizer step about to
        run (for logging completions); `draw` fetches one more prompt batch (dynamic sampling). Metrics of all the
        rollouts sampled travel with each batch."""
        model.eval()
        try:
            rollouts = [self.rollout(model, batch) for batch in micro_batches]
            self.log_completions(step, micro_batches[0], rollouts[0])
            sampled = rollouts
            if self.dynamic_sampling_draws:
                rollouts, sampled = self.keep_informative(model, rollouts, draw)
            stats = {k: torch.cat([r[k] for r in sampled]) for k in ("rewards", "group_std", "lengths", "truncated")}
            rollouts = [self.add_logps(model, {k: r[k] for k in TRAINED}) for r in rollouts]
        finally:
            model.train()
        total = self.total_reward(stats["rewards"])
        metrics = {**self.reward_metrics(stats["rewards"], total), "reward_std": stats["group_std"].nanmean().item(),
                   "frac_reward_zero_std": (~has_spread(stats["group_std"])).float().mean().item(),
                   "completion_length": stats["lengths"].float().mean().item(),
                   "completion_truncated": stats["truncated"].float().mean().item()}
        if self.dynamic_sampling_draws:
            trained = torch.cat([r["advantages"] for r in rollouts]).view(-1, self.num_generations)
            metrics["prompts_sampled"] = float(len(stats["group_std"]))
            metrics["frac_trained_zero_std"] = (trained == 0).all(dim=1).float().mean().item()
        for r in rollouts:
            r["rollout_metrics"] = metrics
        return rollouts

    def keep_informative(self, model: torch.nn.Module, rollouts: list[Batch], draw: Callable[[], Batch] | None
                         ) -> tuple[list[Batch], list[Batch]]:
        """DAPO's dynamic sampling: a group whose completions all score the same has advantage 0 and teaches
        nothing, so such groups are dropped and fresh prompt batches rolled out until every micro-batch is full of
        groups with a spread, or --dynamic_sampling_draws batches per micro-batch have been sampled; then the
        dropped groups fill what is left (logged as frac_trained_zero_std). Under DDP every rank draws as long as
        any rank still lacks groups, so that the ranks' data positions stay in step (a checkpoint keeps rank 0's
        for all). Returns (the micro-batches to train, every rollout sampled)."""
        sizes = [len(r["group_std"]) for r in rollouts]
        sampled = list(rollouts)
        spread = [has_spread(r["group_std"]).tolist() for r in sampled]

        def more() -> bool:
            short = sum(map(sum, spread)) < sum(sizes) and len(sampled) < self.dynamic_sampling_draws * len(rollouts)
            return bool(all_reduce_max(torch.tensor([int(short)], device=rollouts[0]["input_ids"].device)).item())

        while draw is not None and more():
            sampled.append(self.rollout(model, draw()))
            spread.append(has_spread(sampled[-1]["group_std"]).tolist())
        groups = [(i, g) for i, row in enumerate(spread) for g in range(len(row))]
        picks = [p for p in groups if spread[p[0]][p[1]]] + [p for p in groups if not spread[p[0]][p[1]]]
        out, start = [], 0
        for n in sizes:
            out.append(take_groups(sampled, picks[start:start + n], self.num_generations))
            start += n
        return out, sampled

    def rollout(self, model: torch.nn.Module, batch: Batch) -> Batch:
        G = self.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(G, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(G, dim=0)
        tokens, mask = self.sample(model, prompt_ids, prompt_mask)
        texts, ids = self.decode(tokens, mask)
        rewards = self.score(batch, texts, ids, repeat=G)
        unscorable = rewards.isnan().all(dim=1)  # every reward function returned None: no advantage either way
        advantages, group_std = group_advantages(self.total_reward(rewards).masked_fill(unscorable, torch.nan), G,
                                                 self.scale_rewards)
        seq, seq_mask = torch.cat([prompt_ids, tokens], dim=1), torch.cat([prompt_mask, mask], dim=1)
        # Pre-shifted like every LM batch: labels are the completion tokens, predicted by the last C positions.
        out = {"input_ids": seq[:, :-1], "attention_mask": seq_mask[:, :-1],
               "labels": tokens.masked_fill(mask == 0, IGNORE_INDEX),
               "advantages": advantages.to(tokens.device), "rewards": rewards, "group_std": group_std,
               "lengths": mask.sum(dim=1).cpu(),
               "truncated": ~(torch.isin(tokens, torch.tensor(self.stop_ids, device=tokens.device))
                              & mask.bool()).any(dim=1).cpu(),
               "texts": texts}
        return out

    def add_logps(self, model: torch.nn.Module, batch: Batch) -> Batch:
        """The log-probs a training batch needs besides its tokens: the sampling policy's, for the ratio of later
        iterations (--num_iterations > 1), and the reference model's, for the KL term. Only of the rows that are
        trained: dynamic sampling drops groups first, so the groups it discards cost no forward passes."""
        if self.num_iterations > 1:
            batch["old_logps"] = token_logps(model, batch, temperature=self.temperature)[0]
        if self.ref_model is not None:
            batch["ref_logps"] = token_logps(self.ref_model, batch, temperature=self.temperature)[0]
        return batch

    def sample(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion tokens [N, C], their mask [N, C]) for left-padded prompts, one row per completion: sampled at
        --temperature, each stopped at a stop token (bench/peers.py replaces this with fixed completions)."""
        return generate_answers(model, prompt_ids, prompt_mask, self.max_completion_length, self.stop_ids,
                                temperature=self.temperature)

    def log_completions(self, step: int, batch: Batch, rollout: Batch) -> None:
        """Every --log_completions_interval steps (and at the first): the first prompt's group to
        out_dir/completions.jsonl, and one of its completions to the console."""
        every = self.log_completions_interval
        span = range(step, step + self.num_iterations)  # the steps these rollouts train
        if self.log_dir is None or not every or not (step == 1 or any(s % every == 0 for s in span)):
            return
        G, texts, total = self.num_generations, rollout["texts"], self.total_reward(rollout["rewards"])
        with open(self.log_dir / "completions.jsonl", "a") as f:
            for i in range(G):
                f.write(json.dumps({"step": step, "prompt": batch["prompts"][0], "completion": texts[i],
                                    "reward": total[i].item(),
                                    "rewards": dict(zip((n for n, _ in self.reward_funcs), rollout["rewards"][i].tolist())),
                                    "advantage": rollout["advantages"][i].item()}) + "\n")
        question = batch["prompt_messages"][0][-1]["content"]
        tqdm.write(f"step {step}: {question!r} -> {texts[0]!r} (reward {total[0].item():.3g})")

    # ------------------------------------------------------------------------- the loss
    def num_items(self, batch: Batch) -> int:
        """What the loss is averaged over (see reduce_loss): sequences, or completion tokens for dapo/cispo.
        A batch of prompts (validation) counts its prompts."""
        if "advantages" not in batch:
            return batch["input_ids"].shape[0]
        if self.loss_type in ("dapo", "cispo"):
            return int((batch["labels"] != IGNORE_INDEX).sum())
        return batch["labels"].shape[0]

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logps, out = token_logps(model, batch, temperature=self.temperature)
        mask = batch["labels"] != IGNORE_INDEX
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        loss, kl, clipped = per_token_loss(logps, old, batch.get("ref_logps"), batch["advantages"], self.loss_type,
                                           self.epsilon, self.epsilon_high, self.beta)
        loss_sum = reduce_loss(loss, mask, self.loss_type, self.max_completion_length)
        tokens = mask.sum().clamp(min=1)
        metrics = {**batch["rollout_metrics"], "clip_ratio": (clipped & mask).sum() / tokens}
        if self.ref_model is not None or "ref_logps" in batch:
            metrics["kl"] = (kl.detach() * mask).sum() / tokens
        return loss_sum + out.aux_loss * self.num_items(batch), metrics

    # ------------------------------------------------------------------------- validation
    @torch.no_grad()
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Greedy answers to a batch of held-out prompts: (minus the sum of their rewards, mean rewards).
        The loop's val_loss is therefore the negative mean reward (lower is better, as for every mode)."""
        tokens, mask = generate_answers(model, batch["input_ids"], batch["attention_mask"],
                                        self.max_completion_length, self.stop_ids, temperature=0.0)
        texts, ids = self.decode(tokens, mask)
        rewards = self.score(batch, texts, ids, repeat=1)
        total = self.total_reward(rewards)
        metrics = {**self.reward_metrics(rewards, total), "completion_length": mask.sum(dim=1).float().mean().item()}
        return -total.sum().to(tokens.device), metrics
