"""Medusa heads (Cai et al. 2024, Medusa-1): K extra decoding heads on a frozen language model's last hidden state.

Head k (k = 1..K) reads the final hidden state h_t and predicts the token at t + k + 1 (the model's own LM head
predicts t + 1):

    logits_k(h) = W_out,k ( h + SiLU(W_k h + b_k) )     (one residual block per layer, `num_layers` of them)

W_k and b_k start at zero, so every block starts as the identity, and W_out,k starts as a copy of the base model's
lm_head weight: before training each head predicts what the base head predicts. Only the heads train; the base
stays frozen (`MedusaModel` runs its trunk under no_grad).

Files: a heads dir holds config.json ({"format": "lmforge-medusa-heads-v1", num_heads, num_layers, d_model,
vocab_size, the base model's config and a fingerprint of its weights, and the base dir it was trained on}: no model
dir's keys, so no loader takes it for a model) and medusa_heads.safetensors. `load_medusa_heads`
refuses heads whose fingerprint is not the given base model's: heads read hidden states, and another model's hidden
states mean something else. The fingerprint is the SHA-256 of the base config (JSON, sorted keys) followed by the
float32 bytes of lm_head.weight and of the final norm's parameters.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, load_safetensors, save_safetensors
from lmforge.model.heads import LMWrapper
from lmforge.model.transformer import Linear

MEDUSA_CONFIG = "config.json"  # named as a model dir's, so that the loop finds checkpoints of heads
MEDUSA_WEIGHTS = "medusa_heads.safetensors"
FORMAT = "lmforge-medusa-heads-v1"


def base_fingerprint(lm: nn.Module) -> str:
    """SHA-256 (hex) of the base model's config and the weights the heads build on (see the module docstring)."""
    digest = hashlib.sha256(json.dumps(lm.config.to_dict(), sort_keys=True).encode())
    norm = getattr(lm, "norm", None)
    tensors = [lm.lm_head.weight] + ([p for _, p in sorted(norm.named_parameters())] if norm is not None else [])
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ResidualBlock(nn.Module):
    """y = h + SiLU(W h + b), with W and b zero at the start (the identity)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + F.silu(self.linear(hidden))


class MedusaHeads(nn.Module):
    """K heads of `num_layers` residual blocks and a vocabulary projection each; see the module docstring.

    base_config, fingerprint and base_name describe the model the heads were made for (written with them)."""

    def __init__(self, d_model: int, vocab_size: int, num_heads: int = 4, num_layers: int = 1,
                 base_config: Optional[dict[str, Any]] = None, fingerprint: str = "", base_name: str = "") -> None:
        super().__init__()
        if num_heads < 1 or num_layers < 0:
            raise LmforgeError(f"medusa heads: num_heads={num_heads} must be >= 1 and num_layers={num_layers} >= 0")
        self.num_heads, self.num_layers = num_heads, num_layers
        self.base_config, self.fingerprint, self.base_name = dict(base_config or {}), fingerprint, base_name
        self.blocks = nn.ModuleList(nn.Sequential(*[ResidualBlock(d_model) for _ in range(num_layers)])
                                    for _ in range(num_heads))
        self.out = nn.ModuleList(Linear(d_model, vocab_size, bias=False) for _ in range(num_heads))

    @classmethod
    def for_base(cls, lm: nn.Module, num_heads: int = 4, num_layers: int = 1, base_name: str = "") -> "MedusaHeads":
        """New heads for `lm`: identity blocks, each output projection a copy of lm.lm_head.weight."""
        cfg = lm.config
        heads = cls(cfg.d_model, cfg.vocab_size, num_heads, num_layers, cfg.to_dict(), base_fingerprint(lm),
                    base_name)
        weight = lm.lm_head.weight
        heads.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for out in heads.out:
                out.weight.copy_(weight)
        return heads

    def forward(self, hidden: Tensor, count: Optional[int] = None) -> Tensor:
        """Logits (K, ..., V) of hidden states (..., d): head k's at index k - 1; with `count`, the first `count`
        heads only (a decoding tree that is shallower than K needs no more)."""
        heads = list(zip(self.blocks, self.out))[:count]
        return torch.stack([out(block(hidden)) for block, out in heads])

    def config_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "num_heads": self.num_heads, "num_layers": self.num_layers,
                "d_model": self.out[0].in_features, "vocab_size": self.out[0].out_features,
                "base_model": self.base_name, "base_fingerprint": self.fingerprint, "base_config": self.base_config}

    def save(self, directory: str | Path) -> None:
        """Write config.json and medusa_heads.safetensors into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                         directory / MEDUSA_WEIGHTS)
        atomic_write_json(directory / MEDUSA_CONFIG, self.config_dict())


def read_medusa_config(directory: str | Path) -> dict[str, Any]:
    """The heads dir's config.json; a one-line LmforgeError when it is not a heads dir."""
    path = Path(directory) / MEDUSA_CONFIG
    if not path.is_file() or not (Path(directory) / MEDUSA_WEIGHTS).is_file():
        raise LmforgeError(f"{directory}: not a Medusa heads dir (expected {MEDUSA_CONFIG} + {MEDUSA_WEIGHTS}, "
                           "written by lmforge medusa train)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise LmforgeError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_medusa_heads(directory: str | Path, lm: nn.Module, base_name: str = "") -> MedusaHeads:
    """The heads saved in `directory`, on lm's device and dtype, in eval mode. Heads made for another base model
    (another fingerprint) are a one-line LmforgeError naming both models."""
    config = read_medusa_config(directory)
    ours = base_fingerprint(lm)
    if config["base_fingerprint"] != ours:
        theirs = config.get("base_model") or "another model"
        raise LmforgeError(f"medusa heads {directory} were trained for base model {theirs} (fingerprint "
                           f"{config['base_fingerprint'][:12]}), not for {base_name or 'the given model'} "
                           f"(fingerprint {ours[:12]}); train heads for it with lmforge medusa train")
    heads = MedusaHeads(config["d_model"], config["vocab_size"], config["num_heads"], config["num_layers"],
                        config["base_config"], config["base_fingerprint"], config.get("base_model", ""))
    heads.load_state_dict(load_safetensors(Path(directory) / MEDUSA_WEIGHTS))
    weight = lm.lm_head.weight
    return heads.to(device=weight.device, dtype=weight.dtype).eval()


class MedusaModel(LMWrapper):
    """A frozen language model `lm` and its Medusa heads, as the training loop sees them.

    forward(input_ids) is the heads' logits (K, B, T, V) on the trunk's hidden states, the trunk run under no_grad
    and kept in eval mode (no dropout: the heads learn the states decoding will give them). save / load_saved /
    saved_mismatch read and write a heads dir, so checkpoints and final/ hold the heads only."""

    def __init__(self, lm: nn.Module, heads: MedusaHeads) -> None:
        super().__init__(lm)
        lm.requires_grad_(False)
        self.heads = heads

    def train(self, mode: bool = True) -> "MedusaModel":
        super().train(mode)
        self.lm.eval()
        return self

    def forward(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad():
            hidden = self.lm.hidden_states(input_ids)  # (B, T, d)
        return self.heads(hidden)  # (K, B, T, V)

    def flops_per_token(self, seq_len: int) -> int:
        """The trunk's forward (a third of its training FLOPs) plus the heads' forward and backward."""
        heads = sum(p.numel() for p in self.heads.parameters() if p.dim() == 2)
        return self.lm.flops_per_token(seq_len) // 3 + 6 * heads

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self.lm.num_parameters(exclude_embeddings) + sum(p.numel() for p in self.heads.parameters())

    def save(self, directory: str | Path) -> None:
        self.heads.save(directory)

    def saved_mismatch(self, directory: str | Path) -> Optional[str]:
        try:
            saved = read_medusa_config(directory)
        except LmforgeError as error:
            return str(error)
        ours = self.heads.config_dict()
        differs = [f"{k} (saved {saved.get(k)!r}, now {ours[k]!r})" for k in ("num_heads", "num_layers",
                                                                              "base_fingerprint")
                   if saved.get(k) != ours[k]]
        return ", ".join(differs) or None

    def load_saved(self, directory: str | Path) -> None:
        self.heads.load_state_dict(load_safetensors(Path(directory) / MEDUSA_WEIGHTS))
