"""lmforge: from raw text to a trained language model.

Python API:
    model = lmforge.load("runs/quickstart/run/final")  # lmforge or Hugging Face model dir
    logits = model(input_ids)                           # (B, T) -> (B, T, V)
    tok = lmforge.Tokenizer.load("runs/quickstart/run/final")
    out = model.generate([tok.encode("a dog is")], lmforge.GenerationConfig(max_new_tokens=20))
"""

from __future__ import annotations

from lmforge.lazy import lazy_attributes

__version__ = "0.1.0"
__all__ = ["load", "Tokenizer", "Transformer", "ModelConfig", "GenerationConfig", "__version__"]
# Imports are lazy so that `import lmforge` (and `lmforge --help`) stays fast and torch loads only when needed.
__getattr__ = lazy_attributes(__name__, {"load": "lmforge.convert", "Tokenizer": "lmforge.tokenizer",
                                         "Transformer": "lmforge.model.transformer",
                                         "ModelConfig": "lmforge.model.config",
                                         "GenerationConfig": "lmforge.infer.config"})
