"""What every side-by-side benchmark shares: the model both libraries build, the timing protocol, the conditions.

Protocol: each contender is warmed up, then the contenders run alternately (A B A B ...) for `repeats` rounds, so
a slow minute on a shared machine hurts both alike; a figure is the median over rounds and the ratio is
the median over rounds of each round's transformers time / lmforge time (above 1 means lmforge is faster). Nothing
here is asserted: benchmarks report, tests check.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.hf import config_to_hf, to_hf_state_dict
from lmforge.model.transformer import Transformer
from lmforge.train.mfu import measured_matmul_flops

# The config: LLaMA-style, hidden 512, 8 layers, GQA 8/4 (head_dim 64), SwiGLU d_ff 1536 (LLaMA's
# 8/3 * d rounded up to a multiple of 256), vocabulary 8192, untied head. block_size 1024 leaves room for the
# 512-token prefill; it only sizes the rope tables and changes no weight.
BENCH_MODEL = ModelConfig(vocab_size=8192, block_size=1024, n_layer=8, n_head=8, n_kv_head=4, d_model=512,
                          multiple_of=256)


def add_common_args(parser: Any) -> None:
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds; figures are medians")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def build_pair(cfg: ModelConfig = BENCH_MODEL, seed: int = 0, family: str = "llama") -> tuple[Transformer, Any]:
    """An lmforge Transformer and the transformers model of `family` (llama: LlamaForCausalLM, gpt2:
    GPT2LMHeadModel) with the same weights (fp32, CPU, SDPA attention)."""
    import transformers

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    hf_config = config_to_hf(cfg, family)
    hf_class = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[family]
    hf = hf_class._from_config(hf_config, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if [k for k in missing if "rotary" not in k and k not in tied] or unexpected:
        raise RuntimeError(f"weights did not map onto the HF model: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return ours, hf


def hf_causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a transformers user computes: the model's logits, then fp32 cross-entropy against the targets."""
    logits = model(input_ids=batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """backward, step, zero_grad; returns the detached loss."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def max_logit_diff(ours: Transformer, hf: Any, input_ids: torch.Tensor) -> float:
    """Largest |logit difference| on `input_ids`: the two models must be the same function before we time them."""
    with torch.no_grad():
        return float((ours(input_ids) - hf(input_ids=input_ids).logits).abs().max())


@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def speedup(self, name: str, reference: str) -> float:
        """Median over rounds of reference time / name time, each round's pair measured back to back: steadier than
        a ratio of medians when the machine's speed drifts between rounds."""
        return statistics.median(r / t for r, t in zip(self.seconds[reference], self.seconds[name]))


def alternate(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              each_round: Optional[Callable[[], Any]] = None) -> Timings:
    """Time each callable `repeats` times, interleaved round by round, after `warmup` untimed calls each;
    `each_round` (if given) runs once per round, untimed, e.g. to measure the machine's peak beside the figures."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    timings = Timings({name: [] for name in contenders})
    for _ in range(repeats):
        if each_round is not None:
            each_round()
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            timings.seconds[name].append(time.perf_counter() - start)
    return timings


def matmul_peak() -> float:
    """The machine's fp32 matmul FLOP/s now: the best of 10 (1024 x 1024) @ (1024 x 1024) products, measured
    afresh on every call (the figure drifts on a shared machine; lmforge.train.mfu caches its own)."""
    return measured_matmul_flops.__wrapped__("cpu", torch.float32, size=1024, repeats=10)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: VmHWM, the high-water mark of its own address space
    (ru_maxrss would not do: Linux carries the parent's value over fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mib() -> float:
    """This process's current resident memory, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def conditions() -> dict[str, Any]:
    """The facts a reader needs to compare figures: CPU, cores, threads, library versions."""
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def emit(result: dict[str, Any], json_path: Optional[str]) -> None:
    """Append the result, with the conditions, as one JSON line to json_path (if given)."""
    result = {**result, "conditions": conditions()}
    if json_path:
        with open(json_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
