"""`lmforge convert` and `lmforge info`: model dirs in and out of the Hugging Face format, and out to GGUF."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text

def is_lmforge_dir(path: str | Path) -> bool:
    """True if `path` holds an lmforge model config.json (see lmforge.model.hf.is_hf_dir for the other kind)."""
    from lmforge.model.config import read_config_json

    return bool((read_config_json(path) or {}).get("lmforge_model"))


def load(path: str | Path):
    """Load a model from an lmforge model dir, a Hugging Face dir of a supported family, or an lmforge adapter dir
    (its base model with the adapter, unmerged) in eval mode, on the CPU."""
    from lmforge.model import Transformer
    from lmforge.model.hf import from_hf_dir

    from lmforge.io import dir_kind

    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"model dir {path}: not found")
    kind = dir_kind(path)
    if kind == "run dir":
        checkpoints = sorted((path / "checkpoints").glob("step_*"), key=lambda p: p.name)
        where = f"{path / 'final'}" if (path / "final").is_dir() else (
            f"a checkpoint such as {checkpoints[-1]}" if checkpoints else f"{path / 'final'} once it has finished")
        raise LmforgeError(f"{path} is a run dir, not a model dir: its trained model is {where}")
    if kind == "adapter dir":
        from lmforge.peft.files import ADAPTER_CONFIG, load_adapter  # a higher layer, on demand

        if not (path / ADAPTER_CONFIG).is_file():
            raise LmforgeError(f"{path} is a PEFT adapter dir made outside lmforge: make it an lmforge adapter dir "
                               f"first: lmforge peft import {path} --base BASE_MODEL_DIR --out_dir DIR")
        return load_adapter(path)
    if kind in ("dataset dir", "tokenizer dir", "quickstart dir"):
        hint = f"; the quickstart's model is {path / 'run' / 'final'}" if kind == "quickstart dir" else ""
        raise LmforgeError(f"{path} is a {kind}, not a model dir{hint}")
    if not (path / "config.json").is_file():
        raise LmforgeError(f"model dir {path}: no config.json (expected an lmforge or Hugging Face model dir)")
    model = Transformer.from_dir(path) if is_lmforge_dir(path) else from_hf_dir(path)
    return model.eval()


def load_with_tokenizer(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """A model dir's model (eval mode, on `device`: a name as the configs take it) and its tokenizer, checked to
    fit the model: what generate, chat and eval read. A dir without tokenizer files, or with a tokenizer that makes
    ids the model has no embedding for, is a one-line LmforgeError."""
    from lmforge.device import resolve_device
    from lmforge.errors import TokenizerMismatchError
    from lmforge.tokenizer import LMFORGE_FILE, TOKENIZER_FILE, Tokenizer

    model = load(path).to(resolve_device(device))
    path = Path(path)
    if (path / LMFORGE_FILE).is_file():
        tokenizer = Tokenizer.load(path)
    elif (path / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.from_hf(path)
    else:
        raise LmforgeError(f"model dir {path}: no tokenizer files (tokenizer.json); copy the model's tokenizer "
                           "into it")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerMismatchError(f"{path}: tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                                     f"vocab_size {model.config.vocab_size}; use the tokenizer the model was "
                                     "trained with")
    return model, tokenizer


def _write_hf_tokenizer_config(dst: Path, tokenizer: Any) -> None:
    """A tokenizer_config.json so that `transformers.AutoTokenizer.from_pretrained(dst)` works on an export."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    config.update({f"{role}_token": tokenizer.special_tokens[role] for role in ("bos", "eos", "pad")})
    if tokenizer.chat_template is not None:  # apply_chat_template then gives the ids lmforge uses
        config["chat_template"] = tokenizer.chat_template
    atomic_write_text(dst / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def _source_tokenizer(src: Path):
    """The tokenizer in model dir `src`: an lmforge tokenizer dir, else a plain HF tokenizer.json whose special
    tokens can be resolved (`Tokenizer.from_hf`), else None."""
    from lmforge.errors import DataError
    from lmforge.tokenizer import LMFORGE_FILE, TOKENIZER_FILE, Tokenizer

    if (src / LMFORGE_FILE).is_file():
        return Tokenizer.load(src)
    if not (src / TOKENIZER_FILE).is_file():
        return None
    try:
        return Tokenizer.from_hf(src)
    except DataError as exc:  # e.g. no recognizable eos token: convert the weights, keep the files as they are
        print(f"convert: note: {exc}; special token ids not recorded")
        return None


def copy_training_record(src: Path, dst: Path) -> None:
    """training.json (which stage made the model, whether it chats) travels with the weights."""
    import shutil

    if (src / "training.json").is_file():
        shutil.copy2(src / "training.json", dst / "training.json")


@dataclass
class ConvertConfig:
    src: str = ""  # an lmforge model dir or a Hugging Face model dir
    dst: str = ""  # the output dir, or the output .gguf file (written atomically)
    to: Literal["auto", "hf", "lmforge", "gguf"] = "auto"  # auto: gguf for DST *.gguf, else the other format
    family: Optional[str] = None  # HF family on export: gpt2 | llama | qwen2 | mistral (default: inferred)
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f32"  # --to gguf: type of the weight matrices (norms f32)


def convert(cfg: ConvertConfig) -> Path:
    """Convert `cfg.src` to the other format in `cfg.dst`; the tokenizer files travel with the weights."""
    from lmforge.io import atomic_path, check_replaceable_dir
    from lmforge.model.hf import to_hf_dir
    from lmforge.tokenizer import copy_tokenizer_files

    if not cfg.src or not cfg.dst:
        raise LmforgeError("convert needs a source and a destination: lmforge convert SRC DST [--to hf|lmforge|gguf]")
    src, dst = Path(cfg.src), Path(cfg.dst)
    if src.resolve() == dst.resolve():
        raise LmforgeError(f"convert: destination {dst} is the source; choose another dir")
    to = cfg.to if cfg.to != "auto" else ("hf" if is_lmforge_dir(src) else "lmforge")
    if cfg.to == "auto" and dst.suffix == ".gguf":
        to = "gguf"
    if to == "gguf":
        return _convert_to_gguf(src, dst, cfg.gguf_type)
    if cfg.gguf_type != "f32":
        raise LmforgeError(f"convert: --gguf_type {cfg.gguf_type} applies to --to gguf only (this is --to {to})")
    check_replaceable_dir(dst, "config.json", "model dir", inputs=(str(src),))
    model = load(src)
    tokenizer = _source_tokenizer(src)
    if not any((src / name).is_file() for name in ("tokenizer.json", "lmforge_tokenizer.json")):
        print(f"convert: warning: {src} has no tokenizer files (tokenizer.json): {dst} holds the weights only, and "
              "generate, chat and eval need a tokenizer; copy the model's tokenizer.json (and tokenizer_config.json) "
              "into it")
    with atomic_path(dst) as tmp:
        if to == "hf":
            # the special token ids go into config.json, so that HF generate() stops at eos
            ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_id") for role in ("bos", "eos", "pad")} \
                if tokenizer is not None else {}
            to_hf_dir(model, tmp, family=cfg.family, **ids)
            copy_tokenizer_files(src, tmp)
            copy_training_record(src, tmp)
            if tokenizer is not None and (src / "lmforge_tokenizer.json").is_file():
                _write_hf_tokenizer_config(tmp, tokenizer)
        else:
            model.save(tmp)
            copy_tokenizer_files(src, tmp)
            copy_training_record(src, tmp)
            if tokenizer is not None and not (src / "lmforge_tokenizer.json").is_file():
                tokenizer.save(tmp)  # lmforge_tokenizer.json records the special tokens resolved from the HF files
    print(f"converted {src} -> {dst} ({to} format, {model.num_parameters():,} parameters)")
    return dst


def _convert_to_gguf(src: Path, dst: Path, gguf_type: str) -> Path:
    """`lmforge convert MODEL_DIR out.gguf --to gguf`: lmforge.model.gguf.export_gguf, one file for llama.cpp."""
    from lmforge.model.gguf import export_gguf

    if is_lmforge_dir(src):
        export_gguf(src, dst, gguf_type)
    else:  # a Hugging Face dir (or an adapter dir, which export_gguf refuses), loaded here
        export_gguf(load(src), dst, gguf_type, tokenizer=_source_tokenizer(src), name=src.resolve().name)
    print(f"converted {src} -> {dst} (GGUF, {gguf_type} weights, {dst.stat().st_size / 2**20:.1f} MiB)")
    return dst


@dataclass
class InfoConfig:
    model: str = ""  # a model dir (lmforge or Hugging Face)
    seq_len: int = 0  # sequence length for the FLOPs count (0 = the model's block_size)


def model_info(cfg: InfoConfig) -> dict[str, Any]:
    """Print and return the config, parameter counts and training FLOPs per token of a model dir."""
    if not cfg.model:
        raise LmforgeError("info needs a model dir: lmforge info MODEL_DIR")
    model = load(cfg.model)
    seq_len = cfg.seq_len or model.config.block_size
    info = {
        "config": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "flops_per_token": model.flops_per_token(seq_len),
        "seq_len": seq_len,
    }
    for key, value in info["config"].items():
        print(f"{key:>16}: {value}")
    print(f"{'parameters':>16}: {info['parameters']:,} ({info['non_embedding_parameters']:,} non-embedding)")
    print(f"{'FLOPs/token':>16}: {info['flops_per_token']:.4g} (training, fwd+bwd, at seq_len {seq_len})")
    return info
