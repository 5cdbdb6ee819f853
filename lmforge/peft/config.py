"""PeftConfig: which parameter-efficient method a training stage uses (the `peft` section of sft and later stages).
No torch here: the CLI builds its options from this class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import ConfigError

METHODS = ("none", "lora", "qlora", "adapter", "prefix", "prompt")


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "qlora", "adapter", "prefix", "prompt"] = "none"  # none: full fine-tuning
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # lora/qlora: q, k, v, qkv, o, gate, up,
                                                                    # down (the projections adapted)
    r: int = 8  # lora/qlora rank
    alpha: float = 16.0  # lora/qlora scale numerator: s = alpha / r (rslora: alpha / sqrt(r))
    dropout: float = 0.0  # lora/qlora dropout on the adapted projections' inputs
    rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # a target's own rank (config files), e.g. {"o": 4}
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # a target's own alpha (config files)
    quantize: Literal["nf4", "int8"] = "nf4"  # qlora: how the frozen base weights are stored
    group_size: int = 64  # qlora nf4: inputs per absmax group
    adapter_size: int = 16  # adapter: bottleneck width of each adapter
    virtual_tokens: int = 16  # prefix/prompt: learned positions before the input
    prefix_projection: bool = False  # prefix: train the prefix through an MLP (folded away when saved)
    prefix_hidden: int = 128  # prefix: hidden width of that MLP
    prompt_init_text: str = ""  # prompt: initialize the soft prompt from the embeddings of this text's tokens

    def __post_init__(self) -> None:
        checks = [(self.r > 0, "r", "> 0"), (self.alpha > 0, "alpha", "> 0"),
                  (0 <= self.dropout < 1, "dropout", "in [0, 1)"), (self.group_size > 0, "group_size", "> 0"),
                  (self.adapter_size > 0, "adapter_size", "> 0"), (self.virtual_tokens > 0, "virtual_tokens", "> 0"),
                  (self.prefix_hidden > 0, "prefix_hidden", "> 0")]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"peft.{name}={getattr(self, name)!r}: expected {expected}")


@dataclass
class PeftMergeConfig:
    adapter: str = ""  # an lmforge adapter dir (a peft run's final/ or checkpoint)
    out_dir: str = ""  # the plain model dir to write
    base: str = ""  # the base model dir ("" = the one the adapter records)


@dataclass
class PeftImportConfig:
    adapter: str = ""  # a PEFT adapter dir made by the peft library (adapter_config.json + adapter_model.safetensors)
    base: str = ""  # the base model dir it was trained on (lmforge or Hugging Face)
    out_dir: str = ""  # the lmforge adapter dir to write
