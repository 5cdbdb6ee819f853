"""Medusa decoding against plain `generate`: the same model, greedy, the same ids, at batch 1 and batch 8.

    python bench/bench_medusa.py [--train-seconds 240] [--repeats 5] [--threads 1] [--json results.jsonl]

Heads: trained with `lmforge medusa train` on runs/sft-results/larger/final (6 layers, d_model 256, vocab 4096,
block_size 128) over runs/sft-results/quickstart/data for --train-seconds, written to runs/medusa-bench/ and reused
when present (delete it to retrain). Each head's top-1 / top-5 accuracy on the validation windows is printed from
the run's summary.json.

Decoding: --prompt-len-token prompts from the val split, exactly --new-tokens new tokens (no eos), greedy. At
batch 1 the figure covers --prompts prompts decoded one after another; at batch 8 one batch of 8. Before timing,
Medusa's ids are checked equal to `generate`'s. Besides tokens/s and the ratio (the median over rounds of generate's
time / Medusa's time) it prints why the ratio is what it is: the mean tokens a step yields (accepted length), and
the time of one Medusa step (tree pass, heads, verification, cache moves) against one plain decoding step, both
measured from the same runs with the prefill (timed apart) taken out: ratio ~ accepted length / step cost ratio.
Trees of several sizes are measured: the first n paths of DEFAULT_TREE (--trees; the default tree is all 32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, emit, setup_threads  # noqa: E402

from lmforge.convert import load  # noqa: E402
from lmforge.data.shards import TokenShards  # noqa: E402
from lmforge.infer.config import GenerationConfig  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.infer.medusa import DEFAULT_TREE, FEW_ROWS, build_tree, medusa_generate  # noqa: E402
from lmforge.model.medusa import load_medusa_heads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def train_heads(args: argparse.Namespace, run: Path) -> None:
    from lmforge.config import build_config
    from lmforge.stages.config import MedusaConfig
    from lmforge.stages.medusa import medusa_train

    print(f"medusa: training heads for {args.train_seconds:.0f} s into {run} (reused by later runs)")
    cfg = build_config(MedusaConfig, {
        "model": args.model, "data": {"dataset": args.data, "self_distill": True}, "out_dir": str(run),
        "train": {"max_steps": 0, "time_budget_s": args.train_seconds, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 10, "eval_interval": 0, "eval_batches": 2, "checkpoint_interval": 0,
                  "log_interval": 10, "device": "cpu"}})
    medusa_train(cfg)


def val_prompts(data: str, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens spread over the val split."""
    tokens = TokenShards(data, "val")
    step = (len(tokens) - length) // count
    return [tokens.read(i * step, length).tolist() for i in range(count)]


def per_step_ms(total_s: float, prefill_s: float, steps: int) -> float:
    return 1000 * max(total_s - prefill_s, 0.0) / max(steps, 1)


def decode_row(model, heads, groups: list[list[list[int]]], tree, args: argparse.Namespace) -> dict:
    """Time plain `generate` and `medusa_generate` on the prompt groups (alternating rounds, after checking the ids
    are equal), and the prefill alone, to turn whole-run times into per-step ones."""
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0, eos=False)
    first = GenerationConfig(max_new_tokens=1, temperature=0.0, eos=False)
    seen: list = []

    def plain() -> list:
        return [c.token_ids for group in groups for c in generate(model, group, cfg)]

    def medusa() -> list:
        outs = []
        for group in groups:
            completions, stats = medusa_generate(model, heads, group, cfg, tree=tree)
            outs += [c.token_ids for c in completions]
            seen.append(stats)
        return outs

    def prefill() -> None:
        for group in groups:
            generate(model, group, first)

    identical = plain() == medusa()
    stats = seen[-len(groups):]
    timings = alternate({"generate": plain, "medusa": medusa, "prefill": prefill}, args.repeats)
    tokens = sum(len(group) for group in groups) * args.new_tokens
    steps = sum(s.steps for s in stats)
    return {"medusa_tok_s": tokens / timings.median("medusa"), "generate_tok_s": tokens / timings.median("generate"),
            "ratio": timings.speedup("medusa", "generate"), "identical": identical, "steps": steps,
            "accepted_length": sum(s.step_tokens for s in stats) / sum(s.row_steps for s in stats),
            "head_acceptance": [sum(s.head_accepted[k] for s in stats) / max(1, sum(s.head_proposed[k] for s in stats))
                                for k in range(heads.num_heads)],
            "medusa_step_ms": per_step_ms(timings.median("medusa"), timings.median("prefill"), steps),
            "plain_step_ms": per_step_ms(timings.median("generate"), timings.median("prefill"),
                                         (args.new_tokens - 1) * len(groups))}


@torch.inference_mode()
def step_parts(model, heads, batch_size: int, paths, context: int, repeats: int, calls: int = 20) -> dict:
    """Median ms of the pieces of a step with `context` tokens cached: a plain decoding step (one token and the LM
    head), Medusa's tree pass (root + nodes under the tree mask, and the LM head as medusa_generate applies it) and
    its heads (the tree's depth of them, with top-k)."""
    tree = build_tree(paths, heads.num_heads, model.config.block_size)
    cache = model.new_kv_cache(batch_size, context + tree.size)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=torch.Generator().manual_seed(0))
    model.hidden_states(ids, kv_cache=cache)
    nodes, size = ids[:, :tree.size], tree.size
    positions = (context + tree.depth)[None, :].expand(batch_size, size)
    mask = torch.cat([torch.ones(batch_size, 1, size, context, dtype=torch.bool),
                      tree.mask.expand(batch_size, 1, size, size)], dim=-1)
    hidden = model.hidden_states(ids[:, -1:], kv_cache=cache)[:, -1]
    cache.crop(context)

    def plain() -> None:
        for _ in range(calls):
            model.lm_head(model.hidden_states(ids[:, -1:], kv_cache=cache)[:, -1]).argmax(dim=-1)
            cache.crop(context)

    def tree_pass() -> None:
        for _ in range(calls):
            states = model.hidden_states(nodes, position_ids=positions, attention_mask=mask, kv_cache=cache)
            model.lm_head(states if batch_size * size <= FEW_ROWS else states[:, tree.internal])
            cache.crop(context)

    def heads_pass() -> None:
        for _ in range(calls):
            heads(hidden, tree.max_depth).topk(tree.top_k, dim=-1)

    timings = alternate({"plain_step": plain, "tree_pass": tree_pass, "heads": heads_pass}, repeats)
    return {name: 1000 * timings.median(name) / calls for name in ("plain_step", "tree_pass", "heads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds; figures are medians")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--model", default=str(REPO / "runs/sft-results/larger/final"))
    parser.add_argument("--data", default=str(REPO / "runs/sft-results/quickstart/data"))
    parser.add_argument("--heads", default=str(REPO / "runs/medusa-bench"), help="the heads' run dir")
    parser.add_argument("--train-seconds", type=float, default=240.0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="prompts decoded one by one at batch 1")
    parser.add_argument("--trees", default="4,8,16,32", help="tree sizes: the first n paths of DEFAULT_TREE")
    args = parser.parse_args()
    setup_threads(args.threads)
    run = Path(args.heads)
    if not (run / "final" / "medusa_heads.safetensors").is_file():
        train_heads(args, run)
    summary = json.loads((run / "summary.json").read_text())
    model = load(args.model).eval()
    heads = load_medusa_heads(run / "final", model, base_name=args.model)
    results = {"benchmark": "medusa", "model": args.model, "heads": str(run / "final"), "repeats": args.repeats,
               "train_steps": summary["steps"], "train_tokens": summary["tokens_seen"], "heads_val": {}, "rows": []}
    print(f"medusa: {heads.num_heads} heads trained {summary['steps']} steps ({summary['tokens_seen']:,} tokens); "
          f"validation accuracy per head:")
    for k in range(1, heads.num_heads + 1):
        top1, top5 = summary[f"val_head{k}_top1"], summary[f"val_head{k}_top5"]
        results["heads_val"][f"head{k}"] = {"top1": top1, "top5": top5}
        print(f"  head {k} (token t+{k + 1}): top-1 {top1:.3f}   top-5 {top5:.3f}")

    prompts = val_prompts(args.data, max(8, args.prompts), args.prompt_len)
    print(f"decode: {args.prompt_len}-token prompts, {args.new_tokens} new tokens, greedy, {args.threads} threads")
    for batch_size in (1, 8):
        groups = [[p] for p in prompts[:args.prompts]] if batch_size == 1 else [prompts[:8]]
        for size in [int(n) for n in args.trees.split(",")]:
            row = decode_row(model, heads, groups, DEFAULT_TREE[:size], args)
            parts = step_parts(model, heads, batch_size, DEFAULT_TREE[:size], args.prompt_len + args.new_tokens // 2,
                               args.repeats)
            row.update(name=f"greedy batch {batch_size} tree {size}", batch_size=batch_size, tree_nodes=size,
                       parts_ms=parts)
            results["rows"].append(row)
            print(f"  batch {batch_size}, tree of {size:2d} nodes: medusa {row['medusa_tok_s']:7.1f} tok/s   generate "
                  f"{row['generate_tok_s']:7.1f} tok/s   ratio {row['ratio']:.2f}x   identical ids: {row['identical']}")
            print(f"      accepted length {row['accepted_length']:.2f} tokens/step ({row['steps']} steps), per head "
                  + " ".join(f"{r:.2f}" for r in row["head_acceptance"])
                  + f"; step {row['medusa_step_ms']:.2f} ms vs plain {row['plain_step_ms']:.2f} ms (x"
                  f"{row['medusa_step_ms'] / row['plain_step_ms']:.2f}): expected ratio ~ "
                  f"{row['accepted_length'] * row['plain_step_ms'] / row['medusa_step_ms']:.2f}")
            print(f"      pieces: plain step {parts['plain_step']:.2f} ms, tree pass {parts['tree_pass']:.2f} ms (x"
                  f"{parts['tree_pass'] / parts['plain_step']:.2f}), heads {parts['heads']:.2f} ms (x"
                  f"{parts['heads'] / parts['plain_step']:.2f})")
    emit(results, args.json)


if __name__ == "__main__":
    main()
