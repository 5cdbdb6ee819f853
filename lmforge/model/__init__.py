"""The lmforge model: one configurable decoder-only Transformer, its config, and its KV cache."""

from lmforge.model.config import PRESETS, ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer"]
