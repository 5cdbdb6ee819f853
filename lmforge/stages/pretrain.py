"""Pretraining: a causal LM on a dataset dir, resumable bit for bit, on one process or under torchrun.

The stage builds the model (new, or the weights of `init_from`), the window sampler over the train split, the
validation windows and the causal-LM objective, and hands them to the one loop (lmforge.train.loop):

    loss_step = 1/A * sum_a mean_{sequences, positions} CE(model(x_a), y_a),    tokens/step = B * A * T

With several processes train.parallel picks the engine (ddp or fsdp); the run dir is the same either way:
config.json, metrics.jsonl, checkpoints/step_N/ (full, unsharded: a run resumes on any process count), loss.png,
summary.json and the final model dir final/.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.data.shards import TokenShards, read_meta
from lmforge.errors import ConfigError, DataError, TokenizerMismatchError
from lmforge.model.transformer import Transformer
from lmforge.objectives.causal_lm import causal_lm_loss
from lmforge.tokenizer import Tokenizer, model_dir_tokenizer
from lmforge.train.config import DataSection, PretrainConfig, TrainConfig
from lmforge.train.data import WindowSampler, num_windows, validation_batches
from lmforge.train.distributed import DistContext, close_distributed, init_distributed
from lmforge.train.loop import Stage, train

__all__ = ["PretrainConfig", "DataSection", "TrainConfig", "pretrain", "bits_per_byte"]


def resolve_config(cfg: PretrainConfig, meta: dict[str, Any], init_model: Optional[Transformer] = None
                   ) -> PretrainConfig:
    """Fill in what the config leaves open: the model of `init_from`, the dataset's vocab_size when model.vocab_size
    is not given, and data.seq_len = model.block_size."""
    model = init_model.config if init_model is not None else cfg.model
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=meta["vocab_size"])
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


def check_init_tokenizer(init_from: str, dataset: str, fingerprint: str) -> Optional[str]:
    """Refuse a model dir trained with another tokenizer than the dataset's (same size or not: the ids mean other
    text); returns a warning when the model dir carries no tokenizer to compare."""
    tokenizer = model_dir_tokenizer(init_from)
    if tokenizer is None:
        return f"init_from {init_from} has no tokenizer files: cannot check that it was trained with {dataset}'s"
    if tokenizer.fingerprint != fingerprint:
        raise TokenizerMismatchError(
            f"init_from {init_from} was trained with another tokenizer (fingerprint {tokenizer.fingerprint[:12]}) "
            f"than dataset {dataset}'s ({fingerprint[:12]}); prepare the data with its tokenizer: lmforge data "
            f"prepare --tokenizer {init_from} ...")
    return None


def bits_per_byte(loss: Optional[float], split: dict[str, Any]) -> Optional[float]:
    """bpb = loss (nats/token) * tokens / bytes / ln 2, with the split's token and byte counts from meta.json."""
    if loss is None or not split.get("bytes"):
        return None
    return loss * split["tokens"] / split["bytes"] / math.log(2)


def pretrain(cfg: PretrainConfig) -> Path:
    """Train a causal LM as `cfg` says; returns the run dir (see the module docstring for what it holds)."""
    from lmforge.convert import load as load_model

    if not cfg.data.dataset:
        raise ConfigError("data.dataset is required (a dir written by `lmforge data prepare`)")
    meta = read_meta(cfg.data.dataset)
    tokenizer_dir = dataset_tokenizer(cfg, meta)
    warnings = []
    init_model = None
    if cfg.init_from:  # an lmforge or Hugging Face model dir
        init_model = load_model(cfg.init_from)
        warning = check_init_tokenizer(cfg.init_from, cfg.data.dataset, meta["tokenizer_fingerprint"])
        warnings += [warning] if warning else []
    cfg = resolve_config(cfg, meta, init_model)
    ctx = init_distributed(cfg.train.device)
    try:
        check_config(cfg, meta, ctx.world_size)
        return train(build_stage(cfg, meta, ctx, tokenizer_dir, init_model, warnings), ctx)
    finally:
        close_distributed(ctx)


def build_stage(cfg: PretrainConfig, meta: dict[str, Any], ctx: DistContext, tokenizer_dir: Path,
                init_model: Optional[Transformer], warnings: list[str]) -> Stage:
    """The model, window sampler, validation windows and objective of a pretraining run."""
    seq_len, tc = cfg.data.seq_len, cfg.train
    train_tokens = TokenShards(cfg.data.dataset, "train")
    if num_windows(len(train_tokens), seq_len) == 0:
        raise DataError(f"dataset {cfg.data.dataset}: train split has {len(train_tokens)} tokens, fewer "
                        f"than data.seq_len + 1 = {seq_len + 1}")
    val_tokens = TokenShards(cfg.data.dataset, "val")
    if num_windows(len(val_tokens), seq_len) == 0:
        warnings.append(f"dataset {cfg.data.dataset}: the val split has {len(val_tokens)} tokens "
                        f"({meta['splits']['val'].get('documents', 0)} documents), fewer than data.seq_len + 1 = "
                        f"{seq_len + 1}: no validation loss (prepare more text or a larger --val_fraction)")
    torch.manual_seed(tc.seed)
    model = init_model if init_model is not None else Transformer(cfg.model)
    return Stage(
        name="pretrain", config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=model,
        objective=functools.partial(causal_lm_loss, sync=False), eval_objective=causal_lm_loss,
        batches=WindowSampler(train_tokens, seq_len, tc.seed),
        val_batches=validation_batches(val_tokens, seq_len, tc.batch_size, tc.eval_batches, ctx.rank,
                                       ctx.world_size, ctx.device),
        tokens_per_sample=seq_len, tokenizer_dir=tokenizer_dir,
        inputs=tuple(p for p in (cfg.data.dataset, cfg.init_from) if p),
        val_figures=lambda loss: {"val_bpb": bits_per_byte(loss, meta["splits"]["val"])},
        warnings=warnings)
