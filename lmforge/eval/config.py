"""`lmforge eval` configuration (no torch import here, so `lmforge eval --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from lmforge.errors import ConfigError


@dataclass
class EvalConfig:
    """Evaluate a model dir on built-in tasks, JSONL task files, and the perplexity of a text.

    tasks: built-in names (`lmforge tasks list`), `all` (every built-in task) or .jsonl task files. Empty means
    all built-in tasks, unless `text` is given, in which case only the perplexity is measured.
    """

    model: str = ""  # an lmforge or Hugging Face model dir (its tokenizer is read from the same dir)
    tasks: list[str] = field(default_factory=list)  # built-in task names, 'all', or .jsonl task files
    split: Literal["train", "validation", "test"] = "test"  # split of the built-in tasks
    shots: int = 0  # k-shot: examples drawn deterministically from the train split (a task file: the file)
    chat: Union[bool, Literal["auto"]] = "auto"  # auto: chat format if the model dir says it is a chat model
    limit: int = 0  # examples per task (0 = all; built-in test splits hold 500)
    batch_size: int = 16  # sequences per forward pass
    max_new_tokens: int = 64  # generation tasks: tokens generated per answer at most
    out: str = ""  # write the JSON report here (optional)
    text: str = ""  # a text file or a dataset dir (val split): perplexity and bits per byte
    text_split: Literal["file", "paragraph"] = "file"  # a text file is one document, or one per paragraph
    stride: int = 0  # perplexity window stride in tokens (0 = half the block size)
    max_text_tokens: int = 0  # perplexity on at most this many tokens (0 = all)
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps
    quantize: Optional[str] = None  # int8 | int4: evaluate with weight-only quantized matmuls (lmforge.infer.quant)
    quant_group_size: int = 32  # int4: inputs per scale and zero (32, 64, 128 or 256)
    quant_head: bool = True  # quantize the LM head too
    seed: int = 0  # seeds the choice of k-shot examples
    reference: str = ""  # preference sets: rank by the implicit reward log pi - log pi_ref against this model dir
    cache_dir: str = ""  # cache of packages and parsed tasks (default $LMFORGE_CACHE, else ~/.cache/lmforge)

    def __post_init__(self) -> None:
        checks = [(self.shots >= 0, "shots", ">= 0"), (self.limit >= 0, "limit", ">= 0 (0 = all)"),
                  (self.batch_size >= 1, "batch_size", ">= 1"), (self.max_new_tokens >= 1, "max_new_tokens", ">= 1"),
                  (self.stride >= 0, "stride", ">= 0 (0 = half the block size)"),
                  (self.max_text_tokens >= 0, "max_text_tokens", ">= 0 (0 = all)")]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"eval {name}={getattr(self, name)!r}: expected {expected}")
