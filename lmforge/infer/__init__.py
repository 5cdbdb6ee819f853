"""Inference: sampling rules (sampling.py) and batched, cached, streaming generation (generate.py)."""

from lmforge.infer.generate import Completion, GenerationConfig, generate, stream_generate

__all__ = ["Completion", "GenerationConfig", "generate", "stream_generate"]
