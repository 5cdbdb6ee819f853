"""Speculative decoding at batch 1: lmforge `generate` against `speculative_generate` (a draft model, prompt lookup)
and transformers' assisted generation on the same weights, one process.

    python bench/bench_speculative.py [--repeats 5] [--threads 1] [--ks 2,3,4,5] [--json results.jsonl]

Target and draft are two lmforge models trained on the same data with the same tokenizer (defaults: the SFT
results' `larger` base model, 6 layers x 256, and the quickstart model, 4 layers x 128; block_size 128). Prompts are
the first --prompt-len tokens of documents of the dataset's held-out split; each contender continues every prompt
one after another at batch 1, greedy, exactly --new-tokens tokens (eos off), and tok/s counts all of them, prefill
included. transformers runs LlamaForCausalLM copies of the same weights: plain `generate`, assisted generation
(`assistant_model`) with its defaults (up to 20 drafts a round, stopped early under 0.4 draft confidence) and with
k drafts a round like ours, and its prompt lookup. Before timing, every contender's ids are compared with plain
lmforge greedy ids. Besides the medians, the best round of each contender is printed: on a shared machine it is
the steadier figure of what the code costs. After the figures, the cost of one pass of each model is measured
alone, to say where the time of a round goes: k draft steps + one target pass over k + 1 tokens, against the
tokens the round yields.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, alternate, emit, setup_threads  # noqa: E402

from lmforge.convert import load_with_tokenizer  # noqa: E402
from lmforge.infer.generate import GenerationConfig, generate  # noqa: E402
from lmforge.infer.speculative import load_draft, speculative_generate  # noqa: E402
from lmforge.model.hf import config_to_hf, to_hf_state_dict  # noqa: E402


def hf_copy(model: Any) -> Any:
    """A transformers LlamaForCausalLM (SDPA, fp32, eval) with the lmforge model's weights."""
    import transformers

    hf = transformers.LlamaForCausalLM._from_config(config_to_hf(model.config, "llama"), attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model, "llama"), strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weights did not map onto the HF model: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def held_out_prompts(data_dir: Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, each the start of a held-out document, spread over the split."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.memmap(data_dir / meta["splits"]["val"]["shards"][0], dtype=meta["dtype"], mode="r")
    starts = np.concatenate([[0], np.nonzero(tokens == meta["eos_id"])[0] + 1])
    starts = starts[starts + length <= len(tokens)]
    chosen = starts[np.linspace(0, len(starts) - 1, count).astype(int)]
    return [tokens[s:s + length].astype(np.int64).tolist() for s in chosen]


def hf_generate(hf: Any, prompt: list[int], new_tokens: int, **kwargs: Any) -> list[int]:
    """transformers greedy generate of exactly new_tokens tokens after one prompt; the new ids."""
    ids = torch.tensor([prompt])
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def set_assistant(hf_draft: Any, drafts: int, confidence: float) -> None:
    """How transformers drafts: `drafts` tokens a round (constant schedule), stopping early under `confidence`
    (0 = never). It reads these from the assistant's own generation config."""
    config = hf_draft.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = drafts, "constant"
    config.assistant_confidence_threshold = confidence


def pass_costs(target: Any, draft: Any, prompt: list[int], ks: list[int], calls: int = 60) -> dict[str, float]:
    """Milliseconds (median of `calls`) of one target decode step, one draft decode step and one target pass over
    k + 1 tokens (the LM head on every position, as verification needs), each through a KV cache already holding
    the prompt and 40 more tokens. The passes are timed in turn, call after call, so drift hits them alike."""
    cases = {"target step": (target, 1), "draft step": (draft, 1)}
    cases.update({f"target pass k={k}": (target, k + 1) for k in ks})
    context = torch.tensor([(prompt * 3)[:len(prompt) + 40]])  # (1, T)
    caches = {id(model): model.new_kv_cache(1, context.shape[1] + max(ks) + 1) for model in (target, draft)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for model in (target, draft):
            model.hidden_states(context, kv_cache=caches[id(model)])
        for _ in range(calls):
            for name, (model, width) in cases.items():
                start = time.perf_counter()
                model.lm_head(model.hidden_states(context[:, :width], kv_cache=caches[id(model)])[0])
                times[name].append(time.perf_counter() - start)
                caches[id(model)].crop(context.shape[1])
    return {name: 1000 * statistics.median(seconds) for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.set_defaults(repeats=5)
    parser.add_argument("--target", default="runs/sft-results/larger/final")
    parser.add_argument("--draft", default="runs/sft-results/quickstart/run/final")
    parser.add_argument("--data", default="runs/sft-results/quickstart/data", help="dataset dir: prompts from val")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=90)
    parser.add_argument("--ks", default="2,3,4,5", help="draft tokens per round, draft model")
    parser.add_argument("--lookup-ks", default="3,5", help="draft tokens per round, prompt lookup")
    parser.add_argument("--lookup-ngram", type=int, default=3, help="longest n-gram prompt lookup matches")
    parser.add_argument("--hf-k", type=int, default=4, help="transformers assisted generation at this k too")
    args = parser.parse_args()
    setup_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    lookup_ks = [int(k) for k in args.lookup_ks.split(",")]

    target, tokenizer = load_with_tokenizer(args.target)
    draft = load_draft(args.draft, target, tokenizer, target_dir=args.target)
    hf_target, hf_draft = hf_copy(target), hf_copy(draft)
    prompts = held_out_prompts(Path(args.data), args.prompts, args.prompt_len)
    new_tokens = min(args.new_tokens, target.config.block_size - args.prompt_len)
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos=False)
    total = len(prompts) * new_tokens
    print(f"speculative decoding: target {args.target} ({target.num_parameters():,} parameters), draft "
          f"{args.draft} ({draft.num_parameters():,}); {len(prompts)} held-out prompts of {args.prompt_len} tokens, "
          f"{new_tokens} new tokens each, greedy, batch 1, {args.threads} threads")

    stats: dict[str, Any] = {}

    def ours_plain() -> list[list[int]]:
        return [generate(target, [p], cfg)[0].token_ids for p in prompts]

    def ours_speculative(name: str, **options: Any) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            completions, stats[name] = speculative_generate(target, prompts, cfg, **options)
            return [c.token_ids for c in completions]
        return run

    def hf(assisted: bool = False, drafts: int = 20, confidence: float = 0.4, **kwargs: Any):
        def run() -> list[list[int]]:
            if assisted:
                set_assistant(hf_draft, drafts, confidence)
                kwargs["assistant_model"] = hf_draft
            return [hf_generate(hf_target, p, new_tokens, **kwargs) for p in prompts]
        return run

    contenders: dict[str, Callable[[], list[list[int]]]] = {"lmforge generate": ours_plain}
    contenders.update({f"lmforge draft model k={k}": ours_speculative(f"lmforge draft model k={k}", draft=draft,
                                                                       num_draft_tokens=k) for k in ks})
    contenders.update({f"lmforge prompt lookup k={k}": ours_speculative(
        f"lmforge prompt lookup k={k}", prompt_lookup=args.lookup_ngram, num_draft_tokens=k) for k in lookup_ks})
    contenders["transformers generate"] = hf()
    contenders["transformers assisted (defaults)"] = hf(assisted=True)
    contenders[f"transformers assisted k={args.hf_k}"] = hf(assisted=True, drafts=args.hf_k, confidence=0.0)
    contenders[f"transformers prompt lookup k={max(lookup_ks)}"] = hf(
        prompt_lookup_num_tokens=max(lookup_ks), max_matching_ngram_size=args.lookup_ngram)

    reference = ours_plain()
    identical = {name: fn() == reference for name, fn in contenders.items()}
    timings = alternate(contenders, args.repeats, warmup=0)  # the identity run above was the warm-up
    plain_s, hf_plain_s = timings.median("lmforge generate"), timings.median("transformers generate")
    results: dict[str, Any] = {"benchmark": "speculative", "target": args.target, "draft": args.draft,
                               "prompts": len(prompts), "prompt_len": args.prompt_len, "new_tokens": new_tokens,
                               "repeats": args.repeats, "rows": []}
    for name in contenders:
        reference_name = "transformers generate" if name.startswith("transformers") else "lmforge generate"
        row = {"name": name, "tok_s": total / timings.median(name), "best_tok_s": total / min(timings.seconds[name]),
               "identical": identical[name],
               "speedup": timings.speedup(name, reference_name), "speedup_over": reference_name,
               "speedup_over_lmforge_generate": timings.speedup(name, "lmforge generate")}
        line = (f"  {name:34s} {row['tok_s']:6.1f} tok/s (best {row['best_tok_s']:6.1f})   "
                f"x{row['speedup']:.2f} over {reference_name:21s} "
                f"(x{row['speedup_over_lmforge_generate']:.2f} over lmforge generate)   same ids: {identical[name]}")
        if name in stats:
            s = stats[name]
            row.update(acceptance=s.acceptance_rate, tokens_per_target_pass=s.tokens_per_target_pass)
            line += f"   acceptance {s.acceptance_rate:.2f}, {s.tokens_per_target_pass:.2f} tokens/target pass"
        print(line)
        results["rows"].append(row)

    costs = pass_costs(target, draft, prompts[0], ks)
    print("  cost of one pass (ms): " + ", ".join(f"{name} {ms:.2f}" for name, ms in costs.items()))
    step = costs["target step"]
    for k in ks:
        name = f"lmforge draft model k={k}"
        per_pass = stats[name].tokens_per_target_pass
        round_ms = k * costs["draft step"] + costs[f"target pass k={k}"]
        # a round yields tokens_per_target_pass tokens (prefill passes aside) for k draft steps and one target pass
        bound = per_pass * step / round_ms
        print(f"  k={k}: a round costs {k} x {costs['draft step']:.2f} + {costs[f'target pass k={k}']:.2f} = "
              f"{round_ms:.2f} ms for {per_pass:.2f} tokens; plain decoding takes {step:.2f} ms a token: "
              f"x{bound:.2f} expected from pass costs alone")
        results["rows"].append({"name": f"pass costs k={k}", "round_ms": round_ms, "tokens_per_round": per_pass,
                                "expected_speedup": bound})
    results["pass_costs_ms"] = costs
    results["plain_tok_s"], results["transformers_plain_tok_s"] = total / plain_s, total / hf_plain_s
    emit(results, args.json)


if __name__ == "__main__":
    main()
