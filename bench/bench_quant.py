"""Weight-only quantization (lmforge.infer.quant): perplexity, decoding speed and size, fp32 against int8 and int4.

    python bench/bench_quant.py [--repeats 5] [--threads 2] [--ppl-tokens 16384] [--compile] [--kernels]
                                [--models trained,bench] [--json results.jsonl]

Perplexity (the trained model only; a random model's is meaningless): runs/sft-results/larger/final (6 layers,
d_model 256, vocab 4096, block_size 128) on the first --ppl-tokens held-out tokens of the quickstart dataset's val
split, through lmforge.eval.perplexity (windows of 128 tokens sliding by 64); fp32, int8, int4 with groups of 32
and 64, each with the LM head quantized and with it kept in fp32. Goals: int8 within 1% of fp32, int4 within 5%.
Decoding: greedy, a 32-token prompt, exactly --new-tokens new tokens (fewer when the context is shorter; no eos),
batch 1, eager (and with --compile the AOTInductor decode step of fp32, int8 and int4 g32, compiled once beforehand
and not timed); new tokens/s over the whole `generate` call. Contenders run in alternating rounds (bench/common.py);
the ratio is the median over rounds of fp32 time / quantized time. `same` is how many leading tokens equal fp32's.
Size: the weights' bytes (quantized_size_bytes). The same on common.BENCH_MODEL (33.6M, random weights) for speed
and size.
--kernels: the micro-measurements behind the choice of products in lmforge/infer/quant.py (microseconds per
product for a few row counts and the two models' widest weights).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_MODEL, add_common_args, alternate, emit, setup_threads  # noqa: E402

import lmforge  # noqa: E402
from lmforge.eval.perplexity import perplexity  # noqa: E402
from lmforge.infer.generate import GenerationConfig, generate  # noqa: E402
from lmforge.infer.quant import Int4Linear, Int8Linear, quantize_model, quantized_size_bytes  # noqa: E402
from lmforge.model.transformer import Linear, Transformer  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "runs/sft-results/larger/final"
DATASET = ROOT / "runs/sft-results/quickstart/data"
# (name, scheme, group_size, include_head); None = fp32
PPL_VARIANTS = [("fp32", None, 0, False)] + [
    (f"{scheme}{f' g{g}' if scheme == 'int4' else ''} head {'int' if head else 'fp32'}", scheme, g, head)
    for scheme, g in (("int8", 32), ("int4", 32), ("int4", 64)) for head in (True, False)]
DECODE_VARIANTS = [("fp32", None, 0, False), ("int8", "int8", 32, True), ("int4 g32", "int4", 32, True),
                   ("int4 g32 head fp32", "int4", 32, False)]
COMPILED_VARIANTS = ("fp32", "int8", "int4 g32")  # each compile takes 30-100 s


def quantized(model: Transformer, scheme: Any, group_size: int, include_head: bool) -> Transformer:
    return model if scheme is None else quantize_model(copy.deepcopy(model), scheme, group_size, include_head)


def greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int, compile: bool = False) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos=False, compile=compile)
    return generate(model, prompt, cfg)[0].token_ids


def leading_match(ids: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))


def bench_perplexity(model: Transformer, tokens: int) -> list[dict[str, Any]]:
    tokenizer = Tokenizer.load(TRAINED)
    rows, reference = [], None
    for name, scheme, group_size, head in PPL_VARIANTS:
        start = time.perf_counter()
        result = perplexity(quantized(model, scheme, group_size, head), tokenizer, DATASET, max_tokens=tokens)
        ppl, seconds = float(result["perplexity"]), time.perf_counter() - start
        reference = reference or ppl
        change = 100 * (ppl / reference - 1)
        print(f"  perplexity {name:20s} {ppl:9.4f}  {change:+6.2f}% vs fp32   ({result['scored_tokens']} tokens, "
              f"{seconds:.0f} s)", flush=True)
        rows.append({"name": f"perplexity {name}", "perplexity": ppl, "change_pct": change,
                     "scored_tokens": result["scored_tokens"]})
    return rows


def bench_decode(label: str, model: Transformer, prompt: torch.Tensor, new_tokens: int, repeats: int,
                 compile: bool) -> list[dict[str, Any]]:
    models = {name: quantized(model, scheme, g, head) for name, scheme, g, head in DECODE_VARIANTS}
    reference = greedy(models["fp32"], prompt, new_tokens)
    contenders: dict[str, Callable[[], Any]] = {}
    facts: dict[str, dict[str, Any]] = {}
    for name, variant in models.items():
        contenders[name] = lambda variant=variant: greedy(variant, prompt, new_tokens)
        facts[name] = {"same": leading_match(greedy(variant, prompt, new_tokens), reference),
                       "mb": quantized_size_bytes(variant) / 1e6}
        if compile and name in COMPILED_VARIANTS:
            start = time.perf_counter()
            same = leading_match(greedy(variant, prompt, new_tokens, compile=True), reference)
            facts[name + " (compiled)"] = {"same": same, "mb": facts[name]["mb"],
                                           "compile_s": time.perf_counter() - start}
            contenders[name + " (compiled)"] = lambda variant=variant: greedy(variant, prompt, new_tokens, True)
    timings = alternate(contenders, repeats)
    rows = []
    for name in contenders:
        reference_name = "fp32 (compiled)" if name.endswith("(compiled)") else "fp32"
        tok_s, ratio = len(reference) / timings.median(name), timings.speedup(name, reference_name)
        extra = f"   (compiled once in {facts[name]['compile_s']:.0f} s)" if "compile_s" in facts[name] else ""
        print(f"  {label} decode batch 1: {name:30s} {tok_s:7.1f} tok/s   {ratio:5.2f}x {reference_name}   "
              f"{facts[name]['mb']:7.2f} MB   same {facts[name]['same']}/{len(reference)}{extra}", flush=True)
        rows.append({"name": f"{label} decode batch 1 {name}", "tok_s": tok_s, "ratio": ratio,
                     "size_mb": facts[name]["mb"], "same_tokens": facts[name]["same"], "tokens": len(reference),
                     **({"compile_s": facts[name]["compile_s"]} if "compile_s" in facts[name] else {})})
    return rows


def bench_kernels(repeats: int) -> list[dict[str, Any]]:
    """Microseconds per product: fp32 Linear, each quantized layer's kernel and dequantize paths."""
    shapes = [("trained lm_head", 4096, 256), ("trained mlp.up", 1408, 256), ("bench lm_head", 8192, 512),
              ("bench mlp.up", 3072, 512), ("bench mlp.down", 512, 1536)]
    rows = []
    for name, out_features, in_features in shapes:
        linear = Linear(in_features, out_features, bias=False)
        int8, int4 = Int8Linear(linear), Int4Linear(linear, 32)
        int4_plain = Int4Linear(linear, 32)
        int4_plain._set_layout(False)  # the dequantize path from the plain layout, as it runs off the CPU
        for n_rows in (1, 8, 32, 128, 512):
            x = torch.randn(n_rows, in_features)
            calls = max(1, min(50, int(2e7 / (n_rows * in_features * out_features))))
            paths = {"fp32": linear, "int8 kernel": int8.forward_kernel, "int8 dequant": int8.forward_dequantized,
                     "int4 kernel": int4.forward_kernel, "int4 dequant": int4_plain.forward_dequantized}
            with torch.inference_mode():
                timings = alternate({k: (lambda f=f: [f(x) for _ in range(calls)]) for k, f in paths.items()},
                                    repeats)
            us = {k: 1e6 * timings.median(k) / calls for k in paths}
            print(f"  {name:16s} ({out_features} x {in_features}) rows {n_rows:4d}: "
                  + "  ".join(f"{k} {v:8.0f}" for k, v in us.items()) + "  us", flush=True)
            rows.append({"name": f"kernels {name} rows {n_rows}", "us": us})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored (0 = all 77k)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--models", default="trained,bench", help="trained, bench or both (comma-separated)")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--kernels", action="store_true", help="only the per-product micro-measurements")
    args = parser.parse_args()
    setup_threads(args.threads)
    results: dict[str, Any] = {"benchmark": "quant", "repeats": args.repeats, "rows": []}
    if args.kernels:
        print(f"quant kernels: microseconds per product, {args.threads} threads")
        results["rows"] += bench_kernels(args.repeats)
        emit(results, args.json)
        return
    if args.compile:  # a fresh cache of compiled steps, so that the compile time printed is a real one
        os.environ["LMFORGE_CACHE"] = tempfile.mkdtemp(prefix="bench_quant_")
        atexit.register(shutil.rmtree, os.environ["LMFORGE_CACHE"], True)
    models = args.models.split(",")
    generator = torch.Generator().manual_seed(1)
    print(f"quant: {args.threads} threads, {args.repeats} rounds")
    if "trained" in models:
        trained = lmforge.load(TRAINED).eval()
        print(f"trained model {TRAINED.relative_to(ROOT)}: {trained.num_parameters():,} parameters")
        if not args.skip_ppl:
            results["rows"] += bench_perplexity(trained, args.ppl_tokens)
        val_tokens = np.memmap(DATASET / "val_000000.bin", dtype=np.uint16, mode="r")
        # (1, prompt_len): held-out text from the end of the split, away from the tokens scored for perplexity
        val = torch.from_numpy(val_tokens[-args.prompt_len:].astype(np.int64))[None]
        results["rows"] += bench_decode("trained", trained, val, args.new_tokens, args.repeats, args.compile)
    if "bench" in models:
        torch.manual_seed(0)
        bench = Transformer(BENCH_MODEL).eval()
        print(f"BENCH_MODEL (random weights): {bench.num_parameters():,} parameters")
        prompt = torch.randint(0, BENCH_MODEL.vocab_size, (1, args.prompt_len), generator=generator)
        results["rows"] += bench_decode("bench", bench, prompt, args.new_tokens, args.repeats, args.compile)
    emit(results, args.json)


if __name__ == "__main__":
    main()
