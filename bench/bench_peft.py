"""The comparison users ask for: full fine-tuning and every parameter-efficient method on the same SFT task, data
and step budget. Each method runs `lmforge sft` in its own process (peak memory is that process's maximum resident
set, from os.wait4), then `lmforge eval` scores its model on the held-out test split of the same tasks.

    python bench/bench_peft.py --base runs/sft-results/quickstart/run/final --steps 1500
    python bench/bench_peft.py --base ... --methods full,lora --tasks antonym,nli --out runs/bench-peft

Prints a markdown table (trainable parameters, peak memory, seconds per step, final validation loss, held-out
figures) and appends one JSON line per method to bench/results_peft.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ALL_LINEAR = "q,k,v,o,gate,up,down"  # LoRA on every projection, as QLoRA does
METHODS = {
    "full": [],
    "lora": ["--peft.method", "lora", "--peft.targets", ALL_LINEAR, "--peft.r", "8"],
    "qlora-int8": ["--peft.method", "qlora", "--peft.quantize", "int8", "--peft.targets", ALL_LINEAR, "--peft.r", "8"],
    "qlora-nf4": ["--peft.method", "qlora", "--peft.quantize", "nf4", "--peft.targets", ALL_LINEAR, "--peft.r", "8"],
    "adapter": ["--peft.method", "adapter", "--peft.adapter_size", "16"],
    "prefix": ["--peft.method", "prefix", "--peft.virtual_tokens", "16"],
    "prompt": ["--peft.method", "prompt", "--peft.virtual_tokens", "16"],
}
LEARNING_RATES = {"full": "2e-3", "prefix": "1e-2", "prompt": "3e-2"}  # the others: 5e-3


def state_bytes(base: str, method: str) -> int:
    """Bytes of what training keeps per parameter: the weights and buffers as stored (a quantized base takes 1 or
    0.5 byte a weight), plus a gradient and AdamW's two moments (float32) for each trainable parameter."""
    from lmforge.convert import load
    from lmforge.config import build_config
    from lmforge.peft.config import PeftConfig
    from lmforge.peft.files import wrap_base

    model = load(base)
    if method != "full":
        flags = METHODS[method]
        settings = {flags[i].removeprefix("--peft."): flags[i + 1] for i in range(0, len(flags), 2)}
        model = wrap_base(model, build_config(PeftConfig, settings), base)
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return stored + 3 * 4 * trainable


def run(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak resident set in bytes) of a command in its own process."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {process.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model dir")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", default="antonym,hypernym,nli", help="built-in tasks trained and evaluated")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--per_task_limit", type=int, default=5000)
    parser.add_argument("--limit", type=int, default=500, help="test examples per task")
    parser.add_argument("--out", default="runs/bench-peft")
    args = parser.parse_args()
    lmforge = [sys.executable, "-m", "lmforge"]
    rows = []
    for method in args.methods.split(","):
        out = Path(args.out) / method
        lr = LEARNING_RATES.get(method, "5e-3")
        seconds, peak = run([*lmforge, "sft", args.base, "--data.train", "builtin", "--data.builtin_tasks",
                             args.tasks, "--data.per_task_limit", str(args.per_task_limit), "--out_dir", str(out),
                             "--train.max_steps", str(args.steps), "--train.lr", lr, "--train.min_lr",
                             str(float(lr) / 10), "--train.warmup_steps", "20", "--train.eval_interval",
                             str(args.steps), "--train.checkpoint_interval", str(args.steps), *METHODS[method]])
        summary = json.loads((out / "summary.json").read_text())
        run([*lmforge, "eval", str(out / "final"), "--tasks", args.tasks, "--limit", str(args.limit),
             "--out", str(out / "eval.json")])
        report = json.loads((out / "eval.json").read_text())["tasks"]
        row = {"method": method, "trainable_parameters": summary["trainable_parameters"],
               "parameters": summary["parameters"], "peak_rss_mib": round(peak / 2**20),
               "state_mib": round(state_bytes(args.base, method) / 2**20, 2),
               "s_per_step": round(summary["wall_time_s"] / summary["steps"], 4), "val_loss": summary["val_loss"],
               "lr": float(lr), "steps": summary["steps"], "wall_s": round(seconds, 1),
               **{task: round(result["value"], 4) for task, result in report.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(Path(__file__).parent / "results_peft.jsonl", "a") as f:
            f.write(json.dumps({**row, "base": args.base, "tasks": args.tasks}) + "\n")
    tasks = args.tasks.split(",")
    print("\n| method | trainable parameters | weights + training state | peak RSS | s/step | val loss | "
          + " | ".join(tasks) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(tasks))
    for r in rows:
        share = 100 * r["trainable_parameters"] / r["parameters"]
        figures = " | ".join(f"{100 * r[t]:.1f}%" for t in tasks)
        print(f"| {r['method']} | {r['trainable_parameters']:,} ({share:.2f}%) | {r['state_mib']} MiB | "
              f"{r['peak_rss_mib']} MiB | {r['s_per_step']:.3f} | {r['val_loss']:.3f} | {figures} |")


if __name__ == "__main__":
    main()
