"""Decoding speed: llama.cpp (node-llama-cpp's prebuilt CPU build) on lmforge's GGUF exports, beside lmforge generate.

    python bench/bench_llamacpp.py [--model runs/sft-results/larger/final] [--bench-model] [--threads 2]
                                   [--repeats 5] [--types f32,q8_0,q4_0] [--no-compile] [--json results.jsonl]

The model (a model dir, and with --bench-model also common.BENCH_MODEL with random weights, saved with the model
dir's tokenizer) is exported with lmforge.model.gguf.export_gguf to each GGUF type. Timed, alternately round by
round (common.alternate): greedy decoding at batch 1 of exactly --new-tokens tokens after a --prompt-len-token
prompt (prefill included, as a user sees it), by lmforge `generate` (eager, and compiled ahead of time with
GenerationConfig(compile=True): its first call, compile or cache load, is timed apart) and by llama.cpp on each
file (one node process per file, `threads` threads, llama.cpp's default f16 KV cache unless --kv-type F32,
flash attention off; its time is measured in Python around the request, so ~1 ms of pipe and JSON is in it).
The ratio is llama.cpp f32 time / lmforge time (above 1: lmforge faster), the median of each round's pair.
Beside each figure: how many greedy ids agree with lmforge eager's, and for llama.cpp, the largest difference of
next-token probabilities from lmforge's along prompt + generated ids.

On a machine whose cores other processes also use (the load average is printed), prefer --threads 1: ggml's CPU
threads meet at a spinning barrier after every operation, so when one of them is descheduled the others spin
until it runs again, and llama.cpp's decoding at 2 threads on 2 busy cores fell to a few tokens/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
from common import BENCH_MODEL, add_common_args, alternate, emit, setup_threads  # noqa: E402
from llamacpp import NODE_LLAMA_CPP_VERSION, LlamaCpp, install_node_llama_cpp  # noqa: E402

from lmforge.convert import load_with_tokenizer  # noqa: E402
from lmforge.infer.generate import GenerationConfig, generate  # noqa: E402
from lmforge.model.gguf import export_gguf  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

DEFAULT_MODEL = REPO / "runs" / "sft-results" / "larger" / "final"


def ours_generate(model: Transformer, prompt: torch.Tensor, new_tokens: int, compile: bool = False) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos=False, compile=compile)
    return generate(model, prompt, cfg)[0].token_ids


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two greedy runs share (they part at the first near-tie rounding decides)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_model(label: str, model_dir: Path, args: argparse.Namespace, node_dir: Path, work: Path) -> dict:
    model, _ = load_with_tokenizer(model_dir)
    cfg = model.config
    new_tokens = min(args.new_tokens, cfg.block_size - args.prompt_len - 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    print(f"{label}: {model.num_parameters():,} parameters, {args.prompt_len}-token prompt, {new_tokens} new tokens, "
          f"greedy, batch 1, {args.threads} threads; llama.cpp KV cache {args.kv_type}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    reference = ours_generate(model, prompt, new_tokens)
    contenders = {"lmforge": lambda: ours_generate(model, prompt, new_tokens)}
    row = {"model": label, "config": cfg.to_dict(), "new_tokens": new_tokens, "prompt_len": args.prompt_len,
           "kv_type": args.kv_type, "load_average": os.getloadavg()[0], "contenders": {}}
    notes = {"lmforge": "(reference ids)"}
    if args.compile:
        start = time.perf_counter()
        compiled_ids = ours_generate(model, prompt, new_tokens, compile=True)
        first_s = time.perf_counter() - start
        contenders["lmforge (compiled)"] = lambda: ours_generate(model, prompt, new_tokens, compile=True)
        notes["lmforge (compiled)"] = (f"same ids {agreeing_prefix(compiled_ids, reference)}/{new_tokens}; first "
                                       f"call (compile or cache load) {first_s:.0f} s")
        row["compile_first_call_s"] = first_s
    servers = []
    context = cfg.block_size  # a context that the evaluated ids fill up would make node-llama-cpp shift it
    full = prompt[0].tolist() + reference
    with torch.no_grad():
        ours_probs = model(torch.tensor([full]))[0].double().softmax(-1)
    for file_type in args.types:
        path = export_gguf(model_dir, work / f"{label}-{file_type}.gguf", file_type=file_type)
        server = LlamaCpp(node_dir, threads=args.threads)
        servers.append(server)
        server.load(path, context_size=context, vocab_size=cfg.vocab_size, kv_type=args.kv_type)
        ids, _ = server.generate(prompt[0].tolist(), new_tokens)
        prob_diff = (server.logits(full).softmax(-1) - ours_probs).abs().max().item()
        name = f"llama.cpp {file_type}"
        contenders[name] = lambda server=server: server.generate(prompt[0].tolist(), new_tokens)
        notes[name] = (f"same ids {agreeing_prefix(ids, reference)}/{new_tokens}; max |prob diff| {prob_diff:.1e}; "
                       f"file {path.stat().st_size / 2**20:.1f} MiB")
        row["contenders"][name] = {"prob_diff": prob_diff, "same_ids": agreeing_prefix(ids, reference),
                                   "file_mib": path.stat().st_size / 2**20}
    try:
        timings = alternate(contenders, args.repeats)
    finally:
        for server in servers:
            server.close()
    baseline = "llama.cpp f32" if "llama.cpp f32" in contenders else None
    for name in contenders:
        tok_s = new_tokens / timings.median(name)
        ratio = timings.speedup(name, baseline) if baseline and name.startswith("lmforge") else None
        print(f"  {name:20s} {tok_s:8.1f} tok/s" + (f"   ratio {ratio:.2f}x" if ratio else " " * 15)
              + f"   {notes.get(name, '')}")
        row["contenders"].setdefault(name, {}).update(tok_s=tok_s, ratio_vs_llamacpp_f32=ratio)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.set_defaults(threads=2)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a LLaMA-style model dir with its tokenizer")
    parser.add_argument("--bench-model", action="store_true",
                        help="also common.BENCH_MODEL (33.6M parameters, random weights)")
    parser.add_argument("--types", default="f32,q8_0,q4_0", help="GGUF types for llama.cpp, comma-separated")
    parser.add_argument("--kv-type", default="F16", choices=("F16", "F32"), help="llama.cpp's KV cache type")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip generate(compile=True)")
    args = parser.parse_args()
    args.types = [t for t in args.types.split(",") if t]
    setup_threads(args.threads)
    node_dir, why = install_node_llama_cpp()
    if node_dir is None:
        sys.exit(f"bench_llamacpp: {why}")
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    results = {"benchmark": "llamacpp_decode", "repeats": args.repeats, "threads": args.threads,
               "node_llama_cpp": NODE_LLAMA_CPP_VERSION, "node": node, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench_llamacpp_") as tmp:
        work = Path(tmp)
        results["rows"].append(bench_model(Path(args.model).name, Path(args.model), args, node_dir, work))
        if args.bench_model:
            _, tokenizer = load_with_tokenizer(args.model)
            torch.manual_seed(0)
            Transformer(BENCH_MODEL).save(work / "bench-model")
            tokenizer.save(work / "bench-model")  # ids beyond its vocabulary go into the GGUF as unused tokens
            results["rows"].append(bench_model("BENCH_MODEL", work / "bench-model", args, node_dir, work))
    emit(results, args.json)


if __name__ == "__main__":
    main()
