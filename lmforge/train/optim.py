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


def warmup_steps(cfg: TrainConfig) -> int:
    """The warmup length: cfg.warmup_steps, or when it is None min(100, max_steps // 10) (100 for a run that
    follows the clock), so that a short run is not left below its peak rate by a long default warmup."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return 100 if cfg.max_steps == 0 else min(100, cfg.max_steps // 10)


def _decay(progress: float, cfg: TrainConfig) -> float:
    """The rate after warmup at `progress` (0..1, clipped) through the decay: cosine, wsd or constant."""
    progress = min(1.0, max(0.0, progress))
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = 1.0 - cfg.decay_frac
    if progress < decay_start:
        return cfg.lr
    return cfg.lr - (cfg.lr - cfg.min_lr) * min(1.0, (progress - decay_start) / max(cfg.decay_frac, 1e-12))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of cfg.max_steps steps.

    warmup (step < W):  lr * (step + 1) / W
    cosine:             min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (step - W) / (max_steps - W)
    wsd:                lr until D = max_steps - round(decay_frac * max_steps), then
                        lr - (lr - min_lr) * (step - D) / (max_steps - D)
    constant:           lr
    p is clipped to [0, 1], so both decays reach min_lr at step = max_steps and stay there.
    """
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = cfg.max_steps - round(cfg.decay_frac * cfg.max_steps)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    return cfg.lr - (cfg.lr - cfg.min_lr) * progress


def lr_at_time(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate of a run that follows the clock (max_steps = 0, a time budget): the schedule's decay is a
    function of the fraction of the budget elapsed, `progress`, so the rate reaches min_lr when the budget ends
    however fast or slow the steps run (wsd starts its decay when 1 - decay_frac of the budget has passed):

        lr(step, p) = decay(p) * min(1, (step + 1) / W)

    with decay(p) the cosine, wsd or constant curve of `lr_at` over p in [0, 1] instead of the step fraction."""
    warmup = warmup_steps(cfg)
    scale = (step + 1) / warmup if step < warmup else 1.0
    return _decay(progress, cfg) * scale


def check_schedule(cfg: TrainConfig) -> None:
    """Reject schedule settings that cannot describe a run."""
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and cfg.time_budget_s <= 0):
        raise ConfigError(f"train.max_steps must be positive, or 0 with train.time_budget_s > 0 (as many steps as "
                          f"the budget allows), got {cfg.max_steps}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.decay_frac <= 1.0:
        raise ConfigError(f"train.decay_frac must be in [0, 1], got {cfg.decay_frac}")
    if not 0.0 <= cfg.min_lr <= cfg.lr:
        raise ConfigError(f"train.min_lr must be in [0, train.lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.time_budget_s < 0:
        raise ConfigError(f"train.time_budget_s must be >= 0 (0 = none), got {cfg.time_budget_s}")


def schedule_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are valid but probably not meant: a warmup as long as the run."""
    warmup = warmup_steps(cfg)
    if cfg.max_steps and warmup >= cfg.max_steps:
        peak = cfg.lr * cfg.max_steps / warmup
        return [f"train.warmup_steps={warmup} >= train.max_steps={cfg.max_steps}: the learning rate only reaches "
                f"{peak:.3g} of train.lr={cfg.lr:.3g} (lower --train.warmup_steps)"]
    return []
