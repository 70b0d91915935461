"""The one training loop, shared by every mode.

It owns what is the same for all modes: devices and parallelism (DDP or FSDP, trainer/parallel.py),
AMP, gradient accumulation, the LR schedule, clipping, logging, validation, checkpoints and resume.
What differs between modes is the objective (trainer/objectives.py): how a batch becomes a loss.

One optimizer step reads like a recipe:
    fetch accumulation_steps micro-batches (an objective may `prepare` them: GRPO samples its rollouts)
    ->  count the step's items on all ranks
    forward + backward each (DDP/FSDP reduce only on the last)  ->  unscale, clip, step, schedule
    log  ->  checkpoint  ->  evaluate (checkpoint first: a crash in eval must not lose it)
and however a run ends, out_dir/curves.png is drawn from its metrics.jsonl (trainer/plots.py).

What the loop asks of an objective is trainer/objectives.py's Objective: the loss sum and metrics of a batch,
its item count, and hooks with defaults (prepare, num_iterations, eval_step, eval_metrics, loss_is_nll).
"""
from __future__ import annotations

import contextlib
import gc
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from trainer import checkpoint as ckpt
from trainer import parallel
from trainer.config import TrainConfig, UsageError
from trainer.distributed import all_reduce_sum, barrier
from trainer.flops import peak_flops
from trainer.interrupt import StopOnSignal
from trainer.logger import MetricsLogger
from trainer.modes import Components, Run
from trainer.objectives import Batch
from trainer.sampler import ResumableBatchSampler
from trainer.schedule import build_scheduler

_MEMORY_FLAGS = ("--batch_size (with more --accumulation_steps to keep the global batch), --max_seq_len, "
                 "--dtype bfloat16, or a smaller --preset")


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, out of memory); the message says what was saved and what to do."""


@dataclass
class TrainState:
    """Everything besides tensors that resume needs; saved as trainer_state.json."""
    step: int = 0                # optimizer steps completed
    epoch: int = 0
    epoch_offset: int = 0        # rows of `epoch` consumed by all ranks together
    tokens_seen: int = 0         # real (non-padding) input tokens, all ranks
    best_val_loss: float = math.inf
    skipped_steps: int = 0       # steps skipped for a non-finite gradient


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains and biases just hurts.

    fused=True on CUDA and CPU: one kernel reads and writes each parameter, gradient and moment once per
    step instead of one pass per elementwise op (bench/RESULTS.md has the difference on CPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))


def real_tokens(batch: Batch) -> int:
    """Input tokens that are not padding: attention_mask's ones when the batch is padded, else every one."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class Trainer:
    def __init__(self, run: Run, parts: Components) -> None:
        """`parts.export(model, folder, info)` writes best/ and final/; it is the mode's, so that each mode writes
        what it needs (a full Hugging Face folder, or a LoRA adapter)."""
        cfg, env, model = run.cfg, run.env, parts.model
        self.cfg, self.env, self.objective = cfg, env, parts.objective
        self.train_data, self.val_data, self.collate_fn = parts.train_data, parts.val_data, parts.collate_fn
        self.export = parts.export
        train_data = parts.train_data
        self.out_dir = Path(cfg.out_dir)
        self.dtype = run.dtype
        # FSDP: rank 0 keeps the model's shape (no storage) to gather the full model into for best/ and final/.
        self.template = parallel.meta_copy(model) if cfg.fsdp and env.is_main else None
        self.raw_model = model  # the module itself (sharded in place by FSDP); self.model is what runs the step
        self.model = parallel.parallelize(model, env, fsdp=cfg.fsdp, dtype=self.dtype,
                                          grad_checkpointing=cfg.grad_checkpointing, compile=cfg.compile)
        # Under FSDP its MixedPrecisionPolicy casts the parameters to self.dtype instead of autocast.
        self.autocast = torch.autocast(env.device.type, dtype=self.dtype,
                                       enabled=self.dtype != torch.float32 and not cfg.fsdp)
        # Loss scaling is only needed for fp16's narrow exponent range; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype == torch.float16)
        self.optimizer = build_optimizer(self.raw_model, cfg, env.device)
        # MFU = model FLOPs per second / peak (trainer/flops.py).
        self.flops_per_token = self.raw_model.estimate_flops_per_token
        self.peak_flops = peak_flops(env.device, self.dtype, cfg.peak_tflops)
        self.step_flops = 0.0  # model FLOPs since the last log, this rank

        rows_per_step = cfg.batch_size * env.world_size
        if len(train_data) < rows_per_step:
            raise UsageError(f"--batch_size {cfg.batch_size} x {env.world_size} process(es) needs at least "
                             f"{rows_per_step} training rows, but {cfg.data_path} has {len(train_data)}. "
                             f"Lower --batch_size or --max_seq_len, or add data.")
        self.micro_per_epoch = len(train_data) // rows_per_step
        # Each fetched step is trained num_iterations times (GRPO's policy updates per batch of rollouts).
        self.num_iterations = self.objective.num_iterations
        self.steps_per_epoch = max(1, self.micro_per_epoch // cfg.accumulation_steps) * self.num_iterations
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters > 0 else self.total_steps
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_iters, decay_iters, cfg.min_lr_ratio)
        self.state = TrainState()
        self.bad_streak = 0  # consecutive steps skipped for a non-finite gradient
        self.prepared: list[Batch] = []  # the current step's micro-batches, reused for num_iterations steps

    # ----------------------------------------------------------------------------- data
    def _loader(self, sampler: ResumableBatchSampler, data: Dataset) -> DataLoader:
        # A private generator: DataLoader otherwise draws its worker seed from the global RNG,
        # which would shift every later dropout mask after a resume.
        return DataLoader(data, batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=self.cfg.num_workers, pin_memory=self.env.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _train_batches(self) -> Iterator[Batch]:
        """An endless stream of this rank's micro-batches; advances the resumable data position."""
        s, env = self.state, self.env
        while True:
            sampler = ResumableBatchSampler(len(self.train_data), self.cfg.batch_size, env.rank, env.world_size,
                                            seed=self.cfg.seed, epoch=s.epoch, start=s.epoch_offset,
                                            # SFT rows vary in length: batch similar lengths per optimizer step
                                            lengths=self.train_data.lengths,
                                            group_rows=env.world_size * self.cfg.batch_size
                                            * self.cfg.accumulation_steps)
            for batch in self._loader(sampler, self.train_data):
                s.epoch_offset += sampler.rows_per_step
                yield batch
            s.epoch, s.epoch_offset = s.epoch + 1, 0

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _step_batches(self, stream: Iterator[Batch]) -> list[Batch]:
        """The micro-batches of the next optimizer step, on the device: fetched (and prepared, if the objective
        prepares) at the first of every num_iterations steps, the same ones in between."""
        if self.state.step % self.num_iterations == 0:
            batches = [self._to_device(next(stream)) for _ in range(self.cfg.accumulation_steps)]
            with torch.no_grad(), self.autocast:
                self.prepared = self.objective.prepare(self.raw_model, batches, self.state.step + 1)
        return self.prepared

    # ----------------------------------------------------------------------------- steps
    def _train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        env = self.env
        # One collective for the step's item count (the loss normaliser) and its real tokens (for tokens/s):
        # padding of SFT/DPO batches is not counted as work done.
        tokens = [real_tokens(b) for b in micro_batches]
        counts = torch.tensor([float(sum(self.objective.num_items(b) for b in micro_batches)), float(sum(tokens))],
                              device=env.device)
        all_reduce_sum(counts)
        n_items = counts[0]
        self.state.tokens_seen += int(counts[1])
        self.step_flops += sum(n * self.flops_per_token(b["input_ids"].shape[1]) for n, b in zip(tokens, micro_batches))
        # DDP averages gradients over ranks, so multiplying by world_size turns that average into
        # the sum; dividing by the step's total items makes it the mean over every item of the step.
        scale = env.world_size / n_items.clamp(min=1)
        loss_sum = torch.zeros((), device=env.device)
        extra: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Skip the gradient reduction across ranks on all but the last micro-batch of the step.
            sync = contextlib.nullcontext() if last else parallel.no_grad_sync(self.model)
            with sync:
                with self.autocast:
                    loss, metrics = self.objective(self.model, batch)
                self.scaler.scale(loss * scale).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():  # objective metrics, averaged over micro-batches below
                extra[k] = extra.get(k, 0.0) + float(v)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = parallel.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        lr = self.scheduler.get_last_lr()[0]
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
        else:  # every rank sees the same all-reduced norm, so every rank skips together
            self.state.skipped_steps += 1
            self.bad_streak += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        all_reduce_sum(loss_sum)
        if finite:
            self.bad_streak = 0
        return {"loss": (loss_sum / n_items).item(), "grad_norm": grad_norm.item(), "lr": lr,
                **{k: v / len(micro_batches) for k, v in extra.items()}}

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, float]]:
        """(mean validation loss per item, mean of the objective's eval_metrics) over this run's
        validation rows, all ranks together.

        `eval_metrics` names the metrics an objective returns as batch means (e.g. DPO's reward accuracy);
        they are weighted by each batch's items, and a batch where a metric is NaN (nothing to measure, e.g. a
        GRPO reward that applies to none of its prompts) leaves that metric out. The names come from the
        objective, not from the batches seen, so every rank all-reduces the same tensor even when one rank has
        no validation batch. An objective's eval_step, if it has one, replaces objective(model, batch) here."""
        if self.val_data is None:
            return math.nan, {}
        model, env = self.raw_model, self.env
        names = self.objective.eval_metrics
        model.eval()
        sampler = ResumableBatchSampler(len(self.val_data), self.cfg.batch_size, env.rank, env.world_size,
                                        shuffle=False, drop_last=False)
        # [loss sum, items, metric_1 * items, ..., items where metric_1 is finite, ...]
        totals = torch.zeros(2 + 2 * len(names), device=env.device, dtype=torch.float64)
        batches = iter(self._loader(sampler, self.val_data))
        n_steps = min(len(sampler), self.cfg.eval_iters or len(sampler))
        for _ in range(n_steps):
            batch = next(batches, None)
            counted = batch is not None
            if not counted:  # this rank's share of the ragged last step is empty
                if not parallel.is_sharded(model):
                    break
                # FSDP's forward gathers the parameters with every rank: run one on a row, counted as nothing.
                batch = self.collate_fn([self.val_data[0]])
            batch = self._to_device(batch)
            with self.autocast:
                loss, metrics = self.objective.eval_step(model, batch)
            if counted:
                n = torch.tensor(self.objective.num_items(batch), device=env.device, dtype=torch.float64)
                values = torch.stack([torch.as_tensor(metrics[k], device=env.device).double() for k in names]) \
                    if names else torch.zeros(0, device=env.device, dtype=torch.float64)
                weights = torch.isfinite(values) * n
                totals += torch.cat([loss.double().reshape(1), n.reshape(1), values.nan_to_num() * weights, weights])
        all_reduce_sum(totals)
        model.train()
        items, k = totals[1].clamp(min=1), len(names)
        return (totals[0] / items).item(), {name: (totals[2 + j] / totals[2 + k + j]).item()
                                            for j, name in enumerate(names)}

    # ----------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict[str, Any]:
        return {**asdict(self.state), "world_size": self.env.world_size, "config": asdict(self.cfg)}

    def _mid_group(self) -> bool:
        """Whether the next step reuses prepared micro-batches (num_iterations > 1): resume needs them."""
        return self.state.step % self.num_iterations != 0

    def save_checkpoint(self) -> None:
        ckpt.save_checkpoint(self.out_dir, self.state.step, self.env, model=self.raw_model,
                             optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                             trainer_state=self._trainer_state(),
                             rank_files={"rollouts": self.prepared} if self._mid_group() else None)
        if self.env.is_main:
            ckpt.rotate_checkpoints(self.out_dir, self.cfg.keep_checkpoint_max)

    def resume(self, path: Path) -> None:
        saved = ckpt.load_checkpoint(path, self.env, model=self.raw_model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, scaler=self.scaler)
        missing = [k for k in asdict(TrainState()) if k not in saved]
        if missing:
            raise ckpt.CheckpointError(f"{path / ckpt.STATE_FILE}: lacks {', '.join(missing)}; not a checkpoint this "
                                       f"train.py wrote. Resume from another checkpoint, or use a new --out_dir.")
        self.state = TrainState(**{k: saved[k] for k in asdict(TrainState())})
        if self._mid_group():
            self.prepared = [self._to_device(b) for b in ckpt.load_rank_file(path, "rollouts", self.env)]

    def _export(self, name: str, val_loss: float) -> None:
        """best/ and final/ as Hugging Face folders, written atomically like checkpoints."""
        model = parallel.consolidated_model(self.raw_model, self.template)  # every rank: FSDP gathers
        if self.env.is_main:
            folder = self.out_dir / name
            tmp = self.out_dir / f"{name}.tmp"
            info = {"mode": self.cfg.mode, "step": self.state.step, "val_loss": val_loss,
                    "tokens_seen": self.state.tokens_seen}
            self.export(model, tmp, info)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        barrier()

    # ----------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        cfg, env, s = self.cfg, self.env, self.state
        path = ckpt.resume_path(cfg.resume, self.out_dir)
        if path is not None:
            self.resume(path)
            s = self.state
        log = MetricsLogger(self.out_dir, asdict(cfg), enabled=env.is_main, total_steps=self.total_steps,
                            initial_step=s.step, use_wandb=cfg.use_wandb, project=cfg.wandb_project,
                            run_name=cfg.wandb_run_name)
        if cfg.resume:
            log.message(f"resumed from step {s.step} (epoch {s.epoch}, row {s.epoch_offset})")
        self.raw_model.train()
        try:
            with StopOnSignal() as stop:
                val_loss, signum = self._run(log, stop)
            if signum:
                log.message(f"stopped by signal {signum} after step {s.step}; checkpoint written to "
                            f"{ckpt.latest_checkpoint(self.out_dir)}. Continue with the same command plus --resume.")
            elif cfg.save_last:
                self._export("final", val_loss)
                log.message(f"final model written to {self.out_dir / 'final'}")
        finally:
            if env.is_main:
                self._plot_curves(log)
            log.close()
            # Free DDP's wrapper now, while torch.distributed still holds the process group: were its gradient
            # reducer the group's last owner at exit, the group's gloo threads would be joined with the GIL held,
            # and a thread still releasing a tensor deadlocks there (pytorch/pytorch#56297).
            self.model = self.raw_model
            gc.collect()
        return {"step": s.step, "val_loss": val_loss, "best_val_loss": s.best_val_loss,
                "tokens_seen": s.tokens_seen, "skipped_steps": s.skipped_steps, "signal": signum}

    def _plot_curves(self, log: MetricsLogger) -> None:
        """out_dir/curves.png from metrics.jsonl, however the run ended. A picture is not worth a run: if
        plotting fails (matplotlib broken, nothing logged yet), that is said in one line and the run goes on."""
        try:
            from trainer.plots import write_curves

            log.message(f"training curves written to {write_curves(self.out_dir)}")
        except Exception as e:
            log.message(f"training curves not written ({type(e).__name__}: {e})")

    def _run(self, log: MetricsLogger, stop: StopOnSignal) -> tuple[float, int]:
        """Steps until the end, a signal (-> its number) or divergence; returns (last val loss, signal)."""
        cfg, s = self.cfg, self.state
        stream = self._train_batches()
        val_loss = math.nan
        t_last, tokens_last = time.perf_counter(), s.tokens_seen
        self.step_flops = 0.0
        while s.step < self.total_steps:
            try:
                metrics = self._train_step(self._step_batches(stream))
            except torch.OutOfMemoryError:
                raise TrainingError(f"out of memory at step {s.step + 1}. Reduce memory with {_MEMORY_FLAGS}; "
                                    f"--resume continues from the last checkpoint.") from None
            s.step += 1
            done = s.step == self.total_steps
            if s.step % cfg.log_interval == 0 or done:
                dt = time.perf_counter() - t_last
                tok_s = (s.tokens_seen - tokens_last) / max(dt, 1e-9)
                # MFU: this rank's FLOPs over this rank's peak.
                speed = {"tokens_per_sec": tok_s, "mfu": self.step_flops / max(dt, 1e-9) / self.peak_flops}
                postfix = {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['lr']:.2e}", "tok/s": f"{tok_s:,.0f}",
                           "mfu": f"{speed['mfu']:.1%}"}
                log.log(s.step, {**metrics, **speed, "tokens_seen": s.tokens_seen,
                                 "epoch": s.epoch, "skipped_steps": s.skipped_steps})
                log.postfix(postfix)
                t_last, tokens_last, self.step_flops = time.perf_counter(), s.tokens_seen, 0.0
            log.progress(1)
            if cfg.max_bad_steps and self.bad_streak >= cfg.max_bad_steps:
                # Skipped steps changed neither weights nor optimizer: this checkpoint predates the divergence.
                self.save_checkpoint()
                raise TrainingError(
                    f"loss or gradient was NaN/inf for {self.bad_streak} consecutive steps (up to step {s.step}); "
                    f"the weights from before were saved to {ckpt.latest_checkpoint(self.out_dir)}. Lower "
                    f"--learning_rate, keep --grad_clip on, or use --dtype bfloat16 instead of float16, then --resume.")
            signum = stop.poll(self.env.device)
            if signum:
                self.save_checkpoint()
                return val_loss, signum
            paused_training = False  # saving or evaluating: their time is not training's, for tokens/s
            if not cfg.save_best_only and (done or (cfg.save_interval_steps and s.step % cfg.save_interval_steps == 0)):
                self.save_checkpoint()  # before evaluation: a crash there must not lose it
                paused_training = True
            if done or (cfg.eval_interval and s.step % cfg.eval_interval == 0):
                val_loss, val_metrics = self.evaluate()
                improved = val_loss < s.best_val_loss
                if improved:
                    s.best_val_loss = val_loss
                # Perplexity only where the loss is a per-token negative log-likelihood (not DPO's or GRPO's).
                ppl = {"ppl": math.exp(min(val_loss, 50))} if self.objective.loss_is_nll else {}
                val = {"val_loss": val_loss, **{f"val_{k}": v for k, v in {**ppl, **val_metrics}.items()}}
                log.log(s.step, val)
                log.message(f"step {s.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in val.items())
                            + ("  (best)" if improved else ""))
                if improved and self.val_data is not None:
                    if cfg.save_best_only:
                        self.save_checkpoint()
                    self._export("best", val_loss)
                paused_training = True
            if paused_training:  # restart the tokens/s clock: it measures training, not saving and evaluating
                t_last, tokens_last, self.step_flops = time.perf_counter(), s.tokens_seen, 0.0
        return val_loss, 0
