"""Serving throughput: 64 requests through the engine (continuous batching, paged KV cache) against `generate` one
request at a time, on the same model, in one process.

    python bench/bench_engine.py [--requests 64] [--repeats 1] [--model DIR] [--json results.jsonl]

The requests' prompt and output lengths are drawn (seed 0) from log-normal distributions shaped like ShareGPT's
(long-tailed prompts and replies; medians 60 and 100 tokens here, a CPU-sized scale), clipped to fit the
model's context. Greedy, no eos: every request generates exactly its drawn number of tokens in both contenders,
and their ids are compared. The engine gets all requests at once (as a server under load would); the baseline runs
`generate` on each prompt alone. Throughput = generated tokens / seconds. The engine's KV memory: blocks used at
peak against blocks allocated, and against the static cache a batch of the same requests would need
(requests x longest sequence).

The default model is LLaMA-style (d_model 256, 6 layers, 4 query / 2 key-value heads, vocabulary 4096, context
1024; `--size tiny`: d_model 128, 4 layers, the quickstart's shape) with random weights: throughput does not
depend on what the weights say when lengths are fixed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, emit, setup_threads  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.generate import GenerationConfig, generate  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402

# two sizes: "small" (6.5M parameters, the default) and "tiny" (the quickstart's shape, 1.8M parameters)
ENGINE_MODELS = {
    "small": ModelConfig(vocab_size=4096, block_size=1024, n_layer=6, n_head=4, n_kv_head=2, d_model=256),
    "tiny": ModelConfig(vocab_size=4096, block_size=1024, n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                        d_ff=384),
}
ENGINE_MODEL = ENGINE_MODELS["small"]


def sharegpt_like(n: int, context: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (prompt_len, output_len) pairs from log-normal distributions (medians 60 and 100 tokens, sigma 0.9 and
    0.8, ShareGPT's long tails at a CPU scale), each clipped to [4, 400] and to fit `context` together."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.exp(torch.log(torch.tensor(60.0)) + 0.9 * torch.randn(n, generator=g)).round().clamp(4, 400)
    outputs = torch.exp(torch.log(torch.tensor(100.0)) + 0.8 * torch.randn(n, generator=g)).round().clamp(4, 400)
    pairs = []
    for p, o in zip(prompts.int().tolist(), outputs.int().tolist()):
        pairs.append((min(p, context - 8), min(o, context - min(p, context - 8))))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--model", default=None, help="an lmforge model dir (default: a random --size model)")
    parser.add_argument("--size", choices=sorted(ENGINE_MODELS), default="small",
                        help="the random model's shape: small (6.5M parameters) or tiny (1.8M)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    args = parser.parse_args()
    setup_threads(args.threads)
    torch.manual_seed(0)
    model = (Transformer.from_dir(args.model) if args.model else Transformer(ENGINE_MODELS[args.size])).eval()
    cfg = model.config
    lengths = sharegpt_like(args.requests, cfg.block_size)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (p,), generator=g).tolist() for p, _ in lengths]
    configs = [GenerationConfig(max_new_tokens=o, temperature=0.0, eos=False) for _, o in lengths]
    total = sum(o for _, o in lengths)
    print(f"{args.requests} requests: prompts {sum(p for p, _ in lengths)} tokens (median "
          f"{sorted(p for p, _ in lengths)[len(lengths) // 2]}), outputs {total} tokens (median "
          f"{sorted(o for _, o in lengths)[len(lengths) // 2]}); model {model.num_parameters() / 1e6:.1f}M params",
          flush=True)

    def one_by_one() -> list[list[int]]:
        return [generate(model, [p], c)[0].token_ids for p, c in zip(prompts, configs)]

    def engine_run() -> tuple[list[list[int]], dict]:
        engine = Engine(model, max_seqs=args.requests, block_size=args.block_size,
                        max_batch_tokens=args.max_batch_tokens)
        ids = [engine.add_request(p, c) for p, c in zip(prompts, configs)]
        engine.run_until_done(ids)
        return [engine.completions(r)[0].token_ids for r in ids], engine.stats()

    generate(model, [prompts[0]], configs[0])  # warm up both paths
    engine_run()
    alone_s, engine_s, stats = [], [], {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference = one_by_one()
        alone_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched, stats = engine_run()
        engine_s.append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(reference, batched))
    alone, engine = min(alone_s), min(engine_s)
    static_blocks = args.requests * -(-max(p + o for p, o in lengths) // args.block_size)
    result = {
        "bench": "engine", "model": args.model or args.size, "params": model.num_parameters(),
        "threads": args.threads, "requests": args.requests, "generated_tokens": total,
        "one_by_one_tok_s": total / alone, "engine_tok_s": total / engine, "ratio": alone / engine,
        "same_ids": f"{same}/{args.requests}", "kv_blocks_allocated": stats["kv_blocks"],
        "kv_blocks_peak": stats["kv_blocks_peak"], "static_cache_blocks": static_blocks,
        "kv_mib_allocated": stats["kv_bytes_allocated"] / 2**20, "kv_mib_peak": stats["kv_bytes_peak"] / 2**20,
        "preemptions": stats["preemptions"], "engine_steps": stats["steps"],
    }
    print(f"one by one: {total / alone:.1f} tok/s ({alone:.1f} s); engine: {total / engine:.1f} tok/s "
          f"({engine:.1f} s, {stats['steps']} steps); ratio {alone / engine:.2f}x; same ids {same}/{args.requests}")
    print(f"KV cache: {stats['kv_blocks_peak']} of {stats['kv_blocks']} blocks used at peak "
          f"({result['kv_mib_peak']:.1f} of {result['kv_mib_allocated']:.1f} MiB); a static cache for the same "
          f"batch needs {static_blocks} blocks; {stats['preemptions']} preemptions")
    emit(result, args.json)


if __name__ == "__main__":
    main()
