"""Checkpoints for exact resume: run_dir/checkpoints/step_N/ = a model dir + trainer_state.pt.

A checkpoint is written into a temp dir and renamed into place, so a `step_N` dir is either complete or absent
(a crash mid-write leaves only a hidden `.step_N.tmp-*` dir, ignored and cleaned up by the next save).
trainer_state.pt holds: step, tokens_seen, best_val_loss, optimizer state, sampler state and the RNG
states of python, numpy and torch (cpu and cuda) -- only plain types and tensors, so it loads with weights_only.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lmforge.io import atomic_path
from lmforge.tokenizer import copy_tokenizer_files

TRAINER_STATE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def write_model_files(model: nn.Module, directory: Path, tokenizer_dir: Optional[str | Path]) -> None:
    """Fill the new dir `directory` with a model dir: config.json, model.safetensors and the tokenizer files."""
    directory.mkdir(parents=True)
    model.save(directory)
    copy_tokenizer_files(tokenizer_dir, directory)


def save_model_dir(model: nn.Module, path: Path, tokenizer_dir: Optional[str | Path]) -> None:
    """Write a complete model dir atomically at `path` (replacing any previous one)."""
    with atomic_path(path) as tmp:
        write_model_files(model, tmp, tokenizer_dir)


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
                    tokenizer_dir: Optional[str | Path], keep: int) -> Path:
    """Write checkpoints/step_{step}/ atomically, then delete all but the newest `keep` (0 = keep all)."""
    path = checkpoint_dir(run_dir, step)
    with atomic_path(path) as tmp:
        write_model_files(model, tmp, tokenizer_dir)
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
        if suffix.isdigit() and (path / TRAINER_STATE).is_file() and (path / "config.json").is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)
