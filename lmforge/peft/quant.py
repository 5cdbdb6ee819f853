"""Quantized base weights for QLoRA-style training: int8 per output channel and 4-bit NF4 with group-wise absmax.

int8 (absmax per output row):   s_o = max_i |W_oi| / 127,   q_oi = round(W_oi / s_o) in [-127, 127],   W ~ s_o q_oi
NF4 (QLoRA, Dettmers et al. 2023): the weights of each group of G consecutive inputs of a row are divided by the
group's absmax c and each value is replaced by the nearest of the 16 NF4 levels (the quantiles of N(0, 1), scaled to
[-1, 1], with an exact zero); two 4-bit codes are packed per byte:

    W_oi ~ c_{o, i // G} * NF4[q_oi]

The stored weights are never updated (the base is frozen); `QuantLinear.forward` dequantizes to the input's dtype
(fp32 on the CPU, bf16 under autocast on a GPU) for each product, so only the quantized bytes stay resident.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError

# The NF4 levels of QLoRA (bitsandbytes' table): 8 positive and 7 negative quantiles of N(0, 1) and zero.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
QuantKind = Literal["int8", "nf4"]


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(codes int8 (out, in), scales float32 (out,)) of absmax quantization per output row."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def dequantize_int8(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.to(dtype) * scales.to(dtype)[:, None])


def quantize_nf4(weight: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor]:
    """(packed uint8 (out, in // 2), absmax float32 (out, in // group_size)) of NF4 with group-wise absmax."""
    out_features, in_features = weight.shape
    if in_features % group_size or group_size % 2:
        raise ConfigError(f"nf4: the input size {in_features} must be a multiple of the group size {group_size} "
                          "(an even number)")
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    absmax = groups.abs().amax(dim=2).clamp(min=1e-12)  # (out, in / G)
    normalized = (groups / absmax[..., None]).reshape(out_features, in_features).contiguous()
    levels = NF4_LEVELS.to(normalized.device)
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # nearest level
    return pack_int4(codes), absmax


def pack_int4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, (out, in) -> (out, in / 2) uint8: the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of pack_int4: (out, in / 2) uint8 -> codes (out, in) uint8."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def dequantize_nf4(packed: Tensor, absmax: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    codes = unpack_int4(packed).long()  # (out, in)
    values = NF4_LEVELS.to(packed.device)[codes].reshape(packed.shape[0], -1, group_size)
    return (values * absmax[..., None]).reshape(packed.shape[0], -1).to(dtype)


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored int8 or NF4 and dequantized for every product; the bias stays."""

    def __init__(self, linear: nn.Linear, kind: QuantKind, group_size: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind, self.group_size = kind, group_size
        if kind == "int8":
            codes, scales = quantize_int8(linear.weight)
        elif kind == "nf4":
            codes, scales = quantize_nf4(linear.weight, group_size)
        else:
            raise ConfigError(f"quantization must be int8 or nf4, got {kind!r}")
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.kind == "int8":
            return dequantize_int8(self.codes, self.scales, dtype)
        return dequantize_nf4(self.codes, self.scales, self.group_size, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in), fp32: what a merge or an export reads."""
        return self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
