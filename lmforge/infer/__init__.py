"""Inference: sampling rules (sampling.py), the generation configs (config.py) and batched, cached, streaming
generation (generate.py). Names load on first use, so `lmforge.infer.config` needs no torch."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Completion", "GenerationConfig", "generate", "stream_generate"]
_LAZY = {"Completion": "lmforge.infer.generate", "GenerationConfig": "lmforge.infer.config",
         "generate": "lmforge.infer.generate", "stream_generate": "lmforge.infer.generate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.infer' has no attribute {name!r}")
