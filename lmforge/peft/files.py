"""Adapter dirs: what a PEFT run writes and reads, in lmforge's layout and in Hugging Face PEFT's format.

An adapter dir holds
- lmforge_adapter.json: the peft settings, the base model dir, a fingerprint of the base weights and their config;
- lmforge_adapter.safetensors: the trained parameters under lmforge's names (what resume and `load_adapter` read);
- adapter_config.json + adapter_model.safetensors: the same adapter in PEFT's format for the Hugging Face export of
  the base (`lmforge convert BASE HF --to hf`), when PEFT has the method: LoRA (also from a quantized base), prefix
  tuning, prompt tuning (lmforge.peft.peft_format);
- the tokenizer files and training.json, like a model dir.

The fingerprint is a blake2b digest of the base's lmforge state dict (names, shapes and values), so an adapter is
never applied to another model of the same shapes; the same weights give the same fingerprint whether they were read
from an lmforge or a Hugging Face dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, load_safetensors, save_safetensors
from lmforge.model.config import ModelConfig
from lmforge.peft.config import PeftConfig

ADAPTER_CONFIG = "lmforge_adapter.json"
ADAPTER_WEIGHTS = "lmforge_adapter.safetensors"
FORMAT = "lmforge-adapter-v1"


def weights_fingerprint(model: nn.Module) -> str:
    """blake2b-128 of a Transformer's state dict: sorted names, shapes and float32 values (see module docstring)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: Any, directory: str | Path) -> None:
    """Write `model`'s (a PeftModel's) adapter into `directory` (see the module docstring); the base itself is not
    written."""
    from lmforge.peft.peft_format import export_peft

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().contiguous().cpu() for name, p in model.trainable_parameters().items()}
    save_safetensors(state, directory / ADAPTER_WEIGHTS)
    atomic_write_json(directory / ADAPTER_CONFIG, {
        "format": FORMAT, "peft": dataclasses.asdict(model.peft), "base_model": model.base_dir,
        "base_fingerprint": model.base_fingerprint, "base_config": model.base.config.to_dict(),
        "trainable_parameters": sum(t.numel() for t in state.values())})
    export_peft(model, directory)


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"adapter dir {directory}: cannot read {ADAPTER_CONFIG} ({exc})".splitlines()[0]) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmforgeError(f"{path}: not an lmforge adapter config (format {FORMAT})")
    return meta


def check_base(meta: dict[str, Any], base: nn.Module, fingerprint: str, where: str) -> None:
    """Refuse a base model that is not the one the adapter was trained on (config or weights)."""
    recorded = ModelConfig.from_dict(meta["base_config"])
    if recorded != base.config:
        old, new = recorded.to_dict(), base.config.to_dict()
        keys = ", ".join(f"{k} ({old[k]!r} vs {new[k]!r})" for k in old if old[k] != new.get(k))
        raise LmforgeError(f"adapter {where} was trained on another base model: config differs in {keys}")
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise LmforgeError(f"adapter {where} was trained on another base model (the weights' fingerprint "
                           f"{meta['base_fingerprint'][:12]} is not this base's {fingerprint[:12]})")


def load_adapter(directory: str | Path, base_dir: Optional[str | Path] = None, tokenizer: Any = None) -> Any:
    """A PeftModel from an lmforge adapter dir, on its recorded base model dir (or `base_dir`), in eval mode."""
    from lmforge.convert import load

    directory = Path(directory)
    meta = read_adapter_config(directory)
    base_path = Path(base_dir or meta.get("base_model") or "")
    if not base_path.is_dir():
        raise LmforgeError(f"adapter dir {directory}: its base model dir {base_path} is not there; give the base "
                           "model dir (--base DIR)")
    base = load(base_path)
    fingerprint = weights_fingerprint(base)
    check_base(meta, base, fingerprint, str(directory))
    cfg = PeftConfig(**meta["peft"])
    model = wrap_base(base, dataclasses.replace(cfg, prompt_init_text=""), str(base_path), fingerprint, tokenizer)
    model.peft = cfg  # the weights come from the file: no initialization from a text, but the record stays
    weights = directory / ADAPTER_WEIGHTS
    model.load_weights(load_safetensors(weights), source=str(weights))
    return model.eval()


def wrap_base(base: nn.Module, cfg: PeftConfig, base_dir: str, fingerprint: Optional[str] = None,
              tokenizer: Any = None) -> Any:
    """PeftModel(base, cfg) that remembers where its base came from (what save_adapter records)."""
    from lmforge.peft.model import PeftModel

    fingerprint = fingerprint or weights_fingerprint(base)
    model = PeftModel(base, cfg, tokenizer)
    model.base_dir, model.base_fingerprint = str(Path(base_dir).resolve()), fingerprint
    return model


def merge(model: Any) -> nn.Module:
    """A plain Transformer equal to a LoRA or QLoRA PeftModel (the update folded into the weights)."""
    from lmforge.peft.lora import merge_lora

    if model.peft.method not in ("lora", "qlora"):
        raise LmforgeError(f"peft merge: only lora and qlora adapters fold into the weights, not "
                           f"{model.peft.method} (use the adapter dir as it is)")
    base = model.base
    merge_lora(base)
    _dequantize(base)
    for param in base.parameters():
        param.requires_grad_(True)
    return base


def _dequantize(model: nn.Module) -> None:
    """Replace the remaining QuantLinear projections (a QLoRA base without an update there) by plain ones."""
    from lmforge.model.transformer import Linear
    from lmforge.peft.quant import QuantLinear

    for block in model.blocks:
        for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "up"), (block.mlp, "down")):
            module = getattr(owner, name)
            if isinstance(module, QuantLinear):
                plain = Linear(module.in_features, module.out_features, bias=module.bias is not None)
                with torch.no_grad():
                    plain.weight.copy_(module.weight)
                    if module.bias is not None:
                        plain.bias.copy_(module.bias)
                setattr(owner, name, plain)
