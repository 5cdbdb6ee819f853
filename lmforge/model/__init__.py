"""The lmforge model: one configurable decoder-only Transformer, its config, and its KV cache.

Names are imported on first use, so that `lmforge.model.config` (and the CLI's `--help`) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer"]
_LAZY = {"PRESETS": "lmforge.model.config", "ModelConfig": "lmforge.model.config",
         "KVCache": "lmforge.model.kv_cache", "Transformer": "lmforge.model.transformer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.model' has no attribute {name!r}")
