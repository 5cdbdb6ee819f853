"""GGUF export: an lmforge LLaMA-style model as one llama.cpp file (f32, f16, q8_0 or q4_0), written with PyPI `gguf`.

The file is what llama.cpp's own convert_hf_to_gguf.py writes for a LlamaForCausalLM: architecture "llama", its
hyperparameters, the tokenizer, and these tensors (GGUF lists a numpy (rows, cols) array as ne = [cols, rows]):

  token_embd.weight (V, d)          <- tok_emb.weight
  blk.{i}.attn_norm.weight (d)      <- blocks.{i}.attn_norm.weight
  blk.{i}.attn_q.weight             <- rows [0, n_head hd) of blocks.{i}.attn.qkv.weight,        rotary-permuted
  blk.{i}.attn_k.weight             <- the next n_kv_head hd rows,                                rotary-permuted
  blk.{i}.attn_v.weight             <- the last n_kv_head hd rows
  blk.{i}.attn_output.weight        <- blocks.{i}.attn.proj.weight
  blk.{i}.ffn_norm.weight (d)       <- blocks.{i}.mlp_norm.weight
  blk.{i}.ffn_gate.weight           <- rows [0, d_ff) of blocks.{i}.mlp.up.weight
  blk.{i}.ffn_up.weight             <- rows [d_ff, 2 d_ff) of blocks.{i}.mlp.up.weight
  blk.{i}.ffn_down.weight           <- blocks.{i}.mlp.down.weight
  output_norm.weight (d)            <- norm.weight
  output.weight (V, d)              <- lm_head.weight (absent when tied: llama.cpp then reuses token_embd)

Rotary order: lmforge (like HF) rotates the pairs (j, j + hd/2) of each head; llama.cpp's LLaMA rope rotates
(2j, 2j + 1), at the same angle pos * theta^(-2j/hd). Permuting the rows of each q and k head so that

    new row 2j + s = old row s hd/2 + j        (s in {0, 1}, j < hd/2)

makes llama.cpp's rotation of the new q (k) the same permutation of lmforge's rotated q (k); q.k is unchanged by a
permutation applied to both, so attention is the same function. `rotary_permute` / `rotary_unpermute` do this.

Types: f32 and f16 store every matrix as such; q8_0 and q4_0 quantize every matrix with gguf's quantize (blocks of
32 along a row; a matrix whose rows are not a multiple of 32 falls back to f16, as convert_hf_to_gguf.py does).
Norm weights always stay f32.

Tokenizer: "gpt2" byte-level BPE (tokens in id order, types, merges, bos/eos/pad/eot ids, no automatic bos/eos),
pre-tokenizer "llama-bpe": llama.cpp has no pre-tokenizer with lmforge's regex (GPT-4's split with numbers in
runs of at most 2 digits); llama-bpe is the same regex with runs of up to 3 digits, so llama.cpp may tokenize text
with 3-or-more-digit numbers differently from lmforge (other text is split alike). Token ids fed directly are
unaffected. Ids the model has beyond the tokenizer's vocabulary are written as unused "[PAD{id}]" tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from lmforge.errors import ConfigError, LmforgeError
from lmforge.io import atomic_path
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import TOKENIZER_FILE, model_dir_tokenizer

FILE_TYPES = ("f32", "f16", "q8_0", "q4_0")
# llama.cpp's pre-tokenizer closest to lmforge.tokenizer.SPLIT_PATTERN (see the module docstring).
PRE_TOKENIZER = "llama-bpe"
QUANT_BLOCK = 32  # q8_0 and q4_0 quantize blocks of 32 consecutive values of a row


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def check_llama_style(cfg: ModelConfig, what: str = "model") -> None:
    """ConfigError naming every setting llama.cpp's "llama" architecture cannot express."""
    required = {"positions": "rope", "norm": "rmsnorm", "norm_placement": "pre", "mlp": "swiglu", "bias": False,
                "qkv_bias": False}
    problems = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in required.items() if getattr(cfg, k) != v]
    if problems:
        raise ConfigError(f"{what} cannot be exported to GGUF: llama.cpp's llama architecture does not support "
                          f"{', '.join(problems)}")


def rotary_permute(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of a q or k projection (n_heads hd, d) from lmforge's rotary order to llama.cpp's interleaved one."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # (n_heads, s, j, d) -> (n_heads, j, s, d): row s hd/2 + j of each head becomes row 2j + s
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_unpermute(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of `rotary_permute`: llama.cpp's interleaved rows back to lmforge's order."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under llama.cpp names, in llama.cpp's layout (float32, CPU), in file order."""
    cfg = model.config
    check_llama_style(cfg)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"token_embd.weight": state["tok_emb.weight"]}
    for i in range(cfg.n_layer):
        block = f"blocks.{i}."
        q, k, v = state[block + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = state[block + "mlp.up.weight"].split([cfg.d_ff, cfg.d_ff], dim=0)
        out.update({
            f"blk.{i}.attn_norm.weight": state[block + "attn_norm.weight"],
            f"blk.{i}.attn_q.weight": rotary_permute(q, cfg.n_head),
            f"blk.{i}.attn_k.weight": rotary_permute(k, cfg.n_kv_head),
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": state[block + "attn.proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[block + "mlp_norm.weight"],
            f"blk.{i}.ffn_gate.weight": gate,
            f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": state[block + "mlp.down.weight"],
        })
    out["output_norm.weight"] = state["norm.weight"]
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    return {name: t.contiguous() for name, t in out.items()}


def _encode_tensor(gguf: Any, tensor: Tensor, file_type: str) -> tuple[Any, Any]:
    """(numpy data, GGMLQuantizationType) of one tensor in the file type; vectors stay f32."""
    types = gguf.GGMLQuantizationType
    array = tensor.numpy()
    if array.ndim == 1 or file_type == "f32":
        return array, types.F32
    if file_type == "f16" or array.shape[-1] % QUANT_BLOCK:
        return array.astype("float16"), types.F16
    qtype = types.Q8_0 if file_type == "q8_0" else types.Q4_0
    return gguf.quants.quantize(array, qtype), qtype


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Token strings, token types and merges of an lmforge Tokenizer, padded to the model's vocab_size."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size {vocab_size}")
    with tempfile.TemporaryDirectory(prefix="lmforge-gguf-") as tmp:  # tokenizer.json as the Tokenizer saves it
        tokenizer.save(tmp)
        data = json.loads((Path(tmp) / TOKENIZER_FILE).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise ConfigError("GGUF export supports byte-level BPE tokenizers (lmforge's, GPT-2's), not this "
                          f"{model.get('type')} tokenizer")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # gguf.TokenType: NORMAL 1, CONTROL 3, USER_DEFINED 4, UNUSED 5
    for token, token_id in model["vocab"].items():
        tokens[token_id], types[token_id] = token, 1
    for added in data.get("added_tokens", []):
        tokens[added["id"]], types[added["id"]] = added["content"], 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _add_metadata(gguf: Any, writer: Any, cfg: ModelConfig, file_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    ftype = gguf.LlamaFileType
    writer.add_file_type({"f32": ftype.ALL_F32, "f16": ftype.MOSTLY_F16, "q8_0": ftype.MOSTLY_Q8_0,
                          "q4_0": ftype.MOSTLY_Q4_0}[file_type])
    if file_type in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    fields = _tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if "end" in tokenizer.special_ids:  # lmforge-chat-v1 ends an assistant turn with <|end|>
        writer.add_eot_token_id(tokenizer.special_ids["end"])
    writer.add_add_bos_token(False)  # lmforge never prepends bos on its own
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _load(path: Path, tokenizer: Optional[Any]) -> tuple[Transformer, Any]:
    """The Transformer of an lmforge model dir and `tokenizer`, else the dir's own. (A Hugging Face dir goes
    through `lmforge convert`, which loads it and hands the model here: this module stays in the model layer.)"""
    if (path / "lmforge_adapter.json").is_file():
        raise ConfigError(f"{path}: a model with adapters cannot be exported to GGUF; merge it first "
                          f"(lmforge peft merge {path} MERGED_DIR)")
    model = Transformer.from_dir(path)
    check_llama_style(model.config, str(path))
    tokenizer = tokenizer or model_dir_tokenizer(path)
    if tokenizer is None:
        raise ConfigError(f"{path}: no tokenizer files (tokenizer.json); GGUF carries the vocabulary, so the model "
                          "dir needs its tokenizer")
    return model, tokenizer


def _check_replaceable_file(path: Path) -> None:
    """Only a GGUF file is ever replaced: a dir or another kind of file at `path` is a ConfigError."""
    if path.is_dir():
        raise ConfigError(f"gguf output {path} is a directory; give a file path such as {path / 'model.gguf'}")
    if path.exists():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"gguf output {path} exists and is not a GGUF file; choose another path")


def export_gguf(model_dir_or_model: str | os.PathLike | Transformer, out_path: str | os.PathLike,
                file_type: str = "f32", tokenizer: Optional[Any] = None, name: str = "lmforge") -> Path:
    """Write `out_path` (atomically: a temp file renamed into place), a GGUF file llama.cpp loads as a "llama"
    model with the same next-token distribution (exactly up to float rounding for f32; see the module docstring).

    model_dir_or_model: an lmforge model dir (its tokenizer files are used), or a Transformer with `tokenizer`
    (an lmforge Tokenizer; `name` is the model name written). file_type: f32 | f16 | q8_0 | q4_0. Returns the path
    written. `lmforge convert SRC out.gguf --to gguf` also takes Hugging Face dirs.
    """
    if file_type not in FILE_TYPES:
        raise ConfigError(f"gguf file type {file_type!r}: expected one of {', '.join(FILE_TYPES)}")
    gguf = _gguf()
    out_path = Path(out_path)
    _check_replaceable_file(out_path)
    if isinstance(model_dir_or_model, Transformer):
        check_llama_style(model_dir_or_model.config)
        if tokenizer is None:
            raise ConfigError("export_gguf of a Transformer needs tokenizer=... (GGUF carries the vocabulary)")
        model = model_dir_or_model
    elif isinstance(model_dir_or_model, (str, os.PathLike)):
        model, tokenizer = _load(Path(model_dir_or_model), tokenizer)
        name = Path(model_dir_or_model).resolve().name
    else:
        raise ConfigError(f"export_gguf takes an lmforge model dir or a Transformer, not "
                          f"{type(model_dir_or_model).__name__} (merge an adapter first: lmforge peft merge)")
    cfg = model.config
    tensors = gguf_tensors(model)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            _add_metadata(gguf, writer, cfg, file_type, name)
            _add_tokenizer(writer, tokenizer, cfg.vocab_size)
            for tensor_name, tensor in tensors.items():
                data, qtype = _encode_tensor(gguf, tensor, file_type)
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out_path
