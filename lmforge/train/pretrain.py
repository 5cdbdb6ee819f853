"""Pretraining: a causal LM on a dataset dir, resumable bit for bit, on one process or under torchrun.

One optimizer step = grad_accum micro-steps of batch_size sequences (summed over processes) of seq_len tokens:

    loss_step = 1/A * sum_a mean_{sequences, positions} CE(model(x_a), y_a),    tokens/step = B * A * T

so the update is the same for any split of B*A into processes and micro-steps. With several processes
train.parallel picks the engine (lmforge.train.distributed): ddp keeps a full replica per process, fsdp shards
parameters, gradients and optimizer state (FSDP2). Either way the run dir is the same: config.json,
metrics.jsonl, checkpoints/step_N/ (full, unsharded: a run resumes on any process count with either engine),
loss.png, summary.json and the final model dir final/.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from torch import nn

from lmforge.config import config_to_dict
from lmforge.convert import load as load_model
from lmforge.data.shards import TokenShards, read_meta
from lmforge.errors import ConfigError, DataError, LmforgeError, TokenizerMismatchError
from lmforge.io import atomic_write_json, load_safetensors
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.objectives.causal_lm import causal_lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import (gather_model, gather_optimizer_state, latest_checkpoint, list_checkpoints,
                                      load_optimizer_state, load_trainer_state, rng_state, save_checkpoint,
                                      save_model_dir, set_rng_state)
from lmforge.train.config import DataSection, PretrainConfig, TrainConfig
from lmforge.train.data import WindowSampler, num_windows, validation_batches
from lmforge.train.distributed import (DistContext, all_reduce, barrier, close_distributed, init_distributed, no_sync,
                                       shard_model, wrap_ddp)
from lmforge.train.metrics import MetricsLog, plot_loss, progress_bar, update_progress
from lmforge.train.mfu import mfu, peak_flops
from lmforge.train.optim import build_optimizer, check_schedule, lr_at

__all__ = ["PretrainConfig", "DataSection", "TrainConfig", "pretrain"]


@dataclasses.dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    best_val_loss: Optional[float] = None


def resolve_config(cfg: PretrainConfig, init_model: Optional[Transformer] = None) -> PretrainConfig:
    """Fill in what the config leaves open: the model of `init_from`, and data.seq_len = model.block_size."""
    model = init_model.config if init_model is not None else cfg.model
    seq_len = cfg.data.seq_len or model.block_size
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, seq_len=seq_len))


def check_config(cfg: PretrainConfig, meta: dict[str, Any], world: int) -> None:
    """Reject a config that does not fit its dataset, model or process count (one line naming the field)."""
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise TokenizerMismatchError(f"dataset {cfg.data.dataset} has vocab_size {meta['vocab_size']} but "
                                     f"model.vocab_size is {cfg.model.vocab_size}; the model must cover the tokenizer")
    if not 0 < cfg.data.seq_len <= cfg.model.block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be in 1..model.block_size={cfg.model.block_size}")
    train = cfg.train
    if train.batch_size <= 0 or train.grad_accum <= 0:
        raise ConfigError(f"train.batch_size and train.grad_accum must be positive, got {train.batch_size}, "
                          f"{train.grad_accum}")
    for name in ("log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints"):
        if getattr(train, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0 (0 = only at the end), got {getattr(train, name)}")
    if train.batch_size % world:
        raise ConfigError(f"train.batch_size={train.batch_size} must be divisible by the number of processes {world}")
    check_schedule(train)


def dataset_tokenizer(cfg: PretrainConfig, meta: dict[str, Any]) -> Path:
    """The dataset's tokenizer dir (copied into checkpoints and final/), checked against meta.json's fingerprint."""
    directory = Path(cfg.data.dataset) / "tokenizer"
    if not directory.is_dir():
        raise DataError(f"dataset {cfg.data.dataset}: tokenizer dir {directory} not found "
                        "(re-run `lmforge data prepare`)")
    fingerprint = Tokenizer.load(directory).fingerprint
    if fingerprint != meta.get("tokenizer_fingerprint"):
        raise TokenizerMismatchError(f"dataset {cfg.data.dataset}: tokenizer in {directory} (fingerprint "
                                     f"{fingerprint[:12]}) is not the one meta.json's tokens were made with "
                                     f"({str(meta.get('tokenizer_fingerprint'))[:12]}); re-run `lmforge data prepare`")
    return directory


def autocast_dtype(device: torch.device, dtype: str) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32: 'auto' is bf16 on CUDA and fp32 on CPU."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def precision_context(device: torch.device, half: Optional[torch.dtype]) -> ContextManager:
    """Autocast to `half` on `device`, or nothing (plain fp32) when half is None."""
    return torch.autocast(device.type, dtype=half) if half else nullcontext()


def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]], precision: ContextManager,
             device: torch.device) -> Optional[float]:
    """Token-weighted mean validation loss over all processes' batches (None if there are none).

    Every process calls the model equally often, since an FSDP forward is collective: one with fewer batches (its
    share of the last batch can be empty) runs it on a dummy token and discards the result.
    """
    loss_sum, tokens = 0.0, 0.0
    rounds = int(all_reduce([float(len(batches))], device, op="max")[0])
    was_training = model.training
    model.eval()
    with torch.no_grad(), precision:
        for batch in batches:
            _, metrics = causal_lm_loss(model, batch)
            loss_sum += metrics["loss"] * metrics["tokens"]
            tokens += metrics["tokens"]
        for _ in range(rounds - len(batches)):
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
    model.train(was_training)
    loss_sum, tokens = all_reduce([loss_sum, tokens], device)
    return loss_sum / tokens if tokens else None


def bits_per_byte(loss: Optional[float], split: dict[str, Any]) -> Optional[float]:
    """bpb = loss (nats/token) * tokens / bytes / ln 2, with the split's token and byte counts from meta.json."""
    if loss is None or not split.get("bytes"):
        return None
    return loss * split["tokens"] / split["bytes"] / math.log(2)


def prepare_run_dir(cfg: PretrainConfig, ctx: DistContext) -> tuple[Path, Optional[Path]]:
    """The run dir and the checkpoint to resume from (None for a fresh run)."""
    run_dir = Path(cfg.out_dir)
    checkpoint = latest_checkpoint(run_dir)
    if cfg.resume and checkpoint is None:
        raise LmforgeError(f"resume: no checkpoint in {run_dir / 'checkpoints'} (run without resume to start fresh)")
    if not cfg.resume and list_checkpoints(run_dir):
        raise LmforgeError(f"out_dir {run_dir} already holds checkpoints; set resume=true or choose another out_dir")
    barrier()  # every rank has looked before rank 0 writes
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config_to_dict(cfg))
        if checkpoint is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return run_dir, checkpoint


def pretrain(cfg: PretrainConfig) -> Path:
    """Train a causal LM as `cfg` says; returns the run dir (see the module docstring for what it holds)."""
    if not cfg.data.dataset:
        raise ConfigError("data.dataset is required (a dir written by `lmforge data prepare`)")
    meta = read_meta(cfg.data.dataset)
    tokenizer_dir = dataset_tokenizer(cfg, meta)
    init_model = load_model(cfg.init_from) if cfg.init_from else None  # an lmforge or Hugging Face model dir
    cfg = resolve_config(cfg, init_model)
    ctx = init_distributed(cfg.train.device)
    try:
        check_config(cfg, meta, ctx.world_size)
        return PretrainRun(cfg, meta, ctx, tokenizer_dir, init_model).run()
    finally:
        close_distributed(ctx)


class PretrainRun:
    """One invocation of pretraining: setup (fresh or from a checkpoint), the step loop, and the final outputs."""

    def __init__(self, cfg: PretrainConfig, meta: dict[str, Any], ctx: DistContext, tokenizer_dir: Path,
                 init_model: Optional[Transformer] = None) -> None:
        self.started = time.perf_counter()
        self.cfg, self.meta, self.ctx, self.tc = cfg, meta, ctx, cfg.train
        self.tokenizer_dir = tokenizer_dir
        self.main, self.device, seq_len = ctx.rank == 0, ctx.device, cfg.data.seq_len
        train_tokens = TokenShards(cfg.data.dataset, "train")
        if num_windows(len(train_tokens), seq_len) == 0:
            raise DataError(f"dataset {cfg.data.dataset}: train split has {len(train_tokens)} tokens, fewer "
                            f"than data.seq_len + 1 = {seq_len + 1}")
        self.run_dir, checkpoint = prepare_run_dir(cfg, ctx)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast

        torch.manual_seed(self.tc.seed)
        self.raw = init_model if init_model is not None else Transformer(cfg.model)
        self.raw.activation_checkpointing = self.tc.activation_checkpointing
        self.state, self.sampler = RunState(), WindowSampler(train_tokens, seq_len, self.tc.seed)
        saved = self._load_checkpoint(checkpoint) if checkpoint else {}
        self.raw.to(self.device)
        shard_model(self.raw, ctx, self.tc.parallel)  # fsdp: in place, so the optimizer holds only this shard
        self.optimizer = build_optimizer(self.raw, self.tc, self.device.type)
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

        self.val_batches = validation_batches(TokenShards(cfg.data.dataset, "val"), seq_len, self.tc.batch_size,
                                              self.tc.eval_batches, ctx.rank, ctx.world_size, self.device)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if self.main and checkpoint:
            self.metrics.truncate_after(self.state.step)
        self.flops_per_token = self.raw.flops_per_token(seq_len)
        self.peak = peak_flops(self.device, self.half or torch.float32, self.tc.peak_flops) if self.main else 0.0
        self.tokens_per_step = self.tc.batch_size * self.tc.grad_accum * seq_len

    def _load_checkpoint(self, checkpoint: Path) -> dict[str, Any]:
        """Load weights, counters and sampler position; returns the trainer state for the optimizer and RNG."""
        if ModelConfig.load(checkpoint / "config.json") != self.raw.config:
            raise ConfigError(f"resume: the model config differs from the one in {checkpoint}")
        weights = checkpoint / "model.safetensors"
        self.raw.load_weights(load_safetensors(weights), source=str(weights))
        saved = load_trainer_state(checkpoint)
        self.state = RunState(saved["step"], saved["tokens_seen"], saved["best_val_loss"])
        self.sampler.load_state_dict(saved["sampler"])
        return saved

    def precision(self) -> ContextManager:
        return precision_context(self.device, self.half)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step of grad_accum micro-steps; returns (this process's mean loss, gradient norm)."""
        tc = self.tc
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, tc)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            batch = self.sampler.next_batch(tc.batch_size, self.ctx.rank, self.ctx.world_size, self.device)
            with no_sync(self.model, skip_sync=micro < tc.grad_accum - 1):
                with self.precision():
                    loss, metrics = causal_lm_loss(self.model, batch, sync=False)
                (loss / tc.grad_accum).backward()
            loss_sum = loss_sum + metrics["loss"]
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: only measure (the scale is exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return float(loss_sum) / tc.grad_accum, float(grad_norm)

    def validate(self) -> Optional[float]:
        val_loss = evaluate(self.forward, self.val_batches, self.precision(), self.device)
        if val_loss is not None and (self.state.best_val_loss is None or val_loss < self.state.best_val_loss):
            self.state.best_val_loss = val_loss
        if self.main:
            self.metrics.write({"kind": "val", "step": self.state.step, "tokens": self.state.tokens_seen,
                                "val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.meta["splits"]["val"])})
        return val_loss

    def save(self) -> None:
        """Gather the full model and optimizer state (collective); rank 0 writes the checkpoint."""
        barrier()
        model, optimizer_state = gather_model(self.raw), gather_optimizer_state(self.raw, self.optimizer)
        if self.main:
            trainer_state = {"step": self.state.step, "tokens_seen": self.state.tokens_seen,
                             "best_val_loss": self.state.best_val_loss, "optimizer": optimizer_state,
                             "sampler": self.sampler.state_dict(), "rng": rng_state()}
            save_checkpoint(self.run_dir, self.state.step, model, trainer_state, self.tokenizer_dir,
                            self.tc.keep_checkpoints)
        barrier()

    def run(self) -> Path:
        """Step until max_steps or the time budget; eval, checkpoint and log at their intervals and at the end."""
        tc, state = self.tc, self.state
        bar = progress_bar(tc.max_steps, state.step, enabled=self.main)
        start_step, train_time, stopped_early = state.step, 0.0, False
        window_losses: list[float] = []  # losses since the last train record
        window_time = 0.0
        train_loss = val_loss = None
        while state.step < tc.max_steps and not stopped_early:
            step_start = time.perf_counter()
            rank_loss, grad_norm = self.train_step()
            over_budget = 0 < tc.time_budget_s < time.perf_counter() - self.started
            loss_sum, stop_votes = all_reduce([rank_loss, float(over_budget)], self.device)
            train_loss, stopped_early = loss_sum / self.ctx.world_size, stop_votes > 0  # every rank stops together
            step_time = time.perf_counter() - step_start
            train_time += step_time
            window_time += step_time
            window_losses.append(train_loss)
            last = state.step == tc.max_steps or stopped_early
            if self.main and (last or (tc.log_interval > 0 and state.step % tc.log_interval == 0)):
                tok_per_s = len(window_losses) * self.tokens_per_step / window_time
                utilisation = mfu(self.flops_per_token, tok_per_s, self.peak)
                self.metrics.write({"kind": "train", "step": state.step, "tokens": state.tokens_seen,
                                    "loss": sum(window_losses) / len(window_losses), "lr": lr_at(state.step - 1, tc),
                                    "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": utilisation,
                                    "elapsed_s": time.perf_counter() - self.started})
                update_progress(bar, len(window_losses), train_loss, tok_per_s, utilisation)
                window_losses, window_time = [], 0.0
            if last or (tc.eval_interval > 0 and state.step % tc.eval_interval == 0):
                val_loss = self.validate()
            if last or (tc.checkpoint_interval > 0 and state.step % tc.checkpoint_interval == 0):
                self.save()
        bar.close()
        if state.step == start_step:  # resumed at max_steps: nothing trained, still report the model
            val_loss = self.validate()
        final_model = gather_model(self.raw)  # collective: the full weights on rank 0
        if self.main:
            tok_per_s = (state.step - start_step) * self.tokens_per_step / train_time if train_time else 0.0
            self.finish(final_model, {
                "steps": state.step, "tokens_seen": state.tokens_seen,
                "wall_time_s": time.perf_counter() - self.started, "train_loss": train_loss,
                "val_loss": val_loss, "best_val_loss": state.best_val_loss,
                "val_bpb": bits_per_byte(val_loss, self.meta["splits"]["val"]), "tokens_per_s": tok_per_s,
                "mfu": mfu(self.flops_per_token, tok_per_s, self.peak), "stopped_early": stopped_early})
        barrier()
        return self.run_dir

    def finish(self, model: Transformer, summary: dict[str, Any]) -> None:
        """Rank 0: the final model dir (of `model`, the gathered full weights), loss.png and summary.json."""
        save_model_dir(model, self.run_dir / "final", self.tokenizer_dir)
        plot_loss(self.metrics.read(), self.run_dir / "loss.png")
        atomic_write_json(self.run_dir / "summary.json", summary)
        val = "" if summary["val_loss"] is None else (
            f"; val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.4f} bits/byte")
        print(f"pretrain: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
              f"{summary['tokens_per_s']:,.0f} tokens/s{val}; model dir {self.run_dir / 'final'}")
