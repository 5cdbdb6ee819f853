"""Model FLOP utilisation: achieved training FLOP/s over the device's peak.

    MFU = model.flops_per_token(seq_len) * tokens_per_second / peak_flops

flops_per_token is the training cost (6N plus the attention term, the PaLM/nanoGPT convention). GPU peaks are the
vendors' dense bf16 tensor-core numbers (no sparsity); a GPU not in the table gets a measured peak (the best of a few
large matmuls in the training dtype) and the CPU a measured fp32 peak, each measured once per process.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

# substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s; more specific names first
GPU_PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "V100": 125e12,  # fp16
}


@lru_cache(maxsize=None)
def measured_matmul_flops(device: str, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of `repeats` (size x size) @ (size x size) matmuls: 2 * size**3 FLOPs each."""
    a = torch.full((size, size), 1.0 / size, device=device, dtype=dtype)  # not randn: keep the global RNG untouched
    b = torch.full((size, size), 1.0 / size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up kernels and caches
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> float:
    """Peak FLOP/s for MFU: `override` if > 0, else the GPU table, else a measured matmul peak."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    if device.type == "cuda":
        return measured_matmul_flops(str(device), dtype, size=4096)
    # fp32 even under bf16 autocast: the CPU emulates bf16 matmuls, it does not run them faster
    return measured_matmul_flops("cpu", torch.float32, size=1024, repeats=10)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Achieved / peak FLOP/s (0..1)."""
    return flops_per_token * tokens_per_s / peak
