"""Device names as the configs take them, resolved in one place for training and generation."""

from __future__ import annotations

import re

import torch

from lmforge.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str, key: str = "device") -> torch.device:
    """A device name as the configs take it: auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps.

    Raises ConfigError (naming the config `key`) for an unknown name or a device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name.strip())
    if not match or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ConfigError(f"{key}: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {name!r} requested but CUDA is not available on this machine "
                              f"(use --{key} cpu or auto)")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {name!r} requested but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}: {name!r} requested but MPS is not available on this machine")
    return torch.device(name.strip())
