"""lmforge: from raw text to a trained language model.

Python API:
    model = lmforge.load("runs/quickstart/run/final")  # lmforge or Hugging Face model dir
    logits = model(input_ids)                           # (B, T) -> (B, T, V)
    tok = lmforge.Tokenizer.load("runs/quickstart/run/final")
    out = model.generate([tok.encode("a dog is")], lmforge.GenerationConfig(max_new_tokens=20))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "Tokenizer", "Transformer", "ModelConfig", "GenerationConfig", "__version__"]

_LAZY = {
    "load": ("lmforge.convert", "load"),
    "Tokenizer": ("lmforge.tokenizer", "Tokenizer"),
    "Transformer": ("lmforge.model.transformer", "Transformer"),
    "ModelConfig": ("lmforge.model.config", "ModelConfig"),
    "GenerationConfig": ("lmforge.infer.config", "GenerationConfig"),
}


def __getattr__(name: str) -> Any:
    # Imports are lazy so that `import lmforge` (and `lmforge --help`) stays fast and torch loads only when needed.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
