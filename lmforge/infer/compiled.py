"""A one-token decode step compiled ahead of time (AOTInductor), for `generate(..., GenerationConfig(compile=True))`.

Eager decoding of a small model spends a third of each step in Python and operator dispatch (about 5.5 ms of 17 ms
per token for a 33.6M model on 2 CPU cores), and at batch 8 MKL's few-row products are slow. Here the whole step
(embedding, every block, final norm, LM head) is exported once as a static-shape graph and compiled with Inductor:

- weights are frozen into the compiled code as constants, which lets Inductor pack them for oneDNN (the few-row
  products run 2-3x faster at batch 8) and fold every weight-only computation;
- the KV cache is one (B, n_kv_head, L, head_dim) tensor per layer and per kind, written in place at the step's
  column with index_copy_ (one (n_layer, ...) tensor indexed per layer made the compiled graph copy the whole cache
  every layer);
- attention is written out over all L cached columns with a mask (column <= position, column >= the row's left
  padding), so the shapes never change and Inductor fuses it; L is prompt + new tokens rounded up to a multiple of
  128, so the masked columns cost little.

The result computes the same function as `Transformer.forward` with a KV cache, up to float rounding (Inductor
orders sums differently). A compiled step is specific to the weights, batch size, cache length, device and dtype:
compiling takes 30-100 s. Compiled steps are kept in this process (up to 4 per model) while the weights are
unchanged, and on disk as AOTInductor packages ($LMFORGE_CACHE/decode/, else ~/.cache/lmforge/decode/, named by a
digest of the weights, config, shapes, torch version and CPU capability), so a later process with the same model
loads its step in about a second. Any in-place change to a parameter (an optimizer step) changes the digest. Each
package holds a copy of the weights, so the directory is kept within $LMFORGE_DECODE_CACHE_MB (default 2048 MB):
after each compile the least recently used packages go.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lmforge.data.corpora import default_cache_dir
from lmforge.errors import ConfigError
from lmforge.model import transformer
from lmforge.model.transformer import apply_rope

CACHE_BUCKET = 128  # cache lengths are rounded up to a multiple of this: fewer distinct compiled shapes
KEEP_PER_MODEL = 4  # compiled steps kept per model (each holds a copy of the weights)
DISK_BUDGET_MB = 2048  # $LMFORGE_DECODE_CACHE_MB overrides: the on-disk packages kept, most recently used first

_compiled: "weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, Callable]]" = weakref.WeakKeyDictionary()


def cache_length(prompt_len: int, max_new: int, block_size: int) -> int:
    """The compiled cache's length: prompt + new tokens rounded up to CACHE_BUCKET, at most block_size."""
    needed = prompt_len + max_new
    return min(block_size, -(-needed // CACHE_BUCKET) * CACHE_BUCKET)


class DecodeStep(nn.Module):
    """(token (B,), column (1,), padding (B,), k_cache [n_layer x (B, n_kv_head, L, head_dim)], v_cache) ->
    logits (B, V) of the next token; the new keys and values are written into the caches at `column`.

    `column` is the cache column of `token` (the same for every row: prompts are left-padded) and padding[b] the
    number of padding columns at the start of row b, so row b's position id is column - padding[b] and it attends
    to the columns in [padding[b], column].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.pre_norm = cfg.norm_placement == "pre"

    def forward(self, token: Tensor, column: Tensor, padding: Tensor, k_cache: list[Tensor],
                v_cache: list[Tensor]) -> Tensor:
        m = self.model
        L = k_cache[0].shape[2]
        position = (column - padding).clamp(min=0)  # (B,)
        x = m.tok_emb(token)  # (B, d_model)
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(position)
        else:
            rope = (m.rope_cos.index_select(0, position)[:, None], m.rope_sin.index_select(0, position)[:, None])
        columns = torch.arange(L, device=token.device)
        visible = ((columns <= column) & (columns >= padding[:, None]))[:, None, None, :]  # (B, 1, 1, L)
        for layer, block in enumerate(m.blocks):
            caches = (k_cache[layer], v_cache[layer])
            if self.pre_norm:
                x = x + self._attention(block.attn, block.attn_norm(x), rope, column, visible, *caches)
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block.attn_norm(x + self._attention(block.attn, x, rope, column, visible, *caches))
                x = block.mlp_norm(x + block.mlp(x))
        return m.lm_head(m.norm(x))  # (B, V)

    def _attention(self, attn: nn.Module, x: Tensor, rope: Any, column: Tensor, visible: Tensor, k_cache: Tensor,
                   v_cache: Tensor) -> Tensor:
        B, group = x.shape[0], self.n_head // self.n_kv_head
        heads = attn.qkv(x).view(B, self.n_head + 2 * self.n_kv_head, self.head_dim)
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # cos, sin (B, 1, hd) broadcast over the heads
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (B, n_head, hd), (B, n_kv_head, hd)
        k_cache.index_copy_(2, column, k.unsqueeze(2))  # (B, n_kv_head, L, hd), written at `column`
        v_cache.index_copy_(2, column, v.unsqueeze(2))
        q = q.reshape(B, self.n_kv_head, group, self.head_dim)  # query heads grouped by the key/value head they share
        scores = (q @ k_cache.transpose(-1, -2)) * self.head_dim**-0.5  # (B, n_kv_head, group, L)
        scores = scores.float().masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(v_cache.dtype)
        y = (weights @ v_cache).reshape(B, self.n_head * self.head_dim)
        return attn.proj(y)


def _weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (each tensor's version counter)."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def compiled_decode_step(model: nn.Module, batch_size: int, cache_len: int) -> Callable[..., Tensor]:
    """The compiled DecodeStep of `model` for this batch size and cache length (compiled now, or reused).

    Raises ConfigError on a torch without AOTInductor's packaging API (torch < 2.6) and for a model that is not on
    the CPU (a run on an H100 did not complete its compile and the path is not verified there).
    """
    inductor = getattr(torch, "_inductor", None)
    if inductor is None or not hasattr(inductor, "aoti_compile_and_package"):
        raise ConfigError(f"generation compile=true needs torch >= 2.6 (AOTInductor); this is torch "
                          f"{torch.__version__}: leave compile off")
    if not hasattr(model, "tok_emb"):  # a PeftModel: its virtual tokens and low-rank updates are not compiled
        raise ConfigError("generation compile=true needs a plain model; merge a LoRA adapter first "
                          "(lmforge peft merge ADAPTER_DIR OUT_DIR) or leave compile off")
    weight = model.tok_emb.weight
    if weight.device.type != "cpu":  # on a GPU eager decoding already beats transformers 2.3x (bench/README.md)
        raise ConfigError(f"generation compile=true: the compiled decode step is built for the CPU; the model is on "
                          f"{weight.device}: leave compile off there")
    disk_budget_bytes()  # a bad $LMFORGE_DECODE_CACHE_MB fails now, not after a compile
    key = (batch_size, cache_len, str(weight.device), weight.dtype, _weights_version(model))
    steps = _compiled.setdefault(model, OrderedDict())
    if key in steps:
        steps.move_to_end(key)
        return steps[key]
    package = _package_path(model, batch_size, cache_len)
    started = time.perf_counter()
    compiled = _load_package(inductor, package)
    if compiled is None:
        print(f"generate: compiling the decode step for batch {batch_size}, cache {cache_len} (once per model and "
              f"shape; 30-100 s)", file=sys.stderr, flush=True)
        _compile_package(model, batch_size, cache_len, package)
        compiled = inductor.aoti_load_package(str(package))
        prune_disk_cache(package)
        print(f"generate: decode step compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
    else:
        print(f"generate: decode step loaded from {package}", file=sys.stderr, flush=True)

    # the compiled code assumes the example's (contiguous) strides without checking them: a column of a (B, T)
    # id matrix would be read as a row
    def step(token: Tensor, column: Tensor, padding: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]) -> Tensor:
        return compiled(token.contiguous(), column.contiguous(), padding.contiguous(), k_cache, v_cache)

    steps[key] = step
    while len(steps) > KEEP_PER_MODEL:
        steps.popitem(last=False)
    return step


def _package_path(model: nn.Module, batch_size: int, cache_len: int) -> Path:
    """$LMFORGE_CACHE/decode/<digest>.pt2, the digest covering everything the compiled code depends on: the weights'
    bytes, the config, the shapes, the source of the traced code (this module and the model's), torch's version
    and the CPU's vector instructions it was built for."""
    digest = hashlib.blake2b(digest_size=20)
    facts = [torch.__version__, torch.backends.cpu.get_cpu_capability(), json.dumps(model.config.to_dict()),
             batch_size, cache_len]
    digest.update(json.dumps(facts, default=str).encode())
    from lmforge.infer import quant  # a change to the quantized layers' code changes the compiled step

    for module in (sys.modules[__name__], transformer, quant):
        digest.update(Path(module.__file__).read_bytes())
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return default_cache_dir() / "decode" / f"{digest.hexdigest()}.pt2"


def _load_package(inductor: Any, package: Path) -> Optional[Callable]:
    """The compiled step saved at `package`, or None when there is none (or it cannot be loaded)."""
    if not package.is_file():
        return None
    try:
        loaded = inductor.aoti_load_package(str(package))
        os.utime(package)  # used now: the last package pruning removes
        return loaded
    except Exception as error:  # a truncated or foreign file: compile again and replace it
        print(f"generate: ignoring the compiled decode step at {package} ({type(error).__name__}); compiling again",
              file=sys.stderr, flush=True)
        return None


def disk_budget_bytes() -> int:
    """The on-disk cache's size budget: $LMFORGE_DECODE_CACHE_MB (MB, a number >= 0), else DISK_BUDGET_MB."""
    value = os.environ.get("LMFORGE_DECODE_CACHE_MB", "")
    try:
        megabytes = float(value) if value.strip() else DISK_BUDGET_MB
    except ValueError:
        megabytes = -1.0
    if not 0 <= megabytes < float("inf"):
        raise ConfigError(f"LMFORGE_DECODE_CACHE_MB={value!r}: expected a size in MB (a number >= 0)")
    return int(megabytes * 2**20)


def prune_disk_cache(keep: Path) -> list[Path]:
    """Remove the least recently used packages beside `keep` (a package file) until the rest fit the budget of
    `disk_budget_bytes`; `keep` itself always stays. Each package holds a copy of its model's weights (137 MB for
    the 33.6M-parameter bench model), so an unbounded cache would fill the disk. Returns the removed paths."""
    budget, used, removed = disk_budget_bytes(), 0, []
    packages = []
    for path in keep.parent.glob("*.pt2"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        packages.append((stat.st_mtime, stat.st_size, path))
    for _, size, path in sorted(packages, key=lambda p: (p[2] != keep, -p[0])):  # keep first, then newest first
        used += size
        if path != keep and used > budget:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        print(f"generate: removed {len(removed)} least recently used compiled decode step(s) from {keep.parent} "
              f"(budget LMFORGE_DECODE_CACHE_MB={budget / 2**20:.0f})", file=sys.stderr, flush=True)
    return removed


def _compile_package(model: nn.Module, batch_size: int, cache_len: int, package: Path) -> None:
    """Export DecodeStep(model) for these shapes, compile it with AOTInductor (frozen weights) and save the package
    at `package`, atomically (written beside it, then renamed)."""
    cfg, weight = model.config, model.tok_emb.weight
    shape = (batch_size, cfg.n_kv_head, cache_len, cfg.head_dim)
    index = dict(dtype=torch.long, device=weight.device)
    example = (torch.zeros(batch_size, **index), torch.zeros(1, **index), torch.zeros(batch_size, **index),
               [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layer)],
               [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layer)])
    package.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(DecodeStep(model), example)
        with tempfile.TemporaryDirectory(prefix=".decode-", dir=package.parent) as tmp:
            partial = Path(tmp) / package.name
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                     inductor_configs={"freezing": True})
            os.replace(partial, package)
