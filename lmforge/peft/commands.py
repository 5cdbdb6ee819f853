"""`lmforge peft merge` and `lmforge peft import`: an adapter dir folded into a plain model dir, and a PEFT adapter
made by `peft` turned into an lmforge adapter dir."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.peft.config import PeftImportConfig, PeftMergeConfig


def peft_merge(cfg: PeftMergeConfig) -> Path:
    """Write a plain lmforge model dir whose weights are the adapter's base with its LoRA update folded in."""
    from lmforge.io import atomic_path, check_replaceable_dir
    from lmforge.peft.files import load_adapter, merge, read_adapter_config
    from lmforge.tokenizer import copy_tokenizer_files
    from lmforge.convert import copy_training_record

    if not cfg.adapter or not cfg.out_dir:
        raise ConfigError("peft merge needs an adapter dir and an output dir: lmforge peft merge ADAPTER OUT_DIR")
    recorded_base = read_adapter_config(cfg.adapter).get("base_model") or ""
    check_replaceable_dir(cfg.out_dir, "config.json", "model dir", inputs=(cfg.adapter, cfg.base, recorded_base))
    model = merge(load_adapter(cfg.adapter, cfg.base or None))
    with atomic_path(cfg.out_dir) as tmp:
        tmp.mkdir()
        model.save(tmp)
        copy_tokenizer_files(cfg.adapter, tmp)
        copy_training_record(Path(cfg.adapter), tmp)
    print(f"peft merge: {cfg.adapter} -> {cfg.out_dir} ({model.num_parameters():,} parameters)")
    return Path(cfg.out_dir)


def peft_import(cfg: PeftImportConfig) -> Path:
    """Make an lmforge adapter dir of a PEFT adapter dir on its base model dir."""
    from lmforge.peft.peft_format import import_peft

    if not cfg.adapter or not cfg.base or not cfg.out_dir:
        raise ConfigError("peft import needs the PEFT adapter dir, --base BASE_MODEL_DIR and --out_dir DIR")
    out = import_peft(cfg.adapter, cfg.base, cfg.out_dir)
    print(f"peft import: {cfg.adapter} on {cfg.base} -> {out}")
    return out
