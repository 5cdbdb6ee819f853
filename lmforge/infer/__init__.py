"""Inference: sampling rules (sampling.py), the generation configs (config.py), batched, cached, streaming
generation (generate.py) and the terminal chat (chat.py). Names load on first use, so `lmforge.infer.config`
needs no torch."""

from lmforge.lazy import lazy_attributes

__all__ = ["Completion", "GenerationConfig", "generate", "stream_generate"]
__getattr__ = lazy_attributes(__name__, {"Completion": "lmforge.infer.generate",
                                         "GenerationConfig": "lmforge.infer.config",
                                         "generate": "lmforge.infer.generate",
                                         "stream_generate": "lmforge.infer.generate"})
