"""ModelConfig: one dataclass describes every transformer lmforge builds; named presets are just configs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from lmforge.errors import ConfigError


def read_config_json(directory: str | Path) -> Optional[dict[str, Any]]:
    """The dict in `directory/config.json`, or None when it is missing or not a JSON object (lmforge or HF)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class ModelConfig:
    architecture: Literal["decoder"] = "decoder"
    vocab_size: Optional[int] = None  # None -> the dataset's vocab_size (pretrain); a model needs one to be built
    block_size: int = 256  # maximum context length (positions)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None -> n_head (MHA); 1 -> MQA; in between -> GQA
    d_model: int = 256
    d_ff: Optional[int] = None  # None -> 4*d_model (gelu/relu) or multiple_of-rounded 8/3*d_model (swiglu/geglu)
    head_dim: Optional[int] = None  # None -> d_model // n_head
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_placement: Literal["pre", "post"] = "pre"
    positions: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    mlp: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = "swiglu"
    multiple_of: int = 64  # rounding of the default d_ff for gated MLPs
    bias: bool = False  # biases on every linear layer (GPT-2 style)
    qkv_bias: Optional[bool] = None  # None -> bias; True with bias=False gives Qwen2's q/k/v-only bias
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "n_kv_head", "head_dim", "d_ff",
                     "multiple_of"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name} must be positive, got {value}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.d_ff is None:
            if self.mlp in ("swiglu", "geglu"):
                hidden = int(2 * 4 * self.d_model / 3)
                self.d_ff = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
            else:
                self.d_ff = 4 * self.d_model
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rope positions")

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from lmforge.io import atomic_write_json

        atomic_write_json(path, {"lmforge_model": True, **self.to_dict()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        from lmforge.config import build_config

        data = {k: v for k, v in data.items() if k != "lmforge_model"}
        return build_config(cls, data, prefix="model.")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(sorted(PRESETS))})")
        return cls(**{**PRESETS[name], **overrides})


_GPT2 = dict(norm="layernorm", positions="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True,
             norm_eps=1e-5, vocab_size=50257, block_size=1024)
_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny configs for tests and the quickstart
    "tiny-gpt2": dict(_GPT2, vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=64),
    "tiny-llama": dict(_LLAMA, vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64),
    "quickstart": dict(_LLAMA, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, d_model=128),
    # reference shapes
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
    "llama-60m": dict(_LLAMA, vocab_size=32000, block_size=1024, n_layer=8, n_head=8, n_kv_head=4, d_model=512),
    "llama-1b": dict(_LLAMA, vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, d_model=2048,
                     d_ff=5632),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32, d_model=4096, d_ff=11008),
}
