"""LoRA (Hu et al. 2021): a frozen weight W plus a trainable low-rank update, on chosen output rows of a projection.

    y = x W^T + s * (dropout(x) A^T) B^T,    A (r, in), B (rows, r),    s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts as PEFT's (Kaiming-uniform with a = sqrt(5)) and B at zero, so training starts from the base model. lmforge
fuses q/k/v into one projection and gate/up into another; a LoRA target names rows of such a projection, so q and v
can be adapted alone, each with its own A and B (what PEFT does on LLaMA's separate q_proj and v_proj). Targets:

    q, k, v   rows of attn.qkv       qkv   all of attn.qkv (GPT-2's c_attn)       o   attn.proj
    gate, up  rows of mlp.up (gated MLPs; up = all of mlp.up otherwise)          down   mlp.down

`merge` folds s * B A into W (rows of the fused weight), which gives a plain model whose logits equal the adapted
model's up to float rounding.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import Linear

TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


def target_rows(block: nn.Module, target: str) -> tuple[str, int, int]:
    """(module path in the block, first row, end row) of a LoRA target in a transformer block."""
    attn, mlp = block.attn, block.mlp
    q, kv = attn.q_size, attn.kv_size
    d_ff = mlp.down.in_features
    table = {"q": ("attn.qkv", 0, q), "k": ("attn.qkv", q, q + kv), "v": ("attn.qkv", q + kv, q + 2 * kv),
             "qkv": ("attn.qkv", 0, q + 2 * kv), "o": ("attn.proj", 0, attn.proj.out_features),
             "down": ("mlp.down", 0, mlp.down.out_features)}
    if mlp.gated:
        table.update(gate=("mlp.up", 0, d_ff), up=("mlp.up", d_ff, 2 * d_ff))
    else:
        table["up"] = ("mlp.up", 0, d_ff)
    if target not in table:
        valid = [t for t in TARGETS if t in table]
        raise ConfigError(f"peft.targets: unknown target '{target}' for this model (valid: {', '.join(valid)})")
    return table[target]


class LoRALinear(nn.Module):
    """A frozen projection `base` with LoRA updates on row ranges; see the module docstring."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.rows: dict[str, tuple[int, int]] = {}
        self.scale: dict[str, float] = {}
        self.dropout = nn.Identity()

    def add(self, name: str, start: int, end: int, rank: int, scale: float, dropout: float = 0.0) -> None:
        """A trainable update of rank `rank` on output rows [start, end), initialized as PEFT does."""
        if not 0 < rank <= min(self.in_features, end - start):
            raise ConfigError(f"peft.r={rank}: the rank must be in 1..{min(self.in_features, end - start)} for "
                              f"target '{name}' ({self.in_features} inputs, {end - start} outputs)")
        device = next(self.base.buffers(), next(self.base.parameters(), torch.empty(0))).device
        a = torch.empty(rank, self.in_features, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(end - start, rank, device=device))
        self.rows[name], self.scale[name] = (start, end), scale
        if dropout:
            self.dropout = nn.Dropout(dropout)

    def delta(self, name: str) -> Tensor:
        """The update of target `name` as a (rows, in) matrix: s * B A."""
        return self.scale[name] * self.lora_B[name] @ self.lora_A[name]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.rows:
            return y
        dropped = self.dropout(x)
        pieces, cursor = [], 0
        for name, (start, end) in sorted(self.rows.items(), key=lambda item: item[1]):
            update = (dropped @ self.lora_A[name].t().to(dropped.dtype)) @ self.lora_B[name].t().to(dropped.dtype)
            pieces += [y[..., cursor:start], y[..., start:end] + self.scale[name] * update.to(y.dtype)]
            cursor = end
        pieces.append(y[..., cursor:])
        return torch.cat(pieces, dim=-1)

    def merged_weight(self) -> Tensor:
        """W + the updates, (out, in) fp32."""
        weight = self.base.weight.detach().float().clone()
        for name, (start, end) in self.rows.items():
            weight[start:end] += self.delta(name).detach().float()
        return weight


def _child(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set_child(module: nn.Module, path: str, child: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, child)


def wrap(block: nn.Module, path: str) -> LoRALinear:
    """The LoRALinear at `path` of `block`, wrapping the projection there on first use."""
    module = _child(block, path)
    if not isinstance(module, LoRALinear):
        module = LoRALinear(module)
        _set_child(block, path, module)
    return module


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def apply_lora(model: nn.Module, targets: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
               rslora: bool = False, rank_pattern: Optional[dict[str, int]] = None,
               alpha_pattern: Optional[dict[str, float]] = None) -> list[LoRALinear]:
    """Add LoRA updates for `targets` to every block of a Transformer; rank_pattern and alpha_pattern give a target
    its own rank or alpha (as PEFT's do per module)."""
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ConfigError(f"peft.targets: give at least one of {', '.join(TARGETS)}")
    if "qkv" in targets and {"q", "k", "v"} & set(targets):
        raise ConfigError("peft.targets: qkv already covers q, k and v; give qkv or some of q, k, v")
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    wrapped = []
    for block in model.blocks:
        for target in targets:
            path, start, end = target_rows(block, target)
            module = wrap(block, path)
            r, a = rank_pattern.get(target, rank), alpha_pattern.get(target, alpha)
            module.add(target, start, end, r, lora_scale(a, r, rslora), dropout)
            wrapped.append(module)
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear of `model` by a plain projection holding W + s B A (in place)."""
    for block in model.blocks:
        for path in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"):
            module = _child(block, path)
            if isinstance(module, LoRALinear):
                plain = Linear(module.in_features, module.out_features, bias=module.base.bias is not None)
                plain.to(module.lora_A[next(iter(module.lora_A))].device)
                with torch.no_grad():
                    plain.weight.copy_(module.merged_weight())
                    if module.base.bias is not None:
                        plain.bias.copy_(module.base.bias)
                _set_child(block, path, plain)
