"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for matrices (ndim >= 2) except embedding tables; none for the rest.

    Biases and norm gains are vectors and embeddings are lookup tables, so shrinking them towards 0 only hurts
    (the GPT-3 / nanoGPT convention). A tied output head shares the embedding tensor and therefore is not decayed.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in embedding_ids else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamW(torch.optim.AdamW):
    """torch's AdamW, handing its kernels a transposed matrix as the contiguous tensor it is underneath.

    lmforge keeps widening weights in (in, out) memory order (`lmforge.model.transformer.Linear`): a (out, in)
    parameter with strides (1, out), like its gradient and moments. AdamW is elementwise, so updating p.t(), g.t(),
    m.t() and v.t() (contiguous views of the same memory) is the same update, and torch's fused CPU kernel runs
    ~2.5x faster on them than on the strided tensors (measured on a (3072, 512) weight: 1.9 vs 5.0 ms). Only the
    lists passed to the kernel change: the parameters, state and state_dict are torch's own.
    """

    def _init_group(self, group, *lists):
        result = super()._init_group(group, *lists)
        params = lists[0]  # params_with_grad, then the lists parallel to it (grads, moments, steps)
        parallel = [items for items in lists if isinstance(items, list) and len(items) == len(params)]
        for i, p in enumerate(params):
            if p.dim() != 2 or p.is_contiguous() or not p.t().is_contiguous():
                continue
            same = [items for items in parallel if items[i].shape == p.shape]  # not the 0-d step counters
            if all(items[i].stride() == p.stride() for items in same):
                for items in same:
                    items[i] = items[i].t()
        return result


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW(lr, betas=(beta1, beta2)) over `param_groups`, with torch's fused kernel (one pass over each tensor's
    parameter, gradient and moments) on CUDA and CPU, and foreach elsewhere."""
    fused = device_type in ("cuda", "cpu")
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                 fused=fused, foreach=None if fused else True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    warmup (step < W):  lr * (step + 1) / W
    cosine:             min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (step - W) / (max_steps - W)
    wsd:                lr until D = max_steps - round(decay_frac * max_steps), then
                        lr - (lr - min_lr) * (step - D) / (max_steps - D)
    constant:           lr
    p is clipped to [0, 1], so both decays reach min_lr at step = max_steps and stay there.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = cfg.max_steps - round(cfg.decay_frac * cfg.max_steps)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    return cfg.lr - (cfg.lr - cfg.min_lr) * progress


def check_schedule(cfg: TrainConfig) -> None:
    """Reject schedule settings that cannot describe a run."""
    if cfg.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive, got {cfg.max_steps}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.decay_frac <= 1.0:
        raise ConfigError(f"train.decay_frac must be in [0, 1], got {cfg.decay_frac}")
    if not 0.0 <= cfg.min_lr <= cfg.lr:
        raise ConfigError(f"train.min_lr must be in [0, train.lr={cfg.lr}], got {cfg.min_lr}")
