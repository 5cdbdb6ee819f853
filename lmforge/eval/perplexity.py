"""Perplexity and bits per byte of a text file or of a dataset dir's val split.

The token stream is what pretraining saw: each document's ids followed by eos (lmforge.data.prepare). A text file
is read with lmforge.data.sources.read_text (one document, or one per paragraph) and its stream starts with an
eos, so that every document token and every eos is scored; a dataset dir's val shards are used as they are (the
first token has no context and is not scored). Windows of block_size tokens slide by `stride`
(lmforge.eval.loglik.stream_windows), so every scored token has at least block_size - stride tokens of context.

    nats/token = NLL / scored tokens,   perplexity = exp(nats/token),
    bits/byte  = nats/token * tokens / bytes / ln 2

with tokens and bytes counted over the same documents (for a dataset dir: meta.json's val split), as
lmforge.train.pretrain.bits_per_byte does for validation during training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError, TokenizerMismatchError


def text_stream(path: str | Path, tokenizer: Any, paragraphs: bool = False,
                max_tokens: int = 0) -> tuple[list[int], int, int]:
    """(stream, tokens, bytes) of a text file: [eos] + ids + [eos] per document, cut to max_tokens + 1 tokens
    when max_tokens is set; tokens and bytes count the documents it reaches (their ratio gives bits/byte)."""
    from lmforge.data.sources import read_text

    stream, n_bytes = [tokenizer.eos_id], 0
    for document in read_text(Path(path), paragraphs=paragraphs):
        if max_tokens and len(stream) > max_tokens:
            break
        stream += tokenizer.encode(document.text) + [tokenizer.eos_id]
        n_bytes += len(document.text.encode("utf-8"))
    tokens = len(stream) - 1
    return (stream[:max_tokens + 1] if max_tokens else stream), tokens, n_bytes


def dataset_stream(dataset_dir: str | Path, tokenizer: Any, max_tokens: int = 0) -> tuple[list[int], int, int]:
    """(stream, tokens, bytes) of a dataset dir's val split: the first max_tokens tokens (0 = all), and the
    split's token and byte counts from meta.json. The dataset must have been tokenized by `tokenizer`."""
    from lmforge.data.shards import TokenShards, read_meta

    meta = read_meta(dataset_dir)
    if meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise TokenizerMismatchError(f"dataset dir {dataset_dir} was tokenized with another tokenizer than the "
                                     "model's (tokenizer fingerprints differ)")
    split = meta["splits"].get("val")
    if split is None or not split.get("tokens"):
        raise DataError(f"dataset dir {dataset_dir}: no val split tokens to measure perplexity on")
    shards = TokenShards(dataset_dir, "val")
    n = min(len(shards), max_tokens) if max_tokens else len(shards)
    return shards.read(0, n).tolist(), int(split["tokens"]), int(split["bytes"])


def perplexity(model: Any, tokenizer: Any, text: str | Path, paragraphs: bool = False, stride: int = 0,
               max_tokens: int = 0, batch_size: int = 16) -> dict[str, float | int | str]:
    """nats/token, perplexity and bits/byte of `text` (a text file or a dataset dir); see the module docstring."""
    from lmforge.eval.loglik import stream_nll

    path = Path(text)
    if not path.exists():
        raise DataError(f"text {path}: not found (expected a text file or a dataset dir)")
    if path.is_dir():
        stream, tokens, n_bytes = dataset_stream(path, tokenizer, max_tokens)
        if max(stream, default=0) >= model.config.vocab_size:
            raise DataError(f"dataset dir {path}: token ids exceed the model's vocab_size "
                            f"{model.config.vocab_size}; was it prepared with another tokenizer?")
    else:
        stream, tokens, n_bytes = text_stream(path, tokenizer, paragraphs, max_tokens)
    block_size = model.config.block_size
    stride = stride or max(block_size // 2, 1)
    if stride > block_size:
        raise ConfigError(f"stride {stride} exceeds the model's block_size {block_size}")
    nll, scored = stream_nll(model, stream, stride, batch_size)
    if scored == 0:
        raise DataError(f"text {path}: fewer than 2 tokens, nothing to score")
    nats = nll / scored
    return {"text": str(path), "scored_tokens": scored, "nats_per_token": nats, "perplexity": math.exp(nats),
            "bits_per_byte": nats * tokens / n_bytes / math.log(2) if n_bytes else float("nan"),
            "block_size": block_size, "stride": stride}
