"""Model FLOP utilisation: achieved training FLOP/s over the device's peak.

    MFU = model.flops_per_token(seq_len) * tokens_per_second / peak_flops

flops_per_token is the training cost (6N plus the attention term, the PaLM/nanoGPT convention). GPU peaks are the
vendors' dense bf16 tensor-core numbers (no sparsity); a GPU not in the table and the CPU get a measured peak: the
best of several square matmuls in the training dtype.

A shared machine makes one measurement unreliable (the same process measured a 1024^3 fp32 matmul at 81, 84, 179,
181, 179 and 175 GFLOP/s), and a peak measured while the machine is busy turns a real utilisation into an MFU above
100%. So the measured peak is the best ever seen on this machine: kept per CPU model, thread count, torch version and
dtype in `$LMFORGE_CACHE/peak_flops.json`, raised whenever a new measurement (or a training window) beats it, and
recorded beside the MFU in metrics.jsonl and summary.json. MFU is never reported above 1.
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

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


def _cache_file() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge") / "peak_flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak depends on: the processor, the threads torch uses, torch's version and the dtype."""
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = f"{_cpu_name()} x{torch.get_num_threads()} threads"
    return f"{device.type}|{processor}|torch {torch.__version__}|{str(dtype).removeprefix('torch.')}"


def remember_peak(key: str, flops: float) -> float:
    """Record `flops` for `key` in the per-machine cache if it beats the best seen; return the best seen."""
    path = _cache_file()
    try:
        seen = json.loads(path.read_text())
        seen = seen if isinstance(seen, dict) else {}
    except (OSError, ValueError):
        seen = {}
    best = max(flops, float(seen.get(key, 0.0)))
    if best > float(seen.get(key, 0.0)):
        from lmforge.io import atomic_write_json

        try:
            atomic_write_json(path, {**seen, key: best})
        except OSError:  # a read-only cache dir: the peak still holds for this process
            pass
    return best


def measure_peak(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s for MFU, where it came from): `override` if > 0, else the GPU table, else the best of a new
    measurement and every earlier one on this machine (see the module docstring)."""
    if override > 0:
        return override, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"datasheet dense bf16 peak of {key}"
        measured = measured_matmul_flops(str(device), dtype, size=4096)
    else:  # fp32 even under bf16 autocast: the CPU emulates bf16 matmuls, it does not run them faster
        dtype = torch.float32
        measured = measured_matmul_flops("cpu", dtype, size=1024, repeats=10)
    key = machine_key(device, dtype)
    return remember_peak(key, measured), f"best measured matmul rate on this machine ({key})"


def peak_flops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> float:
    """Peak FLOP/s for MFU (see `measure_peak`)."""
    return measure_peak(device, dtype, override)[0]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Achieved / peak FLOP/s (0..1)."""
    return flops_per_token * tokens_per_s / peak
