"""THE training loop: every stage (pretrain, sft, and the post-training stages after it) runs on `train`.

A stage hands the loop a `Stage`: a model, a batch source with resumable state, the validation batches, and an
objective `(model, batch) -> (loss, metrics)` (lmforge.objectives). The loop owns everything else:

- the optimizer (AdamW, weight-decay groups) and the learning-rate schedule, by step or by the clock;
- gradient accumulation (no reduction on all micro-steps but the last), clipping, precision (bf16 autocast on CUDA);
- DDP or FSDP2 under torchrun (lmforge.train.distributed), every rank stopping on the same step;
- periodic validation, metrics.jsonl, the progress bar, loss.png, optional TensorBoard and Weights & Biases;
- atomic checkpoints, exact resume, a stop on SIGINT/SIGTERM that writes a checkpoint and says how to resume;
- the time budget, and the run dir: config.json, metrics.jsonl, checkpoints/step_N/, loss.png, summary.json, final/.

One optimizer step is grad_accum micro-steps of batch_size samples summed over processes; the step's loss is the
mean of the micro-steps' losses, each the objective's mean over its batch:

    loss_step = 1/A * sum_a objective(model, batch_a)

A run with max_steps = 0 and a time budget follows the clock: its learning rate is a function of the fraction of the
budget elapsed (lmforge.train.optim.lr_at_time), so the schedule ends at min_lr when the budget does however the
machine's speed changes, and it stops early enough to validate and save within the budget.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, Interrupted, LmforgeError
from lmforge.io import atomic_write_json, check_replaceable_dir
from lmforge.train.checkpoint import (gather_model, gather_optimizer_state, latest_checkpoint, list_checkpoints,
                                      load_optimizer_state, load_trainer_state, rng_state, save_checkpoint,
                                      save_model_dir, set_rng_state)
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import (DistContext, all_reduce, barrier, no_sync, shard_model, wrap_ddp)
from lmforge.train.loggers import ExternalLoggers
from lmforge.train.metrics import MetricsLog, plot_loss, progress_bar, update_progress
from lmforge.train.mfu import mfu, measure_peak, remember_peak, machine_key
from lmforge.train.optim import build_optimizer, check_schedule, lr_at, lr_at_time, schedule_warnings

Batch = dict[str, Tensor]
Objective = Callable[[nn.Module, Batch], tuple[Tensor, dict[str, Any]]]


class BatchSource(Protocol):
    """The training samples of a stage as an endless, seekable stream (e.g. lmforge.train.data.WindowSampler)."""

    def next_batch(self, global_batch: int, rank: int, world: int, device: torch.device) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Stage:
    """What a training stage hands to the loop.

    config: the stage's resolved dataclass config (written to run_dir/config.json); `train` is its loop section.
    objective: the training loss; eval_objective (default: objective) scores validation batches and must return
    metrics "loss" (mean over its "tokens"). val_figures turns a validation loss into extra figures (bits per
    byte). model_files are extra JSON files written into every model dir the run writes (checkpoints and final/).
    """

    name: str
    config: Any
    train: TrainConfig
    out_dir: Path
    resume: bool
    model: nn.Module
    objective: Objective
    batches: BatchSource
    val_batches: list[Batch]
    tokens_per_sample: int
    tokenizer_dir: Any  # the dir whose tokenizer files every model dir gets, or a Tokenizer to save there
    inputs: tuple[str, ...] = ()  # paths the run reads: never inside the run dir
    eval_objective: Optional[Objective] = None
    val_figures: Callable[[Optional[float]], dict[str, Any]] = lambda loss: {}
    model_files: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    count_terms: Optional[Callable[[Batch], int]] = None  # loss terms of a batch when they vary (see micro_scales)
    summary: dict[str, Any] = field(default_factory=dict)  # extra figures for summary.json


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    best_val_loss: Optional[float] = None
    elapsed_s: float = 0.0  # wall time of the run so far, across resumes


def autocast_dtype(device: torch.device, dtype: str) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32: 'auto' is bf16 on CUDA and fp32 on CPU."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def precision_context(device: torch.device, half: Optional[torch.dtype]) -> ContextManager:
    """Autocast to `half` on `device`, or nothing (plain fp32) when half is None."""
    return torch.autocast(device.type, dtype=half) if half else nullcontext()


def evaluate(model: nn.Module, batches: list[Batch], objective: Objective, precision: ContextManager,
             device: torch.device) -> tuple[Optional[float], dict[str, float]]:
    """Token-weighted means over all processes' batches of the objective's metrics: (loss, the others such as
    accuracy); (None, {}) if there are no batches.

    Every process calls the model equally often, since an FSDP forward is collective: one with fewer batches (its
    share of the last batch can be empty) runs it on a dummy token and discards the result.
    """
    sums: dict[str, float] = {}
    tokens = 0.0
    rounds = int(all_reduce([float(len(batches))], device, op="max")[0])
    was_training = model.training
    model.eval()
    with torch.no_grad(), precision:
        for batch in batches:
            _, metrics = objective(model, batch)
            weight = float(metrics["tokens"])
            for key, value in metrics.items():
                if key != "tokens":
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
            tokens += weight
        for _ in range(rounds - len(batches)):
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
    model.train(was_training)
    keys = sorted(sums) if sums else ["loss"]
    totals = all_reduce([sums.get(k, 0.0) for k in keys] + [tokens], device)
    if not totals[-1]:
        return None, {}
    means = {k: v / totals[-1] for k, v in zip(keys, totals[:-1])}
    return means.pop("loss"), means


def prepare_run_dir(stage: Stage, ctx: DistContext) -> Optional[Path]:
    """Check the run dir may be written (it is new, empty or a run dir, holding none of the inputs) and return the
    checkpoint to resume from (None for a fresh run). Rank 0 then writes config.json."""
    from lmforge.config import config_to_dict

    run_dir = stage.out_dir
    check_replaceable_dir(run_dir, "config.json", "run dir", inputs=stage.inputs)
    checkpoint = latest_checkpoint(run_dir)
    if stage.resume and checkpoint is None:
        raise LmforgeError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (leave out --resume to start fresh)")
    if not stage.resume and list_checkpoints(run_dir):
        raise LmforgeError(f"out_dir {run_dir} already holds checkpoints; add --resume to continue that run, or "
                           "choose another --out_dir")
    barrier()  # every rank has looked before rank 0 writes
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config_to_dict(stage.config))
        if checkpoint is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return checkpoint


class _StopSignals:
    """Turn the first SIGINT or SIGTERM into a flag the loop checks after each step (a second one acts as usual)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class Trainer:
    """One invocation of a stage's training: setup (fresh or from a checkpoint), the step loop, the final outputs."""

    def __init__(self, stage: Stage, ctx: DistContext) -> None:
        self.started = time.perf_counter()
        self.stage, self.ctx, self.tc = stage, ctx, stage.train
        self.main, self.device = ctx.rank == 0, ctx.device
        self.run_dir = stage.out_dir
        check_schedule(self.tc)
        checkpoint = prepare_run_dir(stage, ctx)
        self.warnings = list(stage.warnings) + schedule_warnings(self.tc)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast

        self.raw = stage.model
        self.raw.activation_checkpointing = self.tc.activation_checkpointing
        self.state = RunState()
        saved = self._load_checkpoint(checkpoint) if checkpoint else {}
        self.started -= self.state.elapsed_s  # the clock of the whole run, across resumes
        self.raw.to(self.device)
        shard_model(self.raw, ctx, self.tc.parallel)  # fsdp: in place, so the optimizer holds only this shard
        self.optimizer = build_optimizer(self.raw, self.tc, self.device.type)
        self.trainable = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        if saved:
            load_optimizer_state(self.raw, self.optimizer, saved["optimizer"])
        if ctx.rank == 0 and saved:
            set_rng_state(saved["rng"])
        elif ctx.rank > 0:  # other ranks only need distinct dropout streams; they are not restored bit for bit
            torch.manual_seed(self.tc.seed + 1_000_003 * ctx.rank + self.state.step)
        self.forward = torch.compile(self.raw) if self.tc.compile else self.raw  # outputs only: for validation
        self.model = wrap_ddp(self.forward, ctx, self.tc.parallel)  # what the training step calls
        self.model.train()
        self.half = autocast_dtype(self.device, self.tc.dtype)

        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if self.main and checkpoint:
            self.metrics.truncate_after(self.state.step)
        self.loggers = ExternalLoggers(self.run_dir, self.tc, stage.config, enabled=self.main)
        self.flops_per_token = self.raw.flops_per_token(stage.tokens_per_sample)
        self.peak, self.peak_source = measure_peak(self.device, self.half or torch.float32, self.tc.peak_flops) \
            if self.main else (0.0, "")
        self.tokens_per_step = self.tc.batch_size * self.tc.grad_accum * stage.tokens_per_sample
        self.by_clock = self.tc.max_steps == 0
        self.lr = 0.0
        self.reserve_s = {"val": None, "save": None}  # measured durations of the last validation and checkpoint
        self.val_others: dict[str, float] = {}  # the last validation's other figures (val_accuracy, ...)
        self.window_figures: dict[str, tuple[Any, int]] = {}  # the objective's other figures since the last train
        # record, as (sum, count) on rank 0
        has_val = all_reduce([float(len(stage.val_batches))], self.device)[0] > 0
        if not has_val and not any("validation" in w for w in self.warnings):  # unless the stage said why
            self.warnings.append("no validation batches: val_loss will be null (the held-out split is empty or "
                                 "shorter than one sample)")
        if self.main:
            for warning in self.warnings:
                print(f"{stage.name}: warning: {warning}")

    def _load_checkpoint(self, checkpoint: Path) -> dict[str, Any]:
        """Load weights, counters and sampler position; returns the trainer state for the optimizer and RNG."""
        from lmforge.tokenizer import Tokenizer

        differs = self.raw.saved_mismatch(checkpoint)
        if differs:
            raise ConfigError(f"--resume: the model or its settings differ from those of {checkpoint}: {differs}")
        if self.stage.tokenizer_dir is not None and (checkpoint / "lmforge_tokenizer.json").is_file():
            source = self.stage.tokenizer_dir
            ours = source if isinstance(source, Tokenizer) else Tokenizer.load(source)
            theirs = Tokenizer.load(checkpoint)
            if ours.fingerprint != theirs.fingerprint:
                from lmforge.errors import TokenizerMismatchError

                raise TokenizerMismatchError(f"--resume: {checkpoint} was trained with another tokenizer "
                                             f"({theirs.fingerprint[:12]}) than {self.stage.tokenizer_dir} "
                                             f"({ours.fingerprint[:12]})")
        self.raw.load_saved(checkpoint)
        saved = load_trainer_state(checkpoint)
        self.state = RunState(saved["step"], saved["tokens_seen"], saved["best_val_loss"],
                              saved.get("elapsed_s", 0.0))
        self.stage.batches.load_state_dict(saved["sampler"])
        return saved

    def precision(self) -> ContextManager:
        return precision_context(self.device, self.half)

    # ---- the clock ---------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _finish_reserve(self, step_s: float) -> float:
        """Seconds to keep for the final validation, checkpoint and model dir: measured ones, else an estimate."""
        val = self.reserve_s["val"]
        if val is None:  # a forward pass costs about a third of a training step; half is a safe guess
            val = len(self.stage.val_batches) * step_s / (2 * self.tc.grad_accum)
        save = self.reserve_s["save"]
        if save is None:  # weights and two optimizer moments written at ~100 MB/s, plus a fixed cost
            save = 0.1 + 3 * sum(p.numel() * p.element_size() for p in self.raw.parameters()) / 1e8
        return val + 2 * save

    def progress(self, step_s: float) -> float:
        """Fraction of a clock-following run's training time used (1.0: stop and finish within the budget)."""
        end = self.tc.time_budget_s - self._finish_reserve(step_s)
        return 1.0 if end <= 0 else min(1.0, self.elapsed() / end)

    def set_lr(self, step_s: float) -> None:
        self.lr = lr_at_time(self.state.step, self.progress(step_s), self.tc) if self.by_clock \
            else lr_at(self.state.step, self.tc)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    # ---- steps -------------------------------------------------------------------------------------------------

    def train_step(self, step_s: float) -> tuple[float, float]:
        """One optimizer step of grad_accum micro-steps; returns (this process's share of the step's loss, so that
        the sum over processes divided by their number is the step's loss; the gradient norm)."""
        tc, world = self.tc, self.ctx.world_size
        self.set_lr(step_s)
        batches = [self.stage.batches.next_batch(tc.batch_size, self.ctx.rank, world, self.device)
                   for _ in range(tc.grad_accum)]
        scales = self.micro_scales(batches)
        loss_sum: Any = 0.0
        for micro, batch in enumerate(batches):
            with no_sync(self.model, skip_sync=micro < tc.grad_accum - 1):
                with self.precision():
                    loss, metrics = self.stage.objective(self.model, batch)
                (loss / tc.grad_accum if scales is None else loss * scales[micro]).backward()
            loss_sum = loss_sum + (metrics["loss"] if scales is None else metrics["loss"] * scales[micro])
            if self.main:  # the objective's other figures (a preference stage's accuracy): running sums
                for key, value in metrics.items():
                    if key not in ("loss", "tokens"):
                        total, count = self.window_figures.get(key, (0.0, 0))
                        self.window_figures[key] = (total + value, count + 1)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: only measure (the scale is exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return float(loss_sum) / (tc.grad_accum if scales is None else 1.0), float(grad_norm)

    def micro_scales(self, batches: list[Batch]) -> Optional[list[float]]:
        """For a stage whose batches hold different numbers of loss terms (count_terms), the weight of each
        micro-batch's mean loss so that the step's gradient is that of the mean over all the step's terms on all
        processes (DDP then averages over the W processes, hence the factor W):

            scale_a = n_a * W / N,   N = sum over micro-batches and processes of n_a

        None for equal weights (1 / grad_accum), as for pretraining windows."""
        if self.stage.count_terms is None:
            return None
        counts = [float(self.stage.count_terms(batch)) for batch in batches]
        total = all_reduce([sum(counts)], self.device)[0]
        return [count * self.ctx.world_size / max(total, 1.0) for count in counts]

    def validate(self) -> Optional[float]:
        start = time.perf_counter()
        objective = self.stage.eval_objective or self.stage.objective
        val_loss, others = evaluate(self.forward, self.stage.val_batches, objective, self.precision(), self.device)
        self.reserve_s["val"] = time.perf_counter() - start
        if val_loss is not None and (self.state.best_val_loss is None or val_loss < self.state.best_val_loss):
            self.state.best_val_loss = val_loss
        self.val_others = {f"val_{k}": v for k, v in others.items()}
        if self.main:
            record = {"kind": "val", "step": self.state.step, "tokens": self.state.tokens_seen, "val_loss": val_loss,
                      **self.stage.val_figures(val_loss), **self.val_others}
            self.metrics.write(record)
            self.loggers.log(record)
        return val_loss

    def save(self) -> Path:
        """Gather the full model and optimizer state (collective); rank 0 writes the checkpoint."""
        start = time.perf_counter()
        barrier()
        model, optimizer_state = gather_model(self.raw), gather_optimizer_state(self.raw, self.optimizer)
        self.state.elapsed_s = self.elapsed()
        path = self.run_dir / "checkpoints" / f"step_{self.state.step}"
        if self.main:
            trainer_state = {"step": self.state.step, "tokens_seen": self.state.tokens_seen,
                             "best_val_loss": self.state.best_val_loss, "elapsed_s": self.state.elapsed_s,
                             "optimizer": optimizer_state, "sampler": self.stage.batches.state_dict(),
                             "rng": rng_state()}
            path = save_checkpoint(self.run_dir, self.state.step, model, trainer_state, self.stage.tokenizer_dir,
                                   self.tc.keep_checkpoints, self.stage.model_files)
        barrier()
        self.reserve_s["save"] = time.perf_counter() - start
        return path

    def _utilisation(self, tok_per_s: float) -> float:
        """MFU of a window; a window faster than the recorded peak raises the peak (kept for this machine)."""
        achieved = self.flops_per_token * tok_per_s
        if self.peak and achieved > self.peak and self.tc.peak_flops <= 0:
            key = machine_key(self.device, self.half or torch.float32)
            self.peak = remember_peak(key, achieved)
            self.peak_source = f"rate reached in training (above the measured matmul peak; {key})"
        return min(1.0, mfu(self.flops_per_token, tok_per_s, self.peak)) if self.peak else 0.0

    def run(self) -> Path:
        """Step until max_steps, the time budget or a stop signal; eval, checkpoint and log at their intervals and
        at the end."""
        with _StopSignals() as signals:
            try:
                return self._run(signals)
            finally:
                self.loggers.close()

    def _run(self, signals: _StopSignals) -> Path:
        tc, state = self.tc, self.state
        bar = progress_bar(tc.max_steps or max(1, state.step), state.step, enabled=self.main)
        start_step, train_time, stopped_early = state.step, 0.0, False
        window_losses: list[float] = []  # losses since the last train record
        window_time, step_s = 0.0, 0.0
        train_loss = val_loss = None
        interrupted = False
        while (self.by_clock or state.step < tc.max_steps) and not stopped_early:
            step_start = time.perf_counter()
            rank_loss, grad_norm = self.train_step(step_s)
            if self.by_clock:
                over_budget = self.progress(step_s) >= 1.0
            else:
                over_budget = 0 < tc.time_budget_s < self.elapsed()
            loss_sum, stop_votes, signal_votes = all_reduce(
                [rank_loss, float(over_budget), float(signals.received is not None)], self.device)
            train_loss = loss_sum / self.ctx.world_size
            interrupted = signal_votes > 0
            stopped_early = stop_votes > 0 or interrupted  # every rank stops together
            step_time = time.perf_counter() - step_start
            step_s = step_time if step_s == 0 else 0.9 * step_s + 0.1 * step_time
            train_time += step_time
            window_time += step_time
            window_losses.append(train_loss)
            last = state.step == tc.max_steps or stopped_early
            if self.main and (last or (tc.log_interval > 0 and state.step % tc.log_interval == 0)):
                tok_per_s = len(window_losses) * self.tokens_per_step / window_time
                utilisation = self._utilisation(tok_per_s)
                record = {"kind": "train", "step": state.step, "tokens": state.tokens_seen,
                          "loss": sum(window_losses) / len(window_losses), "lr": self.lr, "grad_norm": grad_norm,
                          "tok_per_s": tok_per_s, "mfu": utilisation, "peak_flops": self.peak,
                          "elapsed_s": self.elapsed(),
                          **{k: float(total) / count  # rank 0's micro-batches
                             for k, (total, count) in self.window_figures.items()}}
                self.window_figures = {}
                self.metrics.write(record)
                self.loggers.log(record)
                if self.by_clock:  # the step count the budget allows, re-estimated as the run goes
                    bar.total = max(state.step, round(state.step / max(self.progress(step_s), 1e-9)))
                update_progress(bar, len(window_losses), train_loss, tok_per_s, utilisation)
                window_losses, window_time = [], 0.0
            if interrupted:
                break
            if last or (tc.eval_interval > 0 and state.step % tc.eval_interval == 0):
                val_loss = self.validate()
            if last or (tc.checkpoint_interval > 0 and state.step % tc.checkpoint_interval == 0):
                self.save()
        bar.close()
        if interrupted:
            path = self.save()
            name = signal.Signals(int(signals.received or signal.SIGINT)).name
            raise Interrupted(f"stopped by {name} at step {state.step}; checkpoint {path}; resume with: lmforge "
                              f"{self.stage.name} --config {self.run_dir / 'config.json'} --resume")
        if state.step == start_step:  # resumed at max_steps: nothing trained, still report the model
            val_loss = self.validate()
        final_model = gather_model(self.raw)  # collective: the full weights on rank 0
        if self.main:
            tok_per_s = (state.step - start_step) * self.tokens_per_step / train_time if train_time else 0.0
            self.finish(final_model, {
                "stage": self.stage.name, "steps": state.step, "tokens_seen": state.tokens_seen,
                "parameters": self.raw.num_parameters(), "trainable_parameters": self.trainable,
                "wall_time_s": self.elapsed(), "train_loss": train_loss, "val_loss": val_loss,
                "best_val_loss": state.best_val_loss, **self.stage.val_figures(val_loss), **self.val_others,
                "tokens_per_s": tok_per_s, "mfu": self._utilisation(tok_per_s) if tok_per_s else 0.0,
                "peak_flops": self.peak, "peak_flops_source": self.peak_source, "stopped_early": stopped_early,
                "schedule": "clock" if self.by_clock else "steps", "warnings": self.warnings, **self.stage.summary})
        barrier()
        return self.run_dir

    def finish(self, model: nn.Module, summary: dict[str, Any]) -> None:
        """Rank 0: the final model dir (of `model`, the gathered full weights), loss.png and summary.json."""
        save_model_dir(model, self.run_dir / "final", self.stage.tokenizer_dir, self.stage.model_files)
        plot_loss(self.metrics.read(), self.run_dir / "loss.png")
        atomic_write_json(self.run_dir / "summary.json", summary)
        figures = [f"{summary['steps']} steps", f"{summary['tokens_seen']:,} tokens",
                   f"{summary['tokens_per_s']:,.0f} tokens/s"]
        if summary["val_loss"] is not None:
            figures.append(f"val loss {summary['val_loss']:.4f}" + (
                f", {summary['val_bpb']:.4f} bits/byte" if summary.get("val_bpb") is not None else ""))
        print(f"{self.stage.name}: {', '.join(figures)}; model dir {self.run_dir / 'final'}")


def train(stage: Stage, ctx: DistContext) -> Path:
    """Run `stage` on the loop; returns the run dir."""
    return Trainer(stage, ctx).run()
