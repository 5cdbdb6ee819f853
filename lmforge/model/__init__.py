"""The lmforge model: one configurable decoder-only Transformer, its config, and its KV cache.

Names are imported on first use, so that `lmforge.model.config` (and the CLI's `--help`) load without torch.
"""

from lmforge.lazy import lazy_attributes

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer"]
__getattr__ = lazy_attributes(__name__, {"PRESETS": "lmforge.model.config", "ModelConfig": "lmforge.model.config",
                                         "KVCache": "lmforge.model.kv_cache",
                                         "Transformer": "lmforge.model.transformer"})
