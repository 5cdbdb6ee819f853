"""Decoding speed and prefill latency: lmforge `generate` against transformers `generate`, same weights, one process.

    python bench/bench_decode.py [--repeats 5] [--threads 2] [--compile] [--json results.jsonl]

Decoding: greedy, 32-token prompts, exactly 128 new tokens (no eos), at batch 1 and batch 8; new tokens/s counts
every row's tokens (batch x 128 / seconds), prefill included, as a user of `generate` sees it. transformers runs
`generate(do_sample=False)` with its default dynamic KV cache. Prefill: time to the first new token of a 512-token
prompt (generate with max_new_tokens=1). Before timing, both produce the same token ids (printed and recorded).
With --compile, lmforge's `generate(compile=True)` runs too (lmforge.infer.compiled: the decode step compiled
ahead of time); its one-off compile time is measured and reported apart from the figures.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_MODEL, add_common_args, alternate, build_pair, emit, setup_threads  # noqa: E402

from lmforge.infer import compiled  # noqa: E402
from lmforge.infer.generate import GenerationConfig, generate  # noqa: E402


def hf_generate(hf, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers greedy generate of exactly new_tokens tokens; returns the new ids (B, new_tokens)."""
    out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompts.shape[1]:]


def ours_generate(model, prompts: torch.Tensor, new_tokens: int, compile: bool = False) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos=False, compile=compile)
    completions = generate(model, prompts, cfg)
    return torch.tensor([c.token_ids for c in completions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--compile", action="store_true",
                        help="also time generate(compile=True): the decode step compiled ahead of time")
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.compile:  # a fresh cache of compiled steps, so that the compile time printed is a real one
        os.environ["LMFORGE_CACHE"] = tempfile.mkdtemp(prefix="bench_decode_")
        atexit.register(shutil.rmtree, os.environ["LMFORGE_CACHE"], True)
    ours, hf = build_pair()
    ours.eval()
    hf.eval()
    generator = torch.Generator().manual_seed(1)
    results = {"benchmark": "decode", "model": BENCH_MODEL.to_dict(), "repeats": args.repeats, "rows": []}
    print(f"decode: {ours.num_parameters():,} parameters, {args.prompt_len}-token prompts, {args.new_tokens} new "
          f"tokens, greedy, {args.threads} threads")
    for batch_size in (1, 8):
        prompts = torch.randint(0, BENCH_MODEL.vocab_size, (batch_size, args.prompt_len), generator=generator)
        reference = hf_generate(hf, prompts, args.new_tokens)
        same = torch.equal(ours_generate(ours, prompts, args.new_tokens), reference)
        contenders = {"lmforge": lambda: ours_generate(ours, prompts, args.new_tokens),
                      "transformers": lambda: hf_generate(hf, prompts, args.new_tokens)}
        if args.compile:  # the first call compiles (timed here, not in the figures); later calls reuse it
            start = time.perf_counter()
            same_compiled = torch.equal(ours_generate(ours, prompts, args.new_tokens, compile=True), reference)
            compile_s = time.perf_counter() - start
            compiled._compiled.clear()  # as in a new process: the step comes from the on-disk cache
            start = time.perf_counter()
            compiled.compiled_decode_step(ours, batch_size, compiled.cache_length(
                args.prompt_len, args.new_tokens, BENCH_MODEL.block_size))
            load_s = time.perf_counter() - start
            contenders["lmforge (compiled)"] = lambda: ours_generate(ours, prompts, args.new_tokens, compile=True)
        timings = alternate(contenders, args.repeats)
        tokens = batch_size * args.new_tokens
        hf_tps = tokens / timings.median("transformers")
        for name in [n for n in contenders if n != "transformers"]:
            ours_tps, ratio = tokens / timings.median(name), timings.speedup(name, "transformers")
            identical = same_compiled if "compiled" in name else same
            print(f"  batch {batch_size}: {name:18s} {ours_tps:8.1f} tok/s   transformers {hf_tps:8.1f} tok/s   "
                  f"ratio {ratio:.2f}x   identical ids: {identical}"
                  + (f"   (compiled once in {compile_s:.0f} s; a new process loads it in {load_s:.1f} s)"
                     if "compiled" in name else ""))
            row = {"name": f"decode batch {batch_size}" + (" (compiled)" if "compiled" in name else ""),
                   "lmforge_tok_s": ours_tps, "transformers_tok_s": hf_tps, "ratio": ratio, "identical": identical}
            if "compiled" in name:
                row.update(compile_s=compile_s, load_s=load_s)
            results["rows"].append(row)

    prompt = torch.randint(0, BENCH_MODEL.vocab_size, (1, args.prefill_len), generator=generator)
    same = torch.equal(ours_generate(ours, prompt, 1), hf_generate(hf, prompt, 1))
    timings = alternate({"lmforge": lambda: ours_generate(ours, prompt, 1),
                         "transformers": lambda: hf_generate(hf, prompt, 1)}, args.repeats)
    ours_ms, hf_ms = 1000 * timings.median("lmforge"), 1000 * timings.median("transformers")
    ratio = timings.speedup("lmforge", "transformers")
    print(f"  prefill {args.prefill_len} tokens: lmforge {ours_ms:7.1f} ms   transformers {hf_ms:7.1f} ms   "
          f"ratio {ratio:.2f}x   identical first token: {same}")
    results["rows"].append({"name": f"prefill {args.prefill_len}", "lmforge_ms": ours_ms, "transformers_ms": hf_ms,
                            "ratio": ratio, "identical": same})
    emit(results, args.json)


if __name__ == "__main__":
    main()
