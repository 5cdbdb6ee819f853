"""Conversion between lmforge models and Hugging Face checkpoints (GPT-2, LLaMA, Qwen2, Mistral).

Each family is one mapping table from lmforge state-dict names to HF names (torchtitan's state-dict adapter
idea). A tuple of HF names is one lmforge tensor split along dim 0 (fused q/k/v, fused gate/up). GPT-2's Conv1D
layers store weights transposed, (in, out) instead of (out, in).

Reading an HF dir needs only `safetensors` (config.json + model.safetensors or a sharded index); `transformers`
is imported only to build the config object on export. Limits: RoPE scaling variants are rejected; a sliding
window W is imported exactly by capping block_size at W (within W tokens sliding attention is full attention).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text, load_safetensors, save_safetensors
from lmforge.model.config import ModelConfig, read_config_json
from lmforge.model.transformer import Transformer

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "MistralForCausalLM": "mistral"}
FAMILIES = {family: arch for arch, family in ARCHITECTURES.items()}

# lmforge name -> HF name(s); "{i}" is the layer index.
GPT2_MAP: dict[str, str | tuple[str, ...]] = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "blocks.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "blocks.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "blocks.{i}.attn.qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blocks.{i}.attn.qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blocks.{i}.attn.proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blocks.{i}.attn.proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blocks.{i}.mlp_norm.weight": "transformer.h.{i}.ln_2.weight",
    "blocks.{i}.mlp_norm.bias": "transformer.h.{i}.ln_2.bias",
    "blocks.{i}.mlp.up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blocks.{i}.mlp.down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blocks.{i}.mlp.down.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
GPT2_CONV1D = {"attn.qkv.weight", "attn.proj.weight", "mlp.up.weight", "mlp.down.weight"}


def _qkv(suffix: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{{i}}.self_attn.{p}_proj.{suffix}" for p in "qkv")


def _gate_up(suffix: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{{i}}.mlp.{p}_proj.{suffix}" for p in ("gate", "up"))


# LLaMA, Qwen2 and Mistral share names; which biases exist follows the config.
LLAMA_MAP: dict[str, str | tuple[str, ...]] = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.qkv.weight": _qkv("weight"),
    "blocks.{i}.attn.qkv.bias": _qkv("bias"),
    "blocks.{i}.attn.proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.attn.proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.up.weight": _gate_up("weight"),
    "blocks.{i}.mlp.up.bias": _gate_up("bias"),
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blocks.{i}.mlp.down.bias": "model.layers.{i}.mlp.down_proj.bias",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
MAPS = {"gpt2": GPT2_MAP, "llama": LLAMA_MAP, "qwen2": LLAMA_MAP, "mistral": LLAMA_MAP}
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model."}
# Non-weight buffers some checkpoints carry (GPT-2's causal mask, old rotary tables).
_IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_LLAMA_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def _unsupported(name: str) -> LmforgeError:
    return LmforgeError(f"unsupported Hugging Face architecture '{name}' (supported: {', '.join(ARCHITECTURES)})")


def hf_family(hf_config: Mapping[str, Any], architecture: Optional[str] = None) -> str:
    """'gpt2' | 'llama' | 'qwen2' | 'mistral' from an HF config dict (its `architectures`, else `model_type`)."""
    architecture = architecture or (hf_config.get("architectures") or [None])[0]
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise _unsupported(architecture)
        return ARCHITECTURES[architecture]
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise _unsupported(str(model_type))
    return model_type


def _as_dict(hf_config: Any) -> dict[str, Any]:
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def config_from_hf(hf_config: Any, architecture: Optional[str] = None) -> ModelConfig:
    """A ModelConfig equal to an HF config (a transformers config object or the dict of its config.json)."""
    d = _as_dict(hf_config)
    family = hf_family(d, architecture)

    def reject(field: str, value: Any, supported: str) -> LmforgeError:
        return LmforgeError(f"{FAMILIES[family]} with {field}={value!r} is not supported (supported: {supported})")

    if family == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in _GPT2_ACT:
            raise reject("activation_function", act, ", ".join(_GPT2_ACT))
        for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                         ("scale_attn_weights", True)):
            if d.get(flag, ok) != ok:
                raise reject(flag, d[flag], repr(ok))
        return ModelConfig(
            vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"], n_head=d["n_head"],
            d_model=d["n_embd"], d_ff=d.get("n_inner") or 4 * d["n_embd"], norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5), positions="learned", mlp=_GPT2_ACT[act], bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True), dropout=d.get("resid_pdrop", 0.0),
            init_std=d.get("initializer_range", 0.02))

    act = d.get("hidden_act", "silu")
    if act not in _LLAMA_ACT:
        raise reject("hidden_act", act, ", ".join(_LLAMA_ACT))
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise reject("rope_type", rope_type, "'default'")
    if family == "llama" and d.get("attention_bias", False) != d.get("mlp_bias", False):
        raise reject("attention_bias/mlp_bias", (d.get("attention_bias"), d.get("mlp_bias")), "equal values")
    block_size = d["max_position_embeddings"]
    if d.get("sliding_window") and (family == "mistral" or d.get("use_sliding_window")):
        block_size = min(block_size, d["sliding_window"])
    bias = family == "llama" and bool(d.get("attention_bias", False))
    return ModelConfig(
        vocab_size=d["vocab_size"], block_size=block_size, n_layer=d["num_hidden_layers"],
        n_head=d["num_attention_heads"], n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"],
        d_model=d["hidden_size"], d_ff=d["intermediate_size"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"], norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6), positions="rope",
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))), mlp=_LLAMA_ACT[act], bias=bias,
        qkv_bias=bias or family == "qwen2", tie_embeddings=d.get("tie_word_embeddings", False),
        dropout=d.get("attention_dropout", 0.0), init_std=d.get("initializer_range", 0.02))


def infer_family(cfg: ModelConfig) -> str:
    """The HF family a config exports to by default: gpt2 (learned positions), qwen2 (q/k/v-only bias), llama."""
    if cfg.positions == "learned":
        return "gpt2"
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def _check_exportable(cfg: ModelConfig, family: str) -> None:
    rope = family != "gpt2"
    required: dict[str, Any] = {
        "positions": "rope" if rope else "learned",
        "norm": "rmsnorm" if rope else "layernorm",
        "norm_placement": "pre",
        "bias": {"gpt2": True, "llama": cfg.bias, "qwen2": False, "mistral": False}[family],
        "qkv_bias": {"gpt2": True, "llama": cfg.bias, "qwen2": True, "mistral": False}[family],
    }
    problems = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in required.items() if getattr(cfg, k) != v]
    allowed_mlp = ("swiglu", "geglu") if rope else ("gelu_tanh", "gelu", "relu")
    if cfg.mlp not in allowed_mlp:
        problems.append(f"model.mlp={cfg.mlp!r} (needs one of {', '.join(allowed_mlp)})")
    if not rope and (cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model):
        problems.append("grouped heads or head_dim != d_model / n_head (GPT-2 needs plain multi-head attention)")
    if problems:
        raise LmforgeError(f"cannot export to {FAMILIES[family]}: " + "; ".join(problems))


def config_to_hf(cfg: ModelConfig, family: str, **overrides: Any) -> Any:
    """A transformers config for `family` equal to cfg (LmforgeError if cfg cannot be expressed there).

    overrides are extra HF config fields, e.g. bos_token_id / eos_token_id from the tokenizer.
    """
    import transformers

    if family not in FAMILIES:
        raise _unsupported(family)
    _check_exportable(cfg, family)
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  architectures=[FAMILIES[family]], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.mlp]
        fields = dict(n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_inner=cfg.d_ff, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
        return transformers.GPT2Config(**{**common, **fields, **overrides})
    fields = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  hidden_act="silu" if cfg.mlp == "swiglu" else "gelu", max_position_embeddings=cfg.block_size,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout)
    if family == "llama":
        fields.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if family == "mistral":
        fields.update(sliding_window=None)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[family]
    return config_class(**{**common, **fields, **overrides})


def _template(name: str) -> tuple[str, Optional[str]]:
    """'blocks.3.attn.qkv.weight' -> ('blocks.{i}.attn.qkv.weight', '3')."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match is None:
        return name, None
    return "blocks.{i}." + name[match.end():], match.group(1)


def _hf_names(name: str, family: str) -> tuple[str, ...]:
    template, layer = _template(name)
    hf = MAPS[family][template]
    return tuple(n.format(i=layer) for n in ((hf,) if isinstance(hf, str) else hf))


def _fused_sizes(name: str, cfg: ModelConfig) -> list[int]:
    if ".attn.qkv." in name:
        kv = cfg.n_kv_head * cfg.head_dim
        return [cfg.n_head * cfg.head_dim, kv, kv]
    return [cfg.d_ff, cfg.d_ff]  # fused gate/up


def _is_conv1d(name: str, family: str) -> bool:
    return family == "gpt2" and name.startswith("blocks.") and name.split(".", 2)[-1] in GPT2_CONV1D


def to_hf_state_dict(model: Transformer, family: Optional[str] = None) -> dict[str, Tensor]:
    """The model's weights under HF names of `family` (default infer_family); tied lm_head omitted like HF."""
    cfg = model.config
    family = family or infer_family(cfg)
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        hf_names = _hf_names(name, family)
        tensor = tensor.detach()
        if _is_conv1d(name, family):
            tensor = tensor.t()  # (out, in) -> Conv1D's (in, out)
        parts = tensor.split(_fused_sizes(name, cfg), dim=0) if len(hf_names) > 1 else (tensor,)
        out.update((hf_name, part.contiguous()) for hf_name, part in zip(hf_names, parts))
    return out


def from_hf_state_dict(state: Mapping[str, Tensor], model: Transformer, family: str) -> dict[str, Tensor]:
    """HF-named tensors -> the lmforge state dict `model` expects; LmforgeError on missing or unknown tensors."""
    prefix = BASE_PREFIX[family]
    if not any(k.startswith(prefix) for k in state):  # hub GPT-2 files store the base model without its prefix
        state = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in state.items()}
    tied = model.config.tie_embeddings
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name in model.state_dict():
        if name == "lm_head.weight" and tied:
            continue
        hf_names = _hf_names(name, family)
        missing = [n for n in hf_names if n not in state]
        if missing:
            raise LmforgeError(f"HF checkpoint is missing tensor '{missing[0]}' (needed for lmforge '{name}')")
        used.update(hf_names)
        tensor = torch.cat([state[n] for n in hf_names], dim=0)  # fused: [q; k; v] or [gate; up]
        out[name] = tensor.t() if _is_conv1d(name, family) else tensor
    unknown = sorted(k for k in state if k not in used and not _IGNORED.match(k)
                     and not (tied and k == "lm_head.weight"))
    if unknown:
        raise LmforgeError(f"HF checkpoint has tensors the {FAMILIES[family]} config does not explain: "
                           f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    return out


def from_hf_model(hf_model: Any) -> Transformer:
    """An lmforge Transformer (float32, CPU) with the weights of an in-memory transformers model."""
    architecture = type(hf_model).__name__
    cfg = config_from_hf(hf_model.config, architecture)
    model = Transformer(cfg)
    state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
    model.load_weights(from_hf_state_dict(state, model, ARCHITECTURES[architecture]), source=architecture)
    return model


def is_hf_dir(path: str | Path) -> bool:
    """True if `path` holds an HF model config.json (and not an lmforge one)."""
    d = read_config_json(path)
    return d is not None and "model_type" in d and not d.get("lmforge_model")


def _read_hf_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").is_file():
        return load_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_safetensors(path / shard))
        return state
    raise LmforgeError(f"{path}: no model.safetensors or model.safetensors.index.json "
                       "(only safetensors checkpoints are supported)")


def from_hf_dir(path: str | Path) -> Transformer:
    """Load an HF checkpoint dir (config.json + safetensors, possibly sharded) as a float32 CPU Transformer."""
    path = Path(path)
    d = read_config_json(path)
    if d is None or "model_type" not in d or d.get("lmforge_model"):
        raise LmforgeError(f"{path} is not a Hugging Face model dir (expected config.json with a model_type)")
    model = Transformer(config_from_hf(d))
    state = from_hf_state_dict(_read_hf_weights(path), model, hf_family(d))
    model.load_weights(state, source=str(path))
    return model


def to_hf_dir(model: Transformer, path: str | Path, family: Optional[str] = None, **config_overrides: Any) -> Path:
    """Write config.json + model.safetensors loadable by transformers' AutoModelForCausalLM; returns the dir.

    family defaults to infer_family(model.config); config_overrides are extra HF config fields (token ids...).
    Tokenizer files are not written here.
    """
    path = Path(path)
    family = family or infer_family(model.config)
    hf_config = config_to_hf(model.config, family, **config_overrides)
    state = to_hf_state_dict(model, family)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path / "model.safetensors")
    atomic_write_text(path / "config.json", hf_config.to_json_string(use_diff=False))
    return path
