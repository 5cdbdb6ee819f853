"""Data parallelism through torchrun, on PyTorch's two engines; one process when not under torchrun.

Every process reads its own share of each global batch (see lmforge.train.data). The engines differ in what each
process holds, chosen by train.parallel:

  ddp   DistributedDataParallel: a full replica of the model and optimizer state on every process; gradients are
        all-reduced (averaged) during the backward pass.
  fsdp  FSDP2 (`fully_shard`): parameters, gradients and optimizer state are split into 1/W shards (DTensors).
        Each transformer block is one unit, the root (embeddings, tied head, final norm) another: a block's full
        weights are all-gathered just before its forward and backward and freed after; gradients are
        reduce-scattered (averaged) so each process keeps the shard of its own parameters.

Gradient accumulation skips the reduction on all micro-steps but the last (`no_sync`). Gloo serves CPU, NCCL GPU.
torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op for a single process.
Only rank 0 writes files (metrics, checkpoints, plots); the others wait at barriers around checkpoints.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.device import resolve_device
from lmforge.errors import ConfigError


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
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(f"train.device: torchrun started process {local_rank} on this node, which has {gpus} "
                              f"CUDA device(s); use --nproc-per-node {gpus} or --train.device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device, owns_group)


def close_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, ctx: DistContext, parallel: str) -> None:
    """FSDP2 in place: each of model.blocks, then the root (which takes the remaining parameters: embeddings, the
    tied or untied head, the final norm). A no-op for ddp or one process. Build the optimizer after this, over the
    sharded parameters."""
    if parallel != "fsdp" or ctx.world_size == 1:
        return
    if hasattr(model, "peft"):  # the frozen base would be sharded for nothing; its checkpoints hold the adapter only
        raise ConfigError("train.parallel=fsdp shards full fine-tuning; with a peft method use train.parallel=ddp")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # FSDP2's public API arrived in torch 2.6
        raise ConfigError(f"train.parallel=fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is "
                          f"torch {torch.__version__}: use train.parallel=ddp") from error
    for module in model.modules():  # FSDP2 shards dim 0 of contiguous tensors; lmforge's Linear keeps (in, out) order
        for name, param in module.named_parameters(recurse=False):
            if not param.is_contiguous():
                setattr(module, name, nn.Parameter(param.detach().contiguous(), requires_grad=param.requires_grad))
    # the mesh on the training device: left to itself, FSDP2 takes CUDA whenever the machine has it, even for a
    # run on the CPU
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def wrap_ddp(model: nn.Module, ctx: DistContext, parallel: str) -> nn.Module:
    """DistributedDataParallel over `model` for ddp with more than one process; `model` itself otherwise."""
    if parallel != "ddp" or ctx.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def no_sync(model: nn.Module, skip_sync: bool) -> ContextManager:
    """Skip the gradient reduction (DDP's all-reduce, FSDP2's reduce-scatter) for the micro-steps of gradient
    accumulation before the last one; gradients accumulate locally and the last micro-step reduces their sum."""
    if not skip_sync:
        return nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    module = getattr(model, "_orig_mod", model)  # under torch.compile, the FSDP module is the compiled one's
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # on the root and every sharded block
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise sum (op="sum") or maximum (op="max") of `values` over all processes (the values themselves with
    one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order: [value] with one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
