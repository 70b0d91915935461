"""The one training loop, shared by every mode.

It owns what is the same for all modes: devices and parallelism (DDP or FSDP, trainer/parallel.py),
AMP, gradient accumulation, the LR schedule, clipping, logging, validation, checkpoints and resume.
What differs between modes is the objective (trainer/objectives.py): how a batch becomes a loss.

One optimizer step reads like a recipe:
    fetch accumulation_steps micro-batches (an objective may `prepare` them: GRPO samples its rollouts)
    ->  count the step's items on all ranks (none: the step changes nothing)
    forward + backward each (DDP/FSDP reduce only on the last)  ->  unscale, clip, set the lr, step
    log  ->  checkpoint  ->  evaluate (checkpoint first, marked "evaluation pending": a crash during the
    evaluation loses neither, and resume runs the pending evaluation before the next step)
and however a run ends, out_dir/curves.png is drawn from its metrics.jsonl (trainer/plots.py).

What the loop asks of an objective is trainer/objectives.py's Objective: the loss sum and metrics of a batch,
its item count, and hooks with defaults (prepare, num_iterations, eval_step, eval_metrics, loss_is_nll).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from trainer import checkpoint as ckpt
from trainer import parallel
from trainer.errors import TrainingError, UsageError
from trainer.distributed import all_reduce_max, all_reduce_sum, barrier
from trainer.flops import peak_flops
from trainer.interrupt import StopOnSignal
from trainer.logger import MetricsLogger
from trainer.modes import Components, Run
from trainer.objectives import Batch
from trainer.optim import Optimizers
from trainer.sampler import ResumableBatchSampler
from trainer.resume import check_resume, run_record
from trainer.rundir import abandon_timeline, cut_metrics, replace_folder
from trainer.schedule import budget_plan, lr_multiplier, parse_duration, steps_in_budget

clock = time.monotonic  # the run's clock (tests drive a time budget with a fake one)


def process_age() -> float:
    """Seconds since the command started: a time budget counts the imports, tokenizing and compiling too. Under
    torchrun the command is the launcher, this process's parent, which started a few seconds before its workers."""
    process = psutil.Process()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its workers
        process = process.parent() or process
    return time.time() - process.create_time()


_MEMORY_FLAGS = ("--batch_size (with more --accumulation_steps to keep the global batch), --max_seq_len, "
                 "--dtype bfloat16, or a smaller --preset")


@dataclass
class TrainState:
    """Everything besides tensors that resume needs; saved as trainer_state.json."""
    step: int = 0                # optimizer steps completed
    epoch: int = 0
    epoch_offset: int = 0        # rows of `epoch` consumed by all ranks together
    tokens_seen: int = 0         # real (non-padding) input tokens, all ranks
    best_val_loss: float = math.inf
    val_loss: float | None = None  # the last evaluation's; None: none yet, or no validation data to score
    eval_pending: bool = False   # saved before this step's evaluation, which has not run yet
    skipped_steps: int = 0       # steps skipped for a non-finite gradient
    empty_steps: int = 0         # steps with no item to train on (e.g. every reply truncated away): no update
    elapsed: float = 0.0         # seconds this run has taken, earlier processes included (for --time_budget)
    planned_steps: int | None = None  # the run's length a --time_budget decided, once it did
    decay_start: int | None = None    # ... and the step its wsd decay started at
    planned_for: str = ""        # the --time_budget that decided them
    compiled: bool = False       # the blocks run compiled (--compile on, or auto decided): auto resumes compiled


# Fields every checkpoint this train.py wrote has; the others have defaults (added later, absent from older ones).
_CORE_STATE = ("step", "epoch", "epoch_offset", "tokens_seen")


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
        self.export, self.tokenizer = parts.export, run.tokenizer  # checkpoints carry the tokenizer too
        train_data = parts.train_data
        self.out_dir = Path(cfg.out_dir)
        self.dtype = run.dtype
        # FSDP: rank 0 keeps the model's shape (no storage) to gather the full model into for best/ and final/.
        self.template = parallel.meta_copy(model) if cfg.fsdp and env.is_main else None
        self.raw_model = model  # the module itself (sharded in place by FSDP); self.model is what runs the step
        # What its compiled blocks' kernels depend on (for --compile auto's guess at what compiling costs).
        self.signature = parallel.blocks_signature(model, env, self.dtype, cfg.batch_size, cfg.grad_checkpointing,
                                                   cfg.fsdp)
        self.model = parallel.parallelize(model, env, fsdp=cfg.fsdp, dtype=self.dtype,
                                          grad_checkpointing=cfg.grad_checkpointing, compile=cfg.compile == "on")
        # Under FSDP its MixedPrecisionPolicy casts the parameters to self.dtype instead of autocast.
        self.autocast = torch.autocast(env.device.type, dtype=self.dtype,
                                       enabled=self.dtype != torch.float32 and not cfg.fsdp)
        # Loss scaling is only needed for fp16's narrow exponent range; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype == torch.float16)
        self.optimizer = Optimizers(self.raw_model, cfg, env.device)
        # MFU = model FLOPs per second / peak (trainer/flops.py).
        self.flops_per_token = self.raw_model.estimate_flops_per_token
        self.peak_flops = peak_flops(env.device, self.dtype, cfg.peak_tflops)
        self.step_flops = 0.0  # model FLOPs since the last log, this rank

        rows_per_micro_batch = cfg.batch_size * env.world_size
        if len(train_data) < rows_per_micro_batch:
            raise UsageError(f"--batch_size {cfg.batch_size} x {env.world_size} process(es) needs at least "
                             f"{rows_per_micro_batch} training rows, but {cfg.data_path} has {len(train_data)}. "
                             f"Lower --batch_size or --max_seq_len, or add data.")
        self.micro_per_epoch = len(train_data) // rows_per_micro_batch
        # Each fetched step is trained num_iterations times (GRPO's policy updates per batch of rollouts).
        self.num_iterations = self.objective.num_iterations
        self.steps_per_epoch = max(1, self.micro_per_epoch // cfg.accumulation_steps) * self.num_iterations
        self.budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
        # The run's length: --max_steps, else --epochs; with a time budget and no --max_steps, decided on the way.
        self.max_steps: int | None = (cfg.max_steps if cfg.max_steps > 0 else
                                      None if self.budget else cfg.epochs * self.steps_per_epoch)
        self.schedule = cfg.lr_schedule if cfg.lr_schedule != "auto" else "wsd" if self.budget else "cosine"
        self.started = clock() - process_age()  # the budget counts from the process's start
        self.group_rows = env.world_size * cfg.batch_size * cfg.accumulation_steps  # rows per optimizer step
        self.record = run_record(cfg, run.tokenizer, run.seq_len, self.group_rows, train_data.lengths is not None)
        self.state = TrainState()
        self.bad_streak = 0  # consecutive steps skipped for a non-finite gradient
        self.said_no_validation = False
        self.elapsed_before = 0.0  # seconds of the processes before a resume
        self.step_seconds: float | None = None  # recent seconds per optimizer step
        self.eager_steps: list[float] | None = [] if cfg.compile == "auto" else None  # timed until auto decides
        self.compile_step = 0  # the step that compiled the blocks (its time is no measure of the rate)
        self.eval_seconds: float | None = None  # the last evaluation's, and the last checkpoint's, duration
        self.save_seconds = 0.0
        self.resumed_from: Path | None = None
        self.prepared: list[Batch] = []  # the current step's micro-batches, reused for num_iterations steps

    @property
    def total_steps(self) -> int | None:
        """The run's length: what a time budget decided, else --max_steps or --epochs' (None: not decided yet)."""
        return self.state.planned_steps if self.state.planned_steps is not None else self.max_steps

    def _ended(self) -> bool:
        return self.total_steps is not None and self.state.step >= self.total_steps

    def _elapsed(self) -> float:
        """Seconds this run has taken so far: this process since it started, and the processes before a resume."""
        return self.elapsed_before + clock() - self.started

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
                                            lengths=self.train_data.lengths, group_rows=self.group_rows)
            for batch in self._loader(sampler, self.train_data):
                s.epoch_offset += sampler.rows_per_micro_batch
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
                self.prepared = self.objective.prepare(self.raw_model, batches, self.state.step + 1,
                                                       draw=lambda: self._to_device(next(stream)))
        return self.prepared

    # ----------------------------------------------------------------------------- steps
    def _train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        env, cfg = self.env, self.cfg
        s = self.state
        multiplier = lr_multiplier(s.step, schedule=self.schedule, warmup_iters=cfg.warmup_iters,
                                   total_steps=self.total_steps, min_lr_ratio=cfg.min_lr_ratio,
                                   decay_iters=cfg.lr_decay_iters, decay_fraction=cfg.decay_fraction,
                                   decay_start=s.decay_start)
        lrs = {"lr": cfg.learning_rate * multiplier}  # AdamW's, and Muon's where it trains the hidden matrices
        if self.optimizer.muon is not None:
            lrs["lr_muon"] = cfg.muon_learning_rate * multiplier
        # One collective for the step's item count (the loss normaliser) and its real tokens (for tokens/s):
        # padding of SFT/DPO batches is not counted as work done.
        tokens = [real_tokens(b) for b in micro_batches]
        counts = torch.tensor([float(sum(self.objective.num_items(b) for b in micro_batches)), float(sum(tokens))],
                              device=env.device)
        all_reduce_sum(counts)
        n_items = counts[0]
        self.state.tokens_seen += int(counts[1])
        if n_items == 0:  # nothing to learn from: no loss to log, and no update (weight decay would still move weights)
            self.state.empty_steps += 1
            return lrs
        self.step_flops += sum(n * self.flops_per_token(b["input_ids"].shape[1]) for n, b in zip(tokens, micro_batches))
        # DDP averages gradients over ranks, so multiplying by world_size turns that average into
        # the sum; dividing by the step's total items makes it the mean over every item of the step.
        scale = env.world_size / n_items
        loss_sum = torch.zeros((), device=env.device)
        step_metrics: list[dict[str, torch.Tensor]] = []
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Skip the gradient reduction across ranks on all but the last micro-batch of the step.
            sync = contextlib.nullcontext() if last else parallel.no_grad_sync(self.model)
            with sync:
                with self.autocast:
                    loss, metrics = self.objective(self.model, batch)
                self.scaler.scale(loss * scale).backward()
            loss_sum += loss.detach()
            step_metrics.append(metrics)
        self.optimizer.unscale_(self.scaler)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = parallel.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.set_lr(multiplier)
            self.optimizer.step(self.scaler)
            self.bad_streak = 0
        else:  # every rank sees the same all-reduced norm, so every rank skips together
            self.state.skipped_steps += 1
            self.bad_streak += 1
        self.scaler.update()
        self.optimizer.zero_grad()
        all_reduce_sum(loss_sum)
        return {"loss": (loss_sum / n_items).item(), "grad_norm": grad_norm.item(), **lrs,
                **self._mean_over_ranks(step_metrics)}

    def _mean_over_ranks(self, step_metrics: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The objective's metrics (batch means), averaged over this step's micro-batches and every rank. A NaN
        (nothing to measure, e.g. a reward that applies to none of a batch's prompts) is left out of its mean."""
        names = sorted(step_metrics[0])
        if not names:
            return {}
        values = torch.tensor([[float(m[k]) for k in names] for m in step_metrics], dtype=torch.float64,
                              device=self.env.device)
        finite = torch.isfinite(values)
        totals = torch.cat([values.nan_to_num().mul(finite).sum(0), finite.sum(0).double()])
        all_reduce_sum(totals)
        k = len(names)
        return {name: (totals[j] / totals[k + j]).item() if totals[k + j] else math.nan
                for j, name in enumerate(names)}

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, dict[str, float]]:
        """(mean validation loss per item, mean of the objective's eval_metrics) over this run's
        validation rows, all ranks together; (None, {}) when there is nothing to score.

        `eval_metrics` names the metrics an objective returns as batch means (e.g. DPO's reward accuracy);
        they are weighted by each batch's items, and a batch where a metric is NaN (nothing to measure, e.g. a
        GRPO reward that applies to none of its prompts) leaves that metric out. The names come from the
        objective, not from the batches seen, so every rank all-reduces the same tensor even when one rank has
        no validation batch. An objective's eval_step, if it has one, replaces objective(model, batch) here."""
        if self.val_data is None:
            return None, {}
        model, env = self.raw_model, self.env
        names = self.objective.eval_metrics
        model.eval()
        # The first eval_iters global batches' rows: the same rows for every split of a global batch over
        # processes and accumulation steps, so such runs report the same validation loss.
        n_rows = len(self.val_data)
        if self.cfg.eval_iters:
            n_rows = min(n_rows, self.cfg.eval_iters * self.cfg.batch_size * self.cfg.accumulation_steps
                         * env.world_size)
        sampler = ResumableBatchSampler(n_rows, self.cfg.batch_size, env.rank, env.world_size, shuffle=False,
                                        drop_last=False)
        # [loss sum, items, metric_1 * items, ..., items where metric_1 is finite, ...]
        totals = torch.zeros(2 + 2 * len(names), device=env.device, dtype=torch.float64)
        batches = iter(self._loader(sampler, self.val_data))
        for _ in range(len(sampler)):
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
        if totals[1] == 0:  # no validation row, or none with an item to score: no metric, rather than a 0
            return None, {}
        k = len(names)
        return (totals[0] / totals[1]).item(), {name: (totals[2 + j] / totals[2 + k + j]).item()
                                                for j, name in enumerate(names)}

    # ----------------------------------------------------------------------------- state
    def _trainer_state(self, eval_pending: bool = False) -> dict[str, Any]:
        self.state.elapsed = self._elapsed()
        return {**asdict(self.state), "eval_pending": eval_pending, "world_size": self.env.world_size,
                "config": asdict(self.cfg), "run": self.record}

    def _is_own(self, checkpoint: Path) -> bool:
        """Whether `checkpoint` is one of this run's (not one of another out_dir's, resumed from there)."""
        return checkpoint.resolve().parent == ckpt.checkpoint_dir(self.out_dir).resolve()

    def _mid_group(self) -> bool:
        """Whether the next step reuses prepared micro-batches (num_iterations > 1): resume needs them."""
        return self.state.step % self.num_iterations != 0

    def save_checkpoint(self, eval_pending: bool = False) -> Path:
        """A checkpoint of this step; eval_pending: saved before the step's evaluation, which resume then runs."""
        path = ckpt.save_checkpoint(self.out_dir, self.state.step, self.env, model=self.raw_model,
                                    optimizer=self.optimizer, scaler=self.scaler,
                                    trainer_state=self._trainer_state(eval_pending),
                                    rank_files={"rollouts": self.prepared} if self._mid_group() else None,
                                    tokenizer=self.tokenizer)
        if self.env.is_main:
            ckpt.rotate_checkpoints(self.out_dir, self.cfg.keep_checkpoint_max)
        return path

    def resume(self, path: Path) -> list[str]:
        """Continue from checkpoint `path`, after the resume policy (trainer/resume.py) accepted it; returns the
        lines to say (what changed; a new timeline)."""
        notes = check_resume(ckpt.read_state(path), self.record, self.cfg, path)
        saved = ckpt.load_checkpoint(path, self.env, model=self.raw_model, optimizer=self.optimizer,
                                     scaler=self.scaler)
        missing = [k for k in _CORE_STATE if k not in saved]
        if missing:
            raise ckpt.CheckpointError(f"{path / ckpt.STATE_FILE}: lacks {', '.join(missing)}; not a checkpoint this "
                                       f"train.py wrote. Resume from another checkpoint, or use a new --out_dir.")
        self.state = TrainState(**{k: saved[k] for k in asdict(TrainState()) if k in saved})
        self.elapsed_before = self.state.elapsed
        if self.state.planned_for != self.cfg.time_budget and self.state.planned_steps is not None:
            notes.append(f"--time_budget {self.cfg.time_budget or '(none)'} replaces {self.state.planned_for}: the run's "
                         f"length (step {self.state.planned_steps}) is decided again")
            self.state.planned_steps = self.state.decay_start = None
        self.optimizer.apply_hyperparameters(self.cfg)
        if self._mid_group():
            self.prepared = [self._to_device(b) for b in ckpt.load_rank_file(path, "rollouts", self.env)]
        # Only a checkpoint that loaded moves anything: a refused resume leaves the run folder as it was.
        step = ckpt.step_of(path)
        newer = [c for c in ckpt.list_checkpoints(self.out_dir) if ckpt.step_of(c) > step]
        if self._is_own(path) and self.env.is_main:
            if newer:
                moved = abandon_timeline(self.out_dir, step, newer)
                notes.append(f"resuming from step {step}, before the newest checkpoint (step "
                             f"{ckpt.step_of(newer[-1])}): a new timeline starts there, and what the old one wrote "
                             f"after it (checkpoints, metrics, final/) was moved to {moved}")
            else:  # the steps an interrupted run logged after its last checkpoint are logged again from here
                cut_metrics(self.out_dir, step)
        barrier()
        return notes

    def _export(self, name: str) -> None:
        """best/ or final/, written into name.tmp and then put in place of the old one (rundir.replace_folder)."""
        model = parallel.consolidated_model(self.raw_model, self.template)  # every rank: FSDP gathers
        if self.env.is_main:
            folder, tmp = self.out_dir / name, self.out_dir / f"{name}.tmp"
            info = {"mode": self.cfg.mode, "step": self.state.step, "val_loss": self.state.val_loss,
                    "tokens_seen": self.state.tokens_seen}
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                self.export(model, tmp, info)
                replace_folder(tmp, folder)
            except (OSError, RuntimeError) as e:  # typically a full disk; safetensors and torch raise either
                shutil.rmtree(tmp, ignore_errors=True)
                reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
                kept = f"the previous {folder} is intact" if folder.exists() else f"there is no {folder} yet"
                raise TrainingError(f"could not write {folder}: {reason}; {kept}. Free disk space, then --resume "
                                    f"(the checkpoint of step {self.state.step} was written before it).") from None
        barrier()

    # ----------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        path = ckpt.resume_path(cfg.resume, self.out_dir)
        notes = self.resume(path) if path is not None else []
        self.resumed_from = path
        s = self.state
        finished = self._ended() and not s.eval_pending  # a resume of a run that already ended
        log = MetricsLogger(self.out_dir, {**asdict(cfg), "model": asdict(self.raw_model.config)},
                            enabled=env.is_main, total_steps=self.total_steps, initial_step=s.step,
                            use_wandb=cfg.use_wandb, project=cfg.wandb_project, run_name=cfg.wandb_run_name,
                            log_freq=cfg.wandb_log_freq, log_model=cfg.wandb_log_model, log_code=cfg.wandb_log_code)
        if cfg.wandb_watch_model:
            log.watch(self.raw_model, cfg.wandb_watch_log, cfg.wandb_watch_log_freq)
        if path is not None:
            log.message(f"resumed from step {s.step} (epoch {s.epoch}, row {s.epoch_offset})")
        for note in notes:
            log.message(note)
        if cfg.compile == "on":  # its first step compiles: no measure of the rate either
            s.compiled, self.compile_step = True, s.step + 1
        elif self.eager_steps is not None and s.compiled:  # resumed: the same numerics as the run before
            self._compile_blocks(log, "--compile auto: the run resumed had compiled its blocks; compiling them again")
        self.raw_model.train()
        try:
            with StopOnSignal() as stop:
                signum = self._run(log, stop)
            if signum:
                log.message(f"stopped by signal {signum} after step {s.step}; checkpoint written to "
                            f"{ckpt.latest_checkpoint(self.out_dir)}. Continue with the same command plus --resume.")
            elif finished and (not cfg.save_last or (self.out_dir / "final").is_dir()):
                log.message(f"the run already ended at step {s.step} (--max_steps or --epochs): nothing to do")
            elif cfg.save_last:
                self._export("final")
                log.exported(self.out_dir / "final", "final", s.step)
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
        return {"step": s.step, "val_loss": s.val_loss, "best_val_loss": s.best_val_loss,
                "tokens_seen": s.tokens_seen, "skipped_steps": s.skipped_steps, "signal": signum}

    def _plot_curves(self, log: MetricsLogger) -> None:
        """out_dir/curves.png from metrics.jsonl, however the run ended. A picture is not worth a run: if
        plotting fails (matplotlib broken, nothing logged yet), that is said in one line and the run goes on."""
        try:
            from trainer.plots import write_curves

            log.message(f"training curves written to {write_curves(self.out_dir)}")
        except Exception as e:
            log.message(f"training curves not written ({type(e).__name__}: {e})")

    def _run(self, log: MetricsLogger, stop: StopOnSignal) -> int:
        """Steps until the end, a signal (-> its number) or divergence."""
        cfg, s = self.cfg, self.state
        if s.eval_pending:  # the checkpoint resumed from was saved before its step's evaluation, which never ran
            log.message(f"step {s.step}: running the evaluation the interrupted run had not finished")
            s.eval_pending = False
            self._validate_step(log, self.resumed_from)
        stream = self._train_batches()
        self._restart_speed()
        while not self._ended():
            t_step = clock()
            try:
                metrics = self._train_step(self._step_batches(stream))
            except torch.OutOfMemoryError:
                raise TrainingError(f"out of memory at step {s.step + 1}. Reduce memory with {_MEMORY_FLAGS}; "
                                    f"--resume continues from the last checkpoint.") from None
            s.step += 1
            seconds = clock() - t_step
            if s.step != self.compile_step:  # the recent rate, for the time budget and --compile auto
                self.step_seconds = seconds if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * seconds
            elif parallel.can_compile(self.env.device):  # the step that compiled: Inductor's cache has the kernels
                parallel.remember_compiled(self.signature)
            if self.eager_steps is not None:
                self._auto_compile(log, seconds)
            if self.budget is not None and s.planned_steps is None and self.step_seconds is not None:
                self._plan_length(log)
            done = self._ended()
            if s.step % cfg.log_interval == 0 or done:
                since, tokens_since = self.speed_from
                dt = time.perf_counter() - since
                tok_s = (s.tokens_seen - tokens_since) / max(dt, 1e-9)
                # MFU: this rank's FLOPs over this rank's peak.
                speed = {"tokens_per_sec": tok_s, "mfu": self.step_flops / max(dt, 1e-9) / self.peak_flops}
                shown = {"loss": f"{metrics['loss']:.3f}"} if "loss" in metrics else {}
                log.log(s.step, {**metrics, **speed, "tokens_seen": s.tokens_seen, "epoch": s.epoch,
                                 "skipped_steps": s.skipped_steps, "empty_steps": s.empty_steps})
                log.postfix({**shown, "lr": f"{metrics['lr']:.2e}", "tok/s": f"{tok_s:,.0f}",
                             "mfu": f"{speed['mfu']:.1%}"})
                self._restart_speed()
            log.progress(1)
            if cfg.max_bad_steps and self.bad_streak >= cfg.max_bad_steps:
                self._stop_diverged()
            evaluates = done or bool(cfg.eval_interval and s.step % cfg.eval_interval == 0)
            signum = stop.poll(self.env.device)
            if signum:
                self.save_checkpoint(eval_pending=evaluates)
                return signum
            saved = None
            if not cfg.save_best_only and (done or (cfg.save_interval_steps and s.step % cfg.save_interval_steps == 0)):
                t_save = clock()
                saved = self.save_checkpoint(eval_pending=evaluates)  # before evaluation: a crash there loses neither
                self.save_seconds = clock() - t_save
            if evaluates:
                t_eval = clock()
                self._validate_step(log, saved)
                self.eval_seconds = clock() - t_eval
            if saved is not None or evaluates:  # tokens/s and MFU measure training, not the pauses
                self._restart_speed()
        return 0

    def _restart_speed(self) -> None:
        """Measure tokens/s and MFU from here (the next log's figures cover the steps since)."""
        self.speed_from = (time.perf_counter(), self.state.tokens_seen)
        self.step_flops = 0.0  # model FLOPs since then, this rank

    def _auto_compile(self, log: MetricsLogger, seconds: float) -> None:
        """--compile auto: once AUTO_COMPILE_AFTER steps are timed, compile the blocks if the steps still to come are
        long enough to repay it (trainer/parallel.py compile_pays). Decided once, from the ranks' mean step time, so
        that every rank decides alike."""
        self.eager_steps.append(seconds)
        if len(self.eager_steps) < parallel.AUTO_COMPILE_AFTER:
            return
        # Summed over the ranks: the step time, and how many of them have compiled such blocks before.
        seen = torch.tensor([statistics.median(self.eager_steps[1:]), parallel.compiled_before(self.signature)],
                            dtype=torch.float64, device=self.env.device)
        self.eager_steps = None
        all_reduce_sum(seen)
        step_seconds, cached = seen[0].item() / self.env.world_size, seen[1].item() == self.env.world_size
        ends = [self.budget - self._elapsed()] if self.budget is not None else []
        if self.total_steps is not None:
            ends.append((self.total_steps - self.state.step) * step_seconds)
        left = min(ends)  # seconds of steps to come: a time budget's rest, the planned steps', or the sooner
        if not parallel.compile_pays(left, cached):
            return
        said = f"--compile auto: about {left / 60:.0f} minutes of steps to come at {step_seconds:.2f} s a step"
        if not parallel.can_compile(self.env.device):
            log.message(f"{said}, but torch.compile needs a C++ compiler (g++ or clang++) on {self.env.device.type}: "
                        f"the run stays eager")
            return
        wait = ("a wait of seconds: an earlier run here compiled blocks like these, and Inductor's cache has them"
                if cached else "a one-off wait")
        self._compile_blocks(log, f"{said}: compiling each block during the next step ({wait}) repays itself "
                                  f"within the run. --compile off keeps a run eager")

    def _compile_blocks(self, log: MetricsLogger, message: str) -> None:
        parallel.compile_blocks(self.raw_model, self.env.device)
        self.state.compiled, self.compile_step, self.eager_steps = True, self.state.step + 1, None
        log.message(message)

    def _plan_length(self, log: MetricsLogger) -> None:
        """With --time_budget: once its stable part is spent, fix the run's length (and so wsd's decay) to what the
        remaining time holds, with the evaluations and checkpoints on the way, keeping back what the final
        evaluation, checkpoint and export will take."""
        cfg, s = self.cfg, self.state
        if self.eval_seconds is not None:
            eval_seconds = self.eval_seconds
        else:  # not timed yet: a validation micro-batch is a forward, a third of a training micro-batch's time
            micro = -(-len(self.val_data or ()) // (cfg.batch_size * self.env.world_size))
            if cfg.eval_iters:  # global batches, of accumulation_steps micro-batches each
                micro = min(micro, cfg.eval_iters * cfg.accumulation_steps)
            eval_seconds = micro * self.step_seconds / (3 * cfg.accumulation_steps)
        # The steps to come also pause for the evaluations and checkpoints on their way: a share of those per step.
        per_step = self.step_seconds
        if cfg.eval_interval:
            per_step += eval_seconds / cfg.eval_interval
        if cfg.save_interval_steps and not cfg.save_best_only:
            per_step += self.save_seconds / cfg.save_interval_steps
        # Every rank must plan the same length (one that stopped early would leave the others waiting in a
        # collective): the slowest rank's view of the time spent, the step rate and the reserve decides.
        timing = torch.tensor([self._elapsed(), per_step, eval_seconds + 2 * self.save_seconds],
                              dtype=torch.float64, device=self.env.device)
        elapsed, step_seconds, reserve = all_reduce_max(timing).tolist()
        in_time = steps_in_budget(s.step, elapsed, self.budget, cfg.decay_fraction, step_seconds, reserve)
        if in_time is None:
            return
        total, start = budget_plan(s.step, in_time, self.max_steps, cfg.warmup_iters, cfg.decay_fraction)
        s.planned_steps, s.decay_start, s.planned_for = total, start, cfg.time_budget
        log.set_total(total)
        spent = f"--time_budget {cfg.time_budget}: {elapsed:.0f}s spent by step {s.step}"
        if start is None:
            log.message(f"{spent}; --max_steps {total} ends the run first, on its own schedule")
        elif start < s.step:
            log.message(f"{spent}; the learning rate's decay, begun at step {start}, now ends at step {total}")
        else:
            log.message(f"{spent}; the learning rate decays from here to the run's end at step {total}")

    def _validate_step(self, log: MetricsLogger, checkpoint: Path | None) -> None:
        """This step's evaluation: log it, export best/ if it improved, and mark `checkpoint` (this step's, saved
        just before) as evaluated."""
        cfg, s = self.cfg, self.state
        val_loss, val_metrics = self.evaluate()
        s.val_loss = val_loss
        if val_loss is None:
            if not self.said_no_validation:
                log.message(f"step {s.step}: no validation data to score (no rows, or none with a target token): no "
                            f"val_loss is logged and best/ is not written; final/ is the model to use")
                self.said_no_validation = True
        else:
            improved = val_loss < s.best_val_loss
            if improved:
                s.best_val_loss = val_loss
            # Perplexity only where the loss is a per-token negative log-likelihood (not DPO's or GRPO's).
            ppl = {"ppl": math.exp(min(val_loss, 50))} if self.objective.loss_is_nll else {}
            val = {"val_loss": val_loss, **{f"val_{k}": v for k, v in {**ppl, **val_metrics}.items()}}
            log.log(s.step, val)
            log.message(f"step {s.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in val.items())
                        + ("  (best)" if improved else ""))
            if improved:
                if cfg.save_best_only:
                    checkpoint = self.save_checkpoint()
                self._export("best")
                log.exported(self.out_dir / "best", "best", s.step)
        if checkpoint is not None and self.env.is_main and self._is_own(checkpoint) and ckpt.step_of(checkpoint) == s.step:
            ckpt.update_state(checkpoint, self._trainer_state())
        barrier()

    def _stop_diverged(self) -> None:
        """--max_bad_steps non-finite steps in a row: save the weights from before (skipped steps changed neither
        weights nor optimizer) unless the weights themselves are already non-finite, then stop."""
        s = self.state
        finite = all(bool(torch.isfinite(p).all()) for p in self.raw_model.parameters())
        if finite:
            self.save_checkpoint()
            kept = f"the weights from before were saved to {ckpt.latest_checkpoint(self.out_dir)}"
        else:
            kept = (f"the weights are already NaN/inf, so no checkpoint was written; the last one is "
                    f"{ckpt.latest_checkpoint(self.out_dir)}")
        raise TrainingError(
            f"loss or gradient was NaN/inf for {self.bad_streak} consecutive steps (up to step {s.step}); {kept}. "
            f"Lower --learning_rate, keep --grad_clip on, or use --dtype bfloat16 instead of float16, then --resume.")
