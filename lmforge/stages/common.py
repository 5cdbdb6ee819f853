"""What every training stage after pretraining does the same way: load the starting model dir with its tokenizer,
settle the sequence length, check the batch splits over the processes, and name the tokenizer the run's model
dirs get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError, TokenizerMismatchError
from lmforge.tokenizer import Tokenizer, model_dir_tokenizer


def base_model(model_dir: str, command: str = "sft", chat: bool = True) -> tuple[Any, Tokenizer]:
    """The base model and its tokenizer, which must fit the model (and with `chat`, have a chat template)."""
    from lmforge.convert import load

    if not model_dir:
        raise ConfigError(f"{command} needs a base model dir: lmforge {command} MODEL_DIR --data.train FILE.jsonl")
    model = load(model_dir)
    tokenizer = model_dir_tokenizer(model_dir)
    if tokenizer is None:
        raise DataError(f"base model dir {model_dir}: no tokenizer files (tokenizer.json); copy the model's "
                        "tokenizer into it")
    if chat and tokenizer.chat_template is None:
        raise TokenizerMismatchError(f"base model dir {model_dir}: its tokenizer has no chat template and not "
                                     "lmforge's chat tokens; give it a chat_template in tokenizer_config.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerMismatchError(f"base model dir {model_dir}: tokenizer vocab_size {tokenizer.vocab_size} "
                                     f"exceeds the model's {model.config.vocab_size}")
    return model, tokenizer


def resolve_seq_len(requested: Any, model: Any) -> int:
    """data.seq_len, or the model's block_size when it is None; a ConfigError outside 2..block_size."""
    seq_len = requested or model.config.block_size
    if not 1 < seq_len <= model.config.block_size:
        raise ConfigError(f"data.seq_len={seq_len} must be in 2..{model.config.block_size} (the model's block_size)")
    return seq_len


def check_batch_split(batch_size: int, world_size: int) -> None:
    """A global batch must split evenly over the processes."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the number of processes {world_size}")


def tokenizer_source(model_dir: str, tokenizer: Tokenizer) -> Any:
    """What the run's model dirs get as their tokenizer: the base dir's lmforge tokenizer files, or for a Hugging
    Face base the tokenizer itself (saved with its chat template into lmforge_tokenizer.json)."""
    if (Path(model_dir) / "lmforge_tokenizer.json").is_file():
        return Path(model_dir)
    return tokenizer
