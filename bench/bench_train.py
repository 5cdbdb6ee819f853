"""Training throughput and peak memory: lmforge against transformers, same model, same weights, same batches.

    python bench/bench_train.py [--repeats 5] [--threads 2] [--batch-size 8] [--compile] [--profile]
                                [--json results.jsonl]

One timed step is forward + backward + AdamW step + zero_grad on a (batch_size, seq_len) batch of token ids, fp32.
lmforge runs exactly what `lmforge pretrain` runs per micro-step (causal_lm_loss, build_optimizer); transformers runs
LlamaForCausalLM (SDPA attention) with the cross-entropy of its logits and torch's fused AdamW (the `Trainer`'s
default optimizer, adamw_torch_fused, since torch 2.8; faster than foreach on the CPU). MFU = flops_per_token x
tokens/s / measured fp32 matmul peak (the best of the peaks measured before each round, so a conservative MFU), with
the same flops_per_token for both: 6N (N: every weight multiplied by an activation, the LM head included) plus the
attention matmuls over the full context. Peak memory runs each contender in a fresh process (ru_maxrss), once with
activation checkpointing off and once on. --profile splits one step of each contender into matmul, attention,
optimizer and other operator time (torch.profiler) and prints the bound this puts on any speedup: transformers'
step time over lmforge's matmul + attention time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_MODEL, add_common_args, alternate, build_pair, emit, hf_causal_lm_loss,  # noqa: E402
                    matmul_peak, optimizer_step, peak_rss_mib, rss_mib, setup_threads)

from lmforge.objectives.causal_lm import causal_lm_loss  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402

LR, BETAS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 0.1


def make_steps(batch: dict[str, torch.Tensor], checkpointing: bool = False, compile_ours: bool = False):
    """Step functions {name: step()} for both libraries; each step returns its loss tensor (detached)."""
    ours, hf = build_pair()
    ours.train()
    hf.train()
    ours.activation_checkpointing = checkpointing
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours_forward = torch.compile(ours) if compile_ours else ours
    ours_opt = build_optimizer(ours, TrainConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY),
                               "cpu")
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)

    def step_ours() -> torch.Tensor:
        return optimizer_step(causal_lm_loss(ours_forward, batch)[0], ours_opt)

    def step_hf() -> torch.Tensor:
        return optimizer_step(hf_causal_lm_loss(hf, batch), hf_opt)

    name = "lmforge (compiled)" if compile_ours else "lmforge"
    return {name: step_ours, "transformers": step_hf}, ours


def make_batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    window = torch.randint(0, BENCH_MODEL.vocab_size, (batch_size, seq_len + 1), generator=generator)
    return {"input_ids": window[:, :-1], "targets": window[:, 1:]}


def memory_child(name: str, checkpointing: bool, batch_size: int, seq_len: int) -> None:
    """Run 2 steps of one contender in this (fresh) process and print its memory as one JSON line."""
    steps, _ = make_steps(make_batch(batch_size, seq_len), checkpointing)
    before = rss_mib()
    for _ in range(2):
        steps[name]()
    print(json.dumps({"name": name, "checkpointing": checkpointing, "rss_before_mib": before,
                      "peak_rss_mib": peak_rss_mib()}))


def measure_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in ("lmforge", "transformers"):
        for checkpointing in (False, True):
            cmd = [sys.executable, __file__, "--memory-child", name, "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            if checkpointing:
                cmd.append("--checkpointing")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also split one step of each contender into matmul, attention, optimizer and other time")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory runs")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.checkpointing, args.batch_size, args.seq_len)
        return

    if args.memory_only:
        memory = measure_memory(args)
        print_memory(memory)
        emit({"benchmark": "memory", "model": BENCH_MODEL.to_dict(), "batch_size": args.batch_size,
              "seq_len": args.seq_len, "memory": memory}, args.json)
        return
    batch = make_batch(args.batch_size, args.seq_len)
    steps, ours = make_steps(batch)
    if args.compile:
        compiled, _ = make_steps(batch, compile_ours=True)
        steps = {"lmforge (compiled)": compiled["lmforge (compiled)"], **steps}
    first = {name: float(step()) for name, step in steps.items()}  # same weights and batch: same first loss
    peaks: list[float] = []
    timings = alternate(steps, args.repeats, each_round=lambda: peaks.append(matmul_peak()))
    peak = max(peaks)  # the machine at its best: MFU is then a lower bound
    tokens = args.batch_size * args.seq_len
    flops_per_token = ours.flops_per_token(args.seq_len)
    print(f"train: {ours.num_parameters():,} parameters, batch {args.batch_size} x {args.seq_len} tokens, fp32, "
          f"{args.threads} threads; matmul peak {peak / 1e9:.1f} GFLOP/s; {flops_per_token / 1e6:.1f} MFLOP/token")
    rows = []
    for name in steps:
        tps = tokens / timings.median(name)
        row = {"name": name, "tok_s": tps, "mfu": flops_per_token * tps / peak,
               "ratio": timings.speedup(name, "transformers"),
               "step_s": timings.median(name), "first_loss": first[name]}
        rows.append(row)
        print(f"  {name:20s} {tps:8.1f} tok/s   MFU {row['mfu']:6.1%}   {row['ratio']:.2f}x transformers   "
              f"first loss {first[name]:.6f}")
    result = {"benchmark": "train", "model": BENCH_MODEL.to_dict(), "batch_size": args.batch_size,
              "seq_len": args.seq_len, "peak_flops": peak, "flops_per_token": flops_per_token, "rows": rows}
    if args.profile:
        result["profile_s"] = print_breakdown(steps)
    if not args.skip_memory:
        result["memory"] = measure_memory(args)
        print_memory(result["memory"])
    emit(result, args.json)


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def op_category(name: str) -> str:
    """matmul, attention, optimizer or other: the buckets of a CPU training step's operator time."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "adam" in name.lower() or name.startswith(("aten::_foreach", "aten::lerp", "aten::addc")):
        return "optimizer"
    return "other"


def breakdown(step: Callable[[], Any]) -> dict[str, float]:
    """Seconds of one step by op_category: torch.profiler's self CPU time of every operator (a compiled region's
    fused kernels count as other)."""
    from torch.profiler import profile

    step()
    with profile() as prof:
        step()
    seconds = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    for event in prof.key_averages():
        seconds[op_category(event.key)] += event.self_cpu_time_total / 1e6
    return seconds


def print_breakdown(steps: dict[str, Callable[[], Any]]) -> dict[str, dict[str, float]]:
    """Where each contender's step goes, and the most any library could gain over transformers with the same
    matmul and attention kernels: its total over lmforge's matmul + attention time (everything else at zero)."""
    times = {name: breakdown(step) for name, step in steps.items()}
    for name, parts in times.items():
        total = sum(parts.values())
        print(f"  profile {name:20s} {total:6.2f} s: " + ", ".join(
            f"{part} {seconds:.2f} s ({seconds / total:.0%})" for part, seconds in parts.items()))
    hf_total = sum(times["transformers"].values())
    for name, parts in times.items():
        if name != "transformers":
            floor = parts["matmul"] + parts["attention"]
            print(f"  {name}: matmuls + attention alone take {floor:.2f} s, so at most "
                  f"{hf_total / floor:.2f}x transformers ({hf_total:.2f} s) with every other operation free")
    return times


def print_memory(memory: list[dict]) -> None:
    for m in memory:
        print(f"  peak memory {m['name']:12s} checkpointing {'on ' if m['checkpointing'] else 'off'}: "
              f"{m['peak_rss_mib']:7.0f} MiB, of which the training steps {m['peak_rss_mib'] - m['rss_before_mib']:.0f}"
              f" MiB (both models built before: {m['rss_before_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
