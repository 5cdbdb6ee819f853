"""`lmforge dpo`: align a model dir to preference pairs with DPO (or IPO, conservative or robust DPO, SLiC).

The policy starts from cfg.model (full weights or any PEFT method); the reference is cfg.reference or the starting
model. With reference_mode=precompute (the default) the reference's log-probabilities of every response are
computed once before training, so no second model is in memory while training (and a resumed run computes the
same numbers again); with live, the reference model stays loaded and scores each batch under no_grad.
The loss is lmforge.objectives.dpo; everything else is the one loop's. Validation reports the held-out preference
accuracy and reward margin (val_accuracy, val_margin in metrics.jsonl and summary.json).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError, TokenizerMismatchError
from lmforge.objectives.dpo import dpo_objective
from lmforge.stages.common import base_model, check_batch_split, resolve_seq_len
from lmforge.stages.config import DPOConfig
from lmforge.stages.preference import (check_data, load_items, preference_stage, reference_logps,
                                       tokenize_items)
from lmforge.train.distributed import close_distributed, init_distributed
from lmforge.train.loop import autocast_dtype, precision_context, train

__all__ = ["DPOConfig", "dpo"]


def check_config(cfg: DPOConfig) -> None:
    check_data(cfg.data)
    if cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {cfg.beta}")
    if cfg.loss_type == "robust" and not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5) for loss_type robust, got {cfg.label_smoothing}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")


def load_reference(cfg: DPOConfig, model: Any, tokenizer: Any) -> Any:
    """The reference model: cfg.reference (whose tokenizer must be the policy's) or a frozen copy of the start."""
    import copy

    if not cfg.reference:
        reference = copy.deepcopy(model)
    else:
        reference, ref_tokenizer = base_model(cfg.reference, "dpo")
        if ref_tokenizer.fingerprint != tokenizer.fingerprint:
            raise TokenizerMismatchError(f"reference {cfg.reference}: its tokenizer ({ref_tokenizer.fingerprint[:12]}) "
                                         f"is not the policy's ({tokenizer.fingerprint[:12]} of {cfg.model})")
    reference.requires_grad_(False)
    return reference.eval()


def dpo(cfg: DPOConfig) -> Path:
    """Train the policy on the preference data; returns the run dir (the aligned model is final/)."""
    check_config(cfg)
    model, tokenizer = base_model(cfg.model, "dpo")
    seq_len = resolve_seq_len(cfg.data.seq_len, model)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
    train_items, val_items = load_items(cfg.data)
    groups, counts = tokenize_items(train_items, tokenizer, cfg.data, seq_len)
    val_groups, _ = tokenize_items(val_items, tokenizer, cfg.data, seq_len)
    ctx = init_distributed(cfg.train.device)
    try:
        check_batch_split(cfg.train.batch_size, ctx.world_size)
        reference = load_reference(cfg, model, tokenizer).to(ctx.device)
        val_groups = val_groups[:cfg.train.eval_batches * cfg.train.batch_size]  # the ones validation uses
        if cfg.reference_mode == "precompute":
            if ctx.rank == 0:
                print(f"dpo: reference log-probabilities of {sum(len(g.responses) for g in groups + val_groups):,} "
                      "responses", flush=True)
            half = autocast_dtype(ctx.device, cfg.train.dtype)
            for part in (groups, val_groups):
                reference_logps(reference, part, tokenizer.pad_id, cfg.train.batch_size, ctx.device,
                                lambda: precision_context(ctx.device, half))
            reference = None  # freed: nothing but the policy in memory while training
        if ctx.rank == 0:
            print(f"dpo: {len(groups):,} training items ({counts['pairs']:,} pairs), {len(val_groups):,} validation "
                  f"items; loss {cfg.loss_type}, beta {cfg.beta}, reference {cfg.reference or cfg.model} "
                  f"({cfg.reference_mode})")
        torch.manual_seed(cfg.train.seed)
        if cfg.peft.method != "none":
            from lmforge.peft.files import wrap_base

            model = wrap_base(model, cfg.peft, cfg.model, tokenizer=tokenizer)
        model.train()
        objective = functools.partial(dpo_objective, beta=cfg.beta, loss_type=cfg.loss_type,
                                      label_smoothing=cfg.label_smoothing, reference=reference)
        stage = preference_stage("dpo", cfg, model, objective, groups, val_groups, counts, tokenizer, ctx, seq_len,
                                 {"training.json": {"stage": "dpo", "chat": True, "base_model": str(cfg.model),
                                                    "reference": str(cfg.reference or cfg.model), "beta": cfg.beta,
                                                    "loss_type": cfg.loss_type, "peft": cfg.peft.method}})
        return train(stage, ctx)
    finally:
        close_distributed(ctx)
