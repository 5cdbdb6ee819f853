"""Data parallelism through torchrun: DDP with gloo on CPU and NCCL on GPU; one process when not under torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op for a single process.
Only rank 0 writes files (metrics, checkpoints, plots); the others wait at barriers around checkpoints.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.device import resolve_device


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True when this context created the process group and must destroy it


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group (when WORLD_SIZE > 1) and pick this process's device."""
    device = resolve_device(device_name, "train.device")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext(0, 1, device, owns_group=False)
    owns_group = not dist.is_initialized()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device, owns_group)


def close_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel over `model` when running with more than one process."""
    if ctx.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def no_sync(model: nn.Module, skip_sync: bool) -> ContextManager:
    """Skip DDP's gradient all-reduce for the micro-steps of gradient accumulation before the last one."""
    if skip_sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes (the values themselves with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
