"""The GPU path, side by side with transformers: training tokens/s and MFU of a GPT-2-small-sized model, decoding.

    python bench/bench_gpu.py [--batch-size 16] [--steps 10] [--repeats 3] [--families gpt2,llama] [--json F]

Needs a CUDA device. Each training contender runs the full step of `lmforge pretrain` on a GPU: bf16 autocast,
fused AdamW, flash attention through SDPA, with and without torch.compile; lmforge's step is `causal_lm_loss`
(LM head fused into a chunked cross-entropy) + `build_optimizer`; transformers' step is its model's logits with
`F.cross_entropy` and torch's fused AdamW, eager and compiled. The model is GPT-2 small (12 layers, 768 wide,
12 heads, sequence 1024; vocabulary 50304, GPT-2's 50257 padded to a multiple of 64 as nanoGPT does) and,
with --families llama, a LLaMA-style model of the same size (RMSNorm, rope, SwiGLU).

MFU = flops_per_token (6N + attention, the model's own count) x tokens/s / peak, against the datasheet's dense bf16
peak (H100 SXM: 989 TFLOP/s, the figure nanochat and LitGPT quote) and against the bf16 matmul peak measured here
(8192^3 products on random data). Timing: CUDA synchronised wall clock over `steps` optimizer steps, contenders
alternating for `repeats` rounds after two warm-up steps each (which include compilation); figures are medians.
Before timing, both libraries' fp32 logits are compared on the device (TF32 off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_MODEL, build_pair, conditions, hf_causal_lm_loss, max_logit_diff,  # noqa: E402
                    optimizer_step)

from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.objectives.causal_lm import causal_lm_loss  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.mfu import GPU_PEAK_FLOPS  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402

LR, BETAS, WEIGHT_DECAY = 6e-4, (0.9, 0.95), 0.1


def model_config(family: str, smoke: bool) -> ModelConfig:
    if smoke:  # a CPU dry run of the script's plumbing
        return ModelConfig.preset("tiny-gpt2" if family == "gpt2" else "tiny-llama", block_size=64)
    if family == "gpt2":
        return ModelConfig.preset("gpt2", vocab_size=50304)
    return ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, d_model=768, norm="rmsnorm",
                       positions="rope", mlp="swiglu", multiple_of=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_bf16_peak(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """Median FLOP/s of (size x size) @ (size x size) bf16 products on random data, after three warm-ups."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / statistics.median(times)


def datasheet_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), float("nan"))


def parity(family: str, device: torch.device) -> float:
    """Largest |logit difference| between the two libraries in fp32 on the device (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig.preset("tiny-gpt2" if family == "gpt2" else "tiny-llama", vocab_size=1000)
    ours, hf = build_pair(cfg, family=family)
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    diff = max_logit_diff(ours, hf, torch.randint(0, cfg.vocab_size, (2, 100), device=device))
    torch.backends.cuda.matmul.allow_tf32 = True
    return diff


def training_steps(cfg: ModelConfig, family: str, batch: dict[str, torch.Tensor], device: torch.device,
                   half: torch.dtype, checkpointing: bool = False, compile_mode: Optional[str] = None,
                   variants: tuple[bool, ...] = (False, True)) -> tuple[dict[str, Callable[[], Any]], Any]:
    """{name: step()} for lmforge and transformers, eager and/or compiled (`variants`), each with its own copy of
    one init."""
    steps: dict[str, Callable[[], Any]] = {}
    counter = None
    for compiled in variants:
        ours, hf = build_pair(cfg, family=family)
        counter = ours
        ours, hf = ours.to(device).train(), hf.to(device).train()
        ours.activation_checkpointing = checkpointing
        ours_opt = build_optimizer(ours, TrainConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1],
                                                     weight_decay=WEIGHT_DECAY), device.type)
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                   fused=device.type == "cuda")
        ours_fwd = torch.compile(ours, mode=compile_mode) if compiled else ours
        hf_fwd = torch.compile(hf, mode=compile_mode) if compiled else hf
        suffix = " (compiled)" if compiled else ""

        def step_ours(model=ours_fwd, opt=ours_opt) -> torch.Tensor:
            with torch.autocast(device.type, dtype=half):
                loss, _ = causal_lm_loss(model, batch, sync=False)
            return optimizer_step(loss, opt)

        def step_hf(model=hf_fwd, opt=hf_opt) -> torch.Tensor:
            with torch.autocast(device.type, dtype=half):  # autocast runs the cross-entropy in fp32
                loss = hf_causal_lm_loss(model, batch)
            return optimizer_step(loss, opt)

        steps["lmforge" + suffix] = step_ours
        steps["transformers" + suffix] = step_hf
    return steps, counter


def time_alternating(contenders: dict[str, Callable[[], Any]], steps: int, repeats: int,
                     device: torch.device) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median seconds per step, first-step losses and peak memory (GiB) of each contender."""
    first, memory = {}, {}
    for name, fn in contenders.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        first[name] = float(fn())
        fn()  # second warm-up: compiled graphs for the optimizer-state shapes
        sync(device)
        print(f"    warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        memory[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            seconds[name].append((time.perf_counter() - start) / steps)
    return {n: statistics.median(s) for n, s in seconds.items()}, first, memory


def bench_training(family: str, args: argparse.Namespace, device: torch.device, peaks: dict[str, float]) -> dict:
    cfg = model_config(family, args.smoke)
    seq_len = cfg.block_size
    generator = torch.Generator().manual_seed(3)
    window = torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len + 1), generator=generator).to(device)
    batch = {"input_ids": window[:, :-1], "targets": window[:, 1:]}
    half = torch.bfloat16
    steps, counter = training_steps(cfg, family, batch, device, half, compile_mode=args.compile_mode,
                                    variants=(True,) if args.compiled_only else (False, True))
    per_step, first, memory = time_alternating(steps, args.steps, args.repeats, device)
    if args.profile:
        profile(steps["lmforge (compiled)"], device)
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flops_per_token = counter.flops_per_token(seq_len)
    tokens = args.batch_size * seq_len
    print(f"train {family}: {counter.num_parameters():,} parameters, batch {args.batch_size} x {seq_len}, bf16 "
          f"autocast, {flops_per_token / 1e9:.3f} GFLOP/token")
    rows = []
    for name, seconds in per_step.items():
        tps = tokens / seconds
        ref = "transformers (compiled)" if "compiled" in name else "transformers"
        hf_eager = per_step.get("transformers", float("nan"))
        row = {"name": name, "tok_s": tps, "step_ms": 1000 * seconds, "first_loss": first[name],
               "mfu_datasheet": flops_per_token * tps / peaks["datasheet"],
               "mfu_measured": flops_per_token * tps / peaks["measured"],
               "ratio": per_step[ref] / seconds, "ratio_vs_hf_eager": hf_eager / seconds,
               "max_memory_gib": memory[name], "compile_mode": args.compile_mode}
        rows.append(row)
        print(f"  {name:26s} {tps:10.0f} tok/s  MFU {row['mfu_datasheet']:6.1%} of datasheet, "
              f"{row['mfu_measured']:6.1%} of measured  {row['ratio']:.2f}x {ref}  "
              f"{row['ratio_vs_hf_eager']:.2f}x transformers eager  first loss {first[name]:.4f}  "
              f"max memory {memory[name]:.1f} GiB", flush=True)
    return {"benchmark": "gpu_train", "family": family, "model": cfg.to_dict(), "batch_size": args.batch_size,
            "seq_len": seq_len, "flops_per_token": flops_per_token, "rows": rows}


def profile(step: Callable[[], Any], device: torch.device, rows: int = 30) -> None:
    """Where a step's GPU time goes: torch.profiler's kernels over 5 steps, the most expensive first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70),
          flush=True)


def bench_checkpointing_memory(args: argparse.Namespace, device: torch.device) -> dict:
    """Peak GPU memory and step time of lmforge's eager step with activation checkpointing off and on."""
    cfg = model_config("gpt2", args.smoke)
    generator = torch.Generator().manual_seed(3)
    window = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size + 1), generator=generator).to(device)
    batch = {"input_ids": window[:, :-1], "targets": window[:, 1:]}
    out = {}
    for checkpointing in (False, True):
        steps, _ = training_steps(cfg, "gpt2", batch, device, torch.bfloat16, checkpointing, variants=(False,))
        fn = steps["lmforge"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        out["on" if checkpointing else "off"] = {
            "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "step_ms": 1000 * (time.perf_counter() - start) / args.steps}
        del steps, fn
    print(f"  activation checkpointing (lmforge eager, gpt2): off {out['off']}, on {out['on']}", flush=True)
    return {"benchmark": "gpu_checkpointing", "batch_size": args.batch_size, **out}


def bench_decode(args: argparse.Namespace, device: torch.device) -> dict:
    from bench_decode import hf_generate, ours_generate

    cfg = model_config("llama", True) if args.smoke else BENCH_MODEL
    # plain fp32 matmuls (no TF32), so that greedy ids can be compared exactly (the figures in bench/README.md
    # were taken with TF32 on, and 8-row greedy ids then parted at a near tie)
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, hf = build_pair(cfg)
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch_size in (1, 8):
        prompts = torch.randint(0, cfg.vocab_size, (batch_size, 32), generator=generator).to(device)
        contenders = {"lmforge": lambda: ours_generate(ours, prompts, 128),
                      "transformers": lambda: hf_generate(hf, prompts, 128)}
        same = torch.equal(ours_generate(ours, prompts, 128).to(device), hf_generate(hf, prompts, 128))
        per_call, _, _ = time_alternating({k: (lambda f=f: (f(), 0.0)[1]) for k, f in contenders.items()}, 1,
                                          args.repeats, device)
        tps = {k: batch_size * 128 / v for k, v in per_call.items()}
        rows.append({"batch": batch_size, "lmforge_tok_s": tps["lmforge"], "transformers_tok_s": tps["transformers"],
                     "ratio": per_call["transformers"] / per_call["lmforge"], "identical": same})
        print(f"  decode batch {batch_size}: lmforge {tps['lmforge']:.0f} tok/s, transformers "
              f"{tps['transformers']:.0f} tok/s, {rows[-1]['ratio']:.2f}x, identical ids (fp32): {same}", flush=True)
    return {"benchmark": "gpu_decode", "model": cfg.to_dict(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; figures are medians")
    parser.add_argument("--families", default="gpt2", help="comma-separated: gpt2, llama")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--compiled-only", action="store_true", help="time only the compiled contenders")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--profile", action="store_true",
                        help="print the top CUDA kernels of lmforge's compiled step (torch.profiler)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny models; runs on the CPU too (plumbing check)")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_gpu.py: no CUDA device (use --smoke for a CPU dry run of the script)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    cond = conditions()
    if device.type == "cuda":
        cond.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    flash_sdp=torch.backends.cuda.flash_sdp_enabled())
    peaks = {"datasheet": datasheet_peak(device), "measured": measured_bf16_peak(device)}
    if args.smoke:
        peaks = {"datasheet": 1e12, "measured": 1e12}
    print(f"device {cond.get('gpu', 'cpu')}, torch {torch.__version__}; bf16 peak: datasheet "
          f"{peaks['datasheet'] / 1e12:.0f} TFLOP/s, measured {peaks['measured'] / 1e12:.0f} TFLOP/s", flush=True)

    def record(result: dict) -> None:  # written as soon as measured: a later part that fails loses nothing
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps({**result, "peaks": peaks, "conditions": cond}) + "\n")

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in families:
        diff = parity(family, device)
        print(f"  parity {family} fp32 on {device.type}: max |logit diff| {diff:.2e}", flush=True)
        record({"benchmark": "gpu_parity", "family": family, "max_abs_logit_diff": diff})
    for family in families:
        record(bench_training(family, args, device, peaks))
    if not args.skip_memory:
        record(bench_checkpointing_memory(args, device))
    if not args.skip_decode:
        record(bench_decode(args, device))


if __name__ == "__main__":
    main()
