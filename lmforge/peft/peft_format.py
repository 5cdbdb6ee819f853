"""Hugging Face PEFT's adapter format, both ways: `export_peft` writes adapter_config.json + adapter_model.safetensors
for the Hugging Face export of the base (`lmforge convert BASE HF --to hf`), so that
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF), ADAPTER_DIR)` computes lmforge's logits;
`import_peft` reads an adapter that `peft` itself saved and makes an lmforge adapter dir of it.

LoRA keys are `base_model.model.{module}.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), the module named as
in the base's transformers class (model.hf's mapping tables). A PEFT module that is one lmforge target (LLaMA's
q_proj, v_proj, ...) keeps its A, B, r and alpha. Where one PEFT module holds several lmforge targets (GPT-2's fused
c_attn with only q and v adapted), the module's update is the block matrix that adds each target's update to its
rows: A = [A_q; A_v], B = [[s_q B_q, 0], [0, 0], [0, s_v B_v]], with the scale folded into B and the module's
alpha set in alpha_pattern so that PEFT's scale is 1 (exactly the same product). GPT-2's Conv1D modules are marked
fan_in_fan_out. Prefix and prompt tuning save `prompt_embeddings`: (P, n_layer * 2 * n_kv_head * head_dim) and
(P, d_model).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, load_safetensors, save_safetensors
from lmforge.model.hf import MAPS, _fused_sizes, infer_family
from lmforge.peft.lora import LoRALinear

PATHS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
PREFIX = "base_model.model."


def hf_modules(model: Any, family: str) -> dict[tuple[int, str], list[tuple[str, int, int]]]:
    """(block index, lmforge projection path) -> [(PEFT module name, first row, end row)] for `family`."""
    cfg = model.config
    table = {}
    for i in range(cfg.n_layer):
        for path in PATHS:
            names = MAPS[family][f"blocks.{{i}}.{path}.weight"]
            names = (names,) if isinstance(names, str) else names
            sizes = _fused_sizes(f".{path}.", cfg) if len(names) > 1 else [None]
            rows, start = [], 0
            for name, size in zip(names, sizes):
                end = start + size if size is not None else None
                rows.append((name.format(i=i).removesuffix(".weight"), start, end))
                start = end if end is not None else 0
            table[(i, path)] = rows
    return table


def _alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives PEFT's scale `scale` at `rank`."""
    return scale * (math.sqrt(rank) if rslora else rank)


def export_lora(model: Any, family: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, adapter_config) of a LoRA PeftModel in PEFT's format; see the module docstring."""
    cfg, base = model.peft, model.base
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    short_names: set[str] = set()
    for (i, path), modules in hf_modules(base, family).items():
        block = base.blocks[i]
        lora = block.get_submodule(path)
        if not isinstance(lora, LoRALinear):
            continue
        for name, start, end in modules:
            end = lora.out_features if end is None else end
            pieces = [(target, max(start, s), min(end, e)) for target, (s, e) in lora.rows.items()
                      if max(start, s) < min(end, e)]
            if not pieces:
                continue
            short = name.rsplit(".", 1)[-1]
            short_names.add(short)
            if len(pieces) == 1 and pieces[0][1:] == (start, end) and lora.rows[pieces[0][0]] == (start, end):
                target = pieces[0][0]
                a, b = lora.lora_A[target].detach(), lora.lora_B[target].detach()
                rank, alpha = a.shape[0], _alpha_for(lora.scale[target], a.shape[0], cfg.rslora)
            else:  # several lmforge targets in one PEFT module: a block update with the scales folded in
                a = torch.cat([lora.lora_A[t].detach() for t, _, _ in pieces])
                b = torch.zeros(end - start, a.shape[0])
                column = 0
                for target, lo, hi in pieces:
                    r = lora.lora_A[target].shape[0]
                    s = lora.rows[target][0]
                    b[lo - start:hi - start, column:column + r] = lora.scale[target] * \
                        lora.lora_B[target].detach()[lo - s:hi - s]
                    column += r
                rank, alpha = a.shape[0], _alpha_for(1.0, a.shape[0], cfg.rslora)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous().float()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous().float()
            if rank != cfg.r:
                rank_pattern[short] = rank
            if abs(alpha - cfg.alpha) > 1e-9 * max(1.0, cfg.alpha):
                alpha_pattern[short] = alpha
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(short_names), "fan_in_fan_out": family == "gpt2",
              "use_rslora": cfg.rslora, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    return tensors, config


def export_peft(model: Any, directory: Path) -> bool:
    """Write PEFT's files for `model` into `directory` when PEFT has its method; False when it has not."""
    method, cfg = model.peft.method, model.base.config
    family = infer_family(cfg)
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": model.virtual, "num_transformer_submodules": 1,
              "num_layers": cfg.n_layer, "inference_mode": True, "base_model_name_or_path": None}
    if method in ("lora", "qlora"):
        tensors, config = export_lora(model, family)
    elif method == "prefix":
        tensors = {"prompt_embeddings": model.prefix.table().detach().float().contiguous()}
        config = {**common, "peft_type": "PREFIX_TUNING", "token_dim": cfg.n_kv_head * cfg.head_dim,
                  "num_attention_heads": cfg.n_kv_head, "encoder_hidden_size": cfg.n_kv_head * cfg.head_dim,
                  "prefix_projection": False}
    elif method == "prompt":
        tensors = {"prompt_embeddings": model.prompt.embedding.detach().float().contiguous()}
        config = {**common, "peft_type": "PROMPT_TUNING", "token_dim": cfg.d_model, "num_attention_heads": cfg.n_head,
                  "prompt_tuning_init": "RANDOM"}
    else:
        return False
    config["base_model_name_or_path"] = getattr(model, "base_dir", None)
    save_safetensors(tensors, directory / "adapter_model.safetensors")
    atomic_write_json(directory / "adapter_config.json", config)
    return True


def _pattern(patterns: dict[str, Any], module: str) -> Optional[Any]:
    """PEFT's per-module override: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return None


def read_peft(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{directory}: no adapter_config.json (expected a PEFT adapter dir)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{config_path}: invalid JSON ({exc.msg})") from None
    return config, load_safetensors(directory / "adapter_model.safetensors")


def peft_config_of(config: dict[str, Any], tensors: dict[str, Tensor], base: Any) -> tuple[Any, dict[str, Tensor]]:
    """(lmforge PeftConfig, lmforge-named trainable tensors) of a PEFT adapter for `base`."""
    from lmforge.peft.config import PeftConfig

    kind = config.get("peft_type")
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        table = tensors.get("prompt_embeddings")
        if table is None:
            raise LmforgeError("PEFT adapter: no prompt_embeddings tensor")
        method = "prefix" if kind == "PREFIX_TUNING" else "prompt"
        cfg = PeftConfig(method=method, virtual_tokens=int(table.shape[0]))
        return cfg, {("prefix.embedding" if method == "prefix" else "prompt.embedding"): table.float()}
    if kind != "LORA":
        raise LmforgeError(f"PEFT adapter of type {kind!r}: lmforge reads LORA, PREFIX_TUNING and PROMPT_TUNING")
    family = infer_family(base.config)
    by_module = {name: (i, path, start, end) for (i, path), modules in hf_modules(base, family).items()
                 for name, start, end in modules}
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rslora = bool(config.get("use_rslora"))
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else None
        if module not in by_module:
            raise LmforgeError(f"PEFT adapter: tensor {key} names no projection of this {family} base model")
        i, path, start, end = by_module[module]
        target = _target_of(base.blocks[i], path, start, end)
        a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        rank = int(a.shape[0])
        alpha = _pattern(config.get("alpha_pattern") or {}, module) or config.get("lora_alpha", 8)
        if ranks.setdefault(target, rank) != rank or alphas.setdefault(target, float(alpha)) != float(alpha):
            raise LmforgeError(f"PEFT adapter: target {target} has different ranks or alphas across layers")
        out[f"base.blocks.{i}.{path}.lora_A.{target}"] = a
        out[f"base.blocks.{i}.{path}.lora_B.{target}"] = b
    if not ranks:
        raise LmforgeError("PEFT adapter: no lora_A tensors")
    r = max(ranks.values(), key=list(ranks.values()).count)
    alpha = float(config.get("lora_alpha", 8))
    cfg = PeftConfig(method="lora", targets=list(ranks), r=r, alpha=alpha, rslora=rslora,
                     rank_pattern={t: k for t, k in ranks.items() if k != r},
                     alpha_pattern={t: v for t, v in alphas.items() if v != alpha})
    return cfg, out


def _target_of(block: Any, path: str, start: int, end: Optional[int]) -> str:
    """The lmforge LoRA target whose rows are [start, end) of projection `path` of `block`."""
    from lmforge.peft.lora import TARGETS, target_rows

    for target in TARGETS:
        try:
            t_path, s, e = target_rows(block, target)
        except LmforgeError:
            continue
        if t_path == path and s == start and (end is None or e == end) and (end is not None or s == 0):
            if end is None and target in ("q", "k", "v"):
                continue  # a whole fused projection is qkv, not one of its parts
            return target
    raise LmforgeError(f"PEFT adapter: rows {start}..{end} of {path} are no lmforge LoRA target")


def import_peft(peft_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an lmforge adapter dir at `out_dir` for a PEFT adapter dir made by `peft` on `base_dir` (an lmforge or
    Hugging Face model dir); its tokenizer files come from the base."""
    from lmforge.convert import load
    from lmforge.io import atomic_path, check_replaceable_dir
    from lmforge.peft.files import wrap_base
    from lmforge.tokenizer import copy_tokenizer_files, model_dir_tokenizer

    check_replaceable_dir(out_dir, "lmforge_adapter.json", "adapter dir", inputs=(str(peft_dir), str(base_dir)))
    config, tensors = read_peft(peft_dir)
    base = load(base_dir)
    cfg, state = peft_config_of(config, tensors, base)
    model = wrap_base(base, cfg, str(base_dir))
    model.load_weights(state, source=f"PEFT adapter {peft_dir}")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save(tmp)
        copy_tokenizer_files(base_dir, tmp)
        if not (Path(base_dir) / "lmforge_tokenizer.json").is_file():
            tokenizer = model_dir_tokenizer(base_dir)
            if tokenizer is not None:
                tokenizer.save(tmp)
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # PEFT's own files, as they were
            shutil.copy2(Path(peft_dir) / name, tmp / name)
    return Path(out_dir)
