"""Checkpoints for exact resume: run_dir/checkpoints/step_N/ = a model dir + trainer_state.pt.

A checkpoint is written into a temp dir and renamed into place, so a `step_N` dir is either complete or absent
(a crash mid-write leaves only a hidden `.step_N.tmp-*` dir, ignored and cleaned up by the next save).
trainer_state.pt holds: step, tokens_seen, best_val_loss, optimizer state, sampler state and the RNG
states of python, numpy and torch (cpu and cuda) -- only plain types and tensors, so it loads with weights_only.

The files are the same whatever the engine and process count: the full model and the full optimizer state in
torch's single-process layout (`optimizer.state_dict()`: parameters numbered in param-group order), gathered from
the shards under FSDP with torch.distributed.checkpoint's state-dict API and written by rank 0. So a run saved on W
processes resumes on any other number, with either engine.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from lmforge.io import atomic_path, atomic_write_json
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import copy_tokenizer_files

TRAINER_STATE = "trainer_state.pt"
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def write_model_files(model: nn.Module, directory: Path, tokenizer_dir: Optional[str | Path],
                      extra_files: Optional[dict[str, Any]] = None) -> None:
    """Fill the new dir `directory` with a model dir: config.json, model.safetensors, the tokenizer files (copied
    from `tokenizer_dir`, or written by a Tokenizer given in its place) and `extra_files` (name -> JSON-ready
    object, e.g. training.json)."""
    directory.mkdir(parents=True)
    model.save(directory)
    if hasattr(tokenizer_dir, "save"):  # a Tokenizer object (e.g. one read from a Hugging Face dir)
        tokenizer_dir.save(directory)
    else:
        copy_tokenizer_files(tokenizer_dir, directory)
    for name, content in (extra_files or {}).items():
        atomic_write_json(directory / name, content)


def save_model_dir(model: nn.Module, path: Path, tokenizer_dir: Optional[str | Path],
                   extra_files: Optional[dict[str, Any]] = None) -> None:
    """Write a complete model dir atomically at `path` (replacing any previous one)."""
    with atomic_path(path) as tmp:
        write_model_files(model, tmp, tokenizer_dir, extra_files)


def gather_model(model: Transformer) -> Optional[Transformer]:
    """Rank 0: a plain model of `model`'s class holding its full weights on the CPU; None on the other ranks.

    Collective: every process calls it (FSDP all-gathers the shards). The copy is built on the meta device and takes
    the gathered tensors as its parameters, so the weights are not allocated twice.
    """
    if not _is_sharded(model):  # one process or DDP: every rank holds the whole model already
        return model if not dist.is_initialized() or dist.get_rank() == 0 else None
    state = get_model_state_dict(model, options=GATHERED)
    if dist.is_initialized() and dist.get_rank() > 0:
        return None
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def _is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded `model`'s parameters (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in param-group order: position i is parameter i of optimizer.state_dict()."""
    names = {id(param): name for name, param in model.named_parameters()}  # a tied weight under its first name
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _rekey(state: dict[str, Any], key: dict) -> dict[str, Any]:
    """An optimizer state dict with every parameter key k replaced by key[k] (names <-> indices)."""
    return {"state": {key[k]: value for k, value in state["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]} for group in state["param_groups"]]}


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Rank 0: the full optimizer state dict on the CPU in torch's single-process layout; {} on the other ranks.
    Collective, like gather_model."""
    state = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if dist.is_initialized() and dist.get_rank() > 0:
        return {}
    return _rekey(state, {name: i for i, name in enumerate(_parameter_names(model, optimizer))})


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full single-process optimizer state dict (what gather_optimizer_state wrote) on every process; under
    FSDP each keeps its shard. Collective."""
    by_name = _rekey(state, dict(enumerate(_parameter_names(model, optimizer))))
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    # Moments saved from a differently laid out parameter (an FSDP run's contiguous shards, resumed on one process
    # whose Linear weights are input-major) take the parameter's memory order: the fused AdamW kernel walks
    # parameter, gradient and moments as flat arrays.
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy (as plain lists) and torch cpu/cuda."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any],
                    tokenizer_dir: Optional[str | Path], keep: int,
                    extra_files: Optional[dict[str, Any]] = None) -> Path:
    """Write checkpoints/step_{step}/ atomically, then delete all but the newest `keep` (0 = keep all)."""
    path = checkpoint_dir(run_dir, step)
    with atomic_path(path) as tmp:
        write_model_files(model, tmp, tokenizer_dir, extra_files)
        torch.save(trainer_state, tmp / TRAINER_STATE)
    for stale in path.parent.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint dirs of `run_dir`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        suffix = path.name.removeprefix("step_")
        if suffix.isdigit() and (path / TRAINER_STATE).is_file() and (
                (path / "config.json").is_file() or (path / "lmforge_adapter.json").is_file()):
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)
