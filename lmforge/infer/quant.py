"""Weight-only quantization for inference: a Transformer's block projections (q/k/v, attention output, MLP up and
down) and, by choice, its LM head stored as int8 or int4; activations, embeddings and norms stay as they are.

    int8, absmax per output row (lmforge.peft.quant.quantize_int8):
        s_o = max_i |W_oi| / 127,   q_oi = round(W_oi / s_o) in [-127, 127],   W_oi ~ s_o q_oi
    int4, asymmetric min/max per group of G consecutive inputs of a row, two codes per byte:
        s = (max - min) / 15,   z = min + 8 s,   q_oi = clamp(round((W_oi - z) / s) + 8, 0, 15),
        W_oi ~ (q_oi - 8) s + z

s and z of int4 are kept in bf16 (the kernel's format; 4 bytes per group: 5 bits per weight at G = 32, 4.5 at 64)
and the codes are rounded against the stored values. Measured on runs/sft-results/larger/final (6 layers, d_model
256; 40,960 held-out tokens, every layer and the head quantized), perplexity change over fp32 and mean KL(fp32 ||
quantized) per token: asymmetric G = 32 +0.58% (KL 0.0048), G = 64 +0.54% (0.0062); symmetric absmax (s =
max|W| / 7, z = 0) G = 32 +0.75% (0.0078), G = 64 +0.75% (0.0089). Hence asymmetric, G = 32 by default.

The LM head (include_head, default True): quantizing it moves that perplexity change from +0.17% to +0.60% with
int4 G = 32 (int8: -0.01% either way) and buys decoding speed and size: 1.34x against 1.24x fp32's eager tokens/s
and 7.6 against 11.2 MB on that model, 2.0x against 1.6x on the 33.6M bench model (bench/bench_quant.py). Both
stay far inside the goals (int8 within 1% of fp32, int4 within 5%); include_head=False keeps the head in fp32. With
tied embeddings a quantized head is a second, quantized copy of the table (the embedding stays in full precision).
generate(compile=True) exports quantized layers as they are: the compiled step calls both kernels (3.4-4.0x the
compiled fp32 step's tokens/s at batch 1 in that benchmark, where decoding is bound by reading the weights).

Products (`python bench/bench_quant.py --kernels`: microseconds per product on 1 thread of a shared 2-core Xeon,
AVX-512, torch 2.13):
- torch._weight_int8pack_mm and torch._weight_int4pack_mm_for_cpu are vectorized for bf16 inputs only (with fp32
  inputs they were 5-50x slower than the fp32 matmul), so the input goes in as bf16 and the output is cast back
  (perplexity: +0.01% against the fp32-input path). At 1 to 8 rows (decoding) they beat the fp32 matmul on the
  larger weights: the 8192 x 512 head at 1 row int4 662, int8 1035, fp32 1131 us; at 8 rows 2447, 3441, 4720 us.
  Their cost grows with every row, so at 32 rows the int8 dequantize path below was faster on 4 of 5 shapes and
  from 128 rows on all (8192 x 512, 128 rows: kernel 40.5 ms, dequantize 21.0 ms, fp32 18.9 ms).
- int8 above KERNEL_MAX_ROWS rows: (x @ q^T) * s in the input's dtype (the scales on the outputs).
- int4 on the CPU keeps its bytes in the kernel's tiled layout (which depends on the CPU's vector width, so state
  dicts and files hold the plain layout, low nibble = even input column) and uses the kernel at any row count: at
  128 rows it cost 1.6-1.9x fp32, and dequantizing 4-bit codes for each product cost more still up to ~256 rows.
  Elsewhere (another device, fp16) it dequantizes for every product.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.io import atomic_write_json, load_safetensors, save_safetensors
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import CONFIG_FILE, Transformer
from lmforge.peft.quant import QuantLinear, pack_int4, unpack_int4

Scheme = Literal["int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes
INCLUDE_HEAD = True  # the LM head too by default: see the module docstring for what it costs and buys
QUANT_FILE = "quantization.json"
QUANT_WEIGHTS_FILE = "quantized.safetensors"


def check_int4_shape(in_features: int, group_size: int) -> None:
    """Raise a one-line ConfigError unless group_size is one the kernel takes and divides in_features."""
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group_size {group_size}: expected one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        raise ConfigError(f"int4: in_features {in_features} is not a multiple of group_size {group_size}")


def quantize_int4(weight: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 (out, in) in [0, 15], scales bf16 (out, in / G), zeros bf16 (out, in / G)) of asymmetric
    min/max quantization per group of G inputs; W ~ (codes - 8) * scales + zeros (see the module docstring)."""
    out_features, in_features = weight.shape
    check_int4_shape(in_features, group_size)
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, in/G, G)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    codes = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    return codes.clamp(0, 15).to(torch.uint8).reshape(out_features, in_features), scales, zeros


def dequantize_int4(codes: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> Tensor:
    """(codes - 8) * scales + zeros per group, (out, in) in `dtype`; codes (out, in), scales and zeros (out, in/G)."""
    out_features, groups = scales.shape
    grouped = codes.view(out_features, groups, -1).float() - 8  # (out, in/G, G)
    weights = torch.addcmul(zeros.float()[..., None], grouped, scales.float()[..., None])  # (out, in/G, G)
    return weights.reshape(out_features, -1).to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a product runs in: autocast's when it is on (a GPU under bf16), else the input's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _cpu_kernel_input(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether torch's weight-only CPU kernels may take this input (they run in bf16, see the module docstring)."""
    return x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _kernel_product(x: Tensor, product: Callable[[Tensor], Tensor], out_features: int, bias: Optional[Tensor],
                    dtype: torch.dtype) -> Tensor:
    """x (..., in) through a bf16 kernel, product: (rows, in) -> (rows, out); the result in `dtype`, plus bias."""
    y = product(x.reshape(-1, x.shape[-1]).to(torch.bfloat16)).to(dtype).view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias.to(dtype)


class _DerivedKernelState(nn.Module):
    """A quantized layer whose kernel-side tensors are derived from its stored ones: derived again after every move
    (.to(device), .float(), ...) and every state-dict load."""

    def _before_move(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Called before `fn` (a move or a cast) is applied to every tensor."""

    def _before_load(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Called before this layer's tensors are copied from `state_dict`."""

    def _derive(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._before_move(fn)
        super()._apply(fn, recurse)
        self._derive()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._before_load(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive()


class Int8Linear(_DerivedKernelState, QuantLinear):
    """A Linear stored as int8 codes (out, in) and fp32 scales (out,): QuantLinear's int8 storage, with products
    through torch._weight_int8pack_mm for few rows on the CPU."""

    KERNEL_MAX_ROWS = 16  # from 32 rows on the dequantize path was as fast or faster (bench_quant.py --kernels)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, "int8")
        self.codes = self.codes.contiguous()  # (out, in): a widening Linear keeps its weight transposed in memory
        self.register_buffer("kernel_scales", self.scales.to(torch.bfloat16), persistent=False)  # (out,)

    def _derive(self) -> None:
        self.kernel_scales = self.scales.to(torch.bfloat16)

    def kernel_ok(self, x: Tensor, dtype: torch.dtype) -> bool:
        # in_features % 16: other sizes crashed or returned wrong sums in torch 2.13's kernel
        return _cpu_kernel_input(x, dtype) and self.in_features % 16 == 0

    def forward(self, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        if x.numel() <= self.KERNEL_MAX_ROWS * self.in_features and self.kernel_ok(x, dtype):
            return self.forward_kernel(x, dtype)
        return self.forward_dequantized(x, dtype)

    def forward_kernel(self, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """x (..., in) -> (..., out) through the int8 kernel in bf16, cast back to the compute dtype."""
        return _kernel_product(x, lambda rows: torch._weight_int8pack_mm(rows, self.codes, self.kernel_scales),
                               self.out_features, self.bias, dtype or _compute_dtype(x))

    def forward_dequantized(self, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """(x @ q^T) * s (+ bias) in the compute dtype: the scales applied to the outputs, not to every weight."""
        dtype = dtype or _compute_dtype(x)
        y = F.linear(x.to(dtype), self.codes.to(dtype)) * self.scales.to(dtype)
        return y if self.bias is None else y + self.bias.to(dtype)


class Int4Linear(_DerivedKernelState):
    """A Linear stored as int4 codes, two per byte (out, in / 2), with bf16 scales and zeros per group of G inputs
    in the kernel's shape (in / G, out, 2); the bias stays as it is."""

    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        codes, scales, zeros = quantize_int4(linear.weight, group_size)
        self.register_buffer("packed", pack_int4(codes))  # (out, in / 2) uint8, plain or the kernel's layout
        scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous()  # (in / G, out, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.kernel_layout = False
        self._derive()

    # ---- the two byte layouts: plain (files, state dicts, other devices) and the CPU kernel's tiles -------------

    def _before_move(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.kernel_layout and fn(torch.empty(0)).device.type != "cpu":
            self._set_layout(False)

    def _before_load(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        if prefix + "packed" in state_dict:
            self.kernel_layout = False  # the incoming bytes are plain (the same shape as the tiled ones)

    def _derive(self) -> None:
        self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)  # also after .float() or .half()
        self._set_layout(self.packed.device.type == "cpu" and self.out_features % 16 == 0)

    def _set_layout(self, kernel: bool) -> None:
        """Repack `packed` into the CPU kernel's tiled layout (kernel=True) or the plain one."""
        if kernel != self.kernel_layout:
            codes = self.codes()
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 2) if kernel else pack_int4(codes)
            self.kernel_layout = kernel

    def codes(self) -> Tensor:
        """The codes (out, in) uint8 in [0, 15], whatever the layout."""
        if not self.kernel_layout:
            return unpack_int4(self.packed)
        # the tiled layout is the kernel's own (it depends on the CPU's vector width): read it back through the
        # kernel, with scale 1 and zero 8 so that it returns the codes themselves, exactly
        identity = torch.eye(self.in_features, dtype=torch.bfloat16)
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(self.in_features // self.group_size,
                                                                        self.out_features, 2).contiguous()
        codes_t = torch._weight_int4pack_mm_for_cpu(identity, self.packed, self.group_size, unit)  # (in, out)
        return codes_t.t().round().to(torch.uint8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:
            destination[prefix + "packed"] = pack_int4(self.codes())

    # ---- products ----------------------------------------------------------------------------------------------

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        scales, zeros = self.scales_and_zeros.permute(2, 1, 0)  # each (out, in / G)
        return dequantize_int4(self.codes(), scales, zeros, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in), fp32: what the fused loss (model(ids, targets=...)) reads."""
        return self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        if self.kernel_layout and _cpu_kernel_input(x, dtype):
            return self.forward_kernel(x, dtype)
        return self.forward_dequantized(x, dtype)

    def forward_kernel(self, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """x (..., in) -> (..., out) through the int4 kernel in bf16, cast back to the compute dtype."""
        if not self.kernel_layout:
            raise ConfigError(f"int4 kernel: needs the layer on the CPU with out_features a multiple of 16 (got "
                              f"{self.out_features} on {self.packed.device})")

        def product(rows: Tensor) -> Tensor:
            return torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)

        return _kernel_product(x, product, self.out_features, self.bias, dtype or _compute_dtype(x))

    def forward_dequantized(self, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        dtype = dtype or _compute_dtype(x)
        return F.linear(x.to(dtype), self.dequantized(dtype), None if self.bias is None else self.bias.to(dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


QUANTIZED = (Int8Linear, Int4Linear)


def quantize_model(model: nn.Module, scheme: Scheme, group_size: int = 32,
                   include_head: bool = INCLUDE_HEAD) -> nn.Module:
    """Replace, in place, every Linear of `model.blocks` (and `model.lm_head` with include_head) by an Int8Linear
    (absmax per output row; group_size is not used) or an Int4Linear (groups of group_size inputs: 32, 64, 128 or
    256); returns the model. Records {scheme, group_size, include_head} as `model.quantization`."""
    if scheme not in ("int8", "int4"):
        raise ConfigError(f"quantize scheme {scheme!r}: expected 'int8' or 'int4'")
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList) or not hasattr(model, "lm_head"):
        raise ConfigError(f"quantize_model: expected an lmforge Transformer, got {type(model).__name__} (merge a "
                          "LoRA adapter into its base first)")
    if any(isinstance(m, QUANTIZED) for m in model.modules()):
        raise ConfigError("quantize_model: the model is already quantized; start from a full-precision one")
    targets = [(owner, name, child) for owner in model.blocks.modules() for name, child in owner.named_children()
               if isinstance(child, nn.Linear)]
    if include_head:
        targets.append((model, "lm_head", model.lm_head))
    if scheme == "int4":  # every shape is checked before any layer is replaced
        for _, _, linear in targets:
            check_int4_shape(linear.in_features, group_size)
    for owner, name, linear in targets:
        setattr(owner, name, Int8Linear(linear) if scheme == "int8" else Int4Linear(linear, group_size))
    model.quantization = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None,
                          "include_head": include_head}
    return model


def _stored_tensors(model: nn.Module) -> dict[int, Tensor]:
    """Parameters and persistent buffers by identity (a tied weight once)."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[id(buffer)] = buffer
    return tensors


def quantized_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored now (parameters and persistent buffers, a tied weight once)."""
    return sum(t.numel() * t.element_size() for t in _stored_tensors(model).values())


def size_summary(model: nn.Module) -> dict[str, float]:
    """{bytes, quantized_bytes (the quantized layers'), full_precision_bytes (the rest), quantized_weights,
    bits_per_weight (of the quantized layers, scales and zeros included)}."""
    total = quantized_size_bytes(model)
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    quantized = sum(quantized_size_bytes(m) for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    return {"bytes": total, "quantized_bytes": quantized, "full_precision_bytes": total - quantized,
            "quantized_weights": weights, "bits_per_weight": 8 * quantized / weights if weights else float("nan")}


def save_quantized(model: Transformer, directory: str | Path) -> None:
    """Write config.json, quantization.json ({scheme, group_size, include_head}) and quantized.safetensors (the
    plain int4 layout) into `directory`. It is not a model dir for `lmforge.load`: read it with load_quantized."""
    if not hasattr(model, "quantization"):
        raise ConfigError("save_quantized: the model is not quantized (call quantize_model first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and not model.quantization["include_head"]:
        del state["lm_head.weight"]  # the embedding's own tensor
    save_safetensors(state, directory / QUANT_WEIGHTS_FILE)
    atomic_write_json(directory / QUANT_FILE, model.quantization)
    model.config.save(directory / CONFIG_FILE)


def load_quantized(directory: str | Path, device: Optional[torch.device | str] = None) -> Transformer:
    """A quantized model written by save_quantized (its int4 bytes repacked for this CPU), in eval mode."""
    directory = Path(directory)
    for name in (CONFIG_FILE, QUANT_FILE, QUANT_WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise LmforgeError(f"{directory / name} not found: expected a dir written by save_quantized")
    settings = json.loads((directory / QUANT_FILE).read_text())
    model = Transformer(ModelConfig.load(directory / CONFIG_FILE))
    quantize_model(model, settings["scheme"], settings["group_size"] or 32, settings["include_head"])
    state = load_safetensors(directory / QUANT_WEIGHTS_FILE)
    if model.config.tie_embeddings and not settings["include_head"]:
        state["lm_head.weight"] = state["tok_emb.weight"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise LmforgeError(f"{directory / QUANT_WEIGHTS_FILE} does not match its config "
                           f"({str(error).splitlines()[0]})") from None
    model.eval()
    return model.to(device) if device is not None else model


def quantize_as_configured(model: nn.Module, cfg: Any) -> nn.Module:
    """Apply the `--quantize`, `--quant_group_size` and `--quant_head` options of generate, chat and eval (fields
    of their configs) to a loaded model; nothing when cfg.quantize is unset."""
    if getattr(cfg, "quantize", None):
        quantize_model(model, cfg.quantize, cfg.quant_group_size, cfg.quant_head)
    return model
