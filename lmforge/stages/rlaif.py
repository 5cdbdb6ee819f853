"""`lmforge rlaif`: label pairs of a policy's sampled responses with an AI judge, as preference JSONL.

1. Prompts: the questions of the built-in preference sets (data.train = builtin) and JSONL files of {"prompt": text
   or chat messages}; at most `limit`, taken in turn from each source so they spread over the sets.
2. Sampling: the policy samples `samples` responses per chat-rendered prompt through the engine's group sampling
   (lmforge.infer.rollout), each prompt's group drawn by a generator seeded from (seed, the prompt's position):
   a rerun writes the same file. A prompt whose samples are all the same (or empty) makes no pair: it is skipped.
3. Judging: the judge (lmforge.stages.judge: a reward model, or a model dir reading the rubric with both orders
   averaged) ranks each prompt's distinct responses.
4. Output: {prompt, chosen, rejected} (two responses) or {prompt, responses: [best, ..., worst]}, each with
   judge_margin (the judge's mean preference of each response over those ranked below it) and source "rlaif";
   `lmforge reward` and `lmforge dpo` read the file. The report is printed, returned and written to OUT.report.json.
5. Agreement (agreement_limit > 0): the judge also labels the true pairs of each built-in preference set (test
   split), shown in a stable random order (the right answer is A half the time), and the report gives the share it
   ranks as the label does, per set and overall; for a rubric judge also each single order's share (the chosen
   response shown as A, then as B) and how often it answers A, which make its position bias visible.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.rollout import sample_group
from lmforge.stages.config import DEFAULT_RUBRIC, PromptDataSection, RLAIFConfig
from lmforge.stages.judge import Judge, judge_kind, judge_pairs, load_judge, order_verdicts, rank_responses
from lmforge.stages.rollouts import Prompt, read_prompts, rollout_seed, tokenize_prompts
from lmforge.tasks.preferences import PreferenceItem, builtin_preferences, to_preference_record
from lmforge.tasks.spec import PREFERENCE_TASKS, TASKS, stable_hash

__all__ = ["RLAIFConfig", "rlaif", "load_rlaif_prompts", "sample_responses", "judge_agreement"]


def check_config(cfg: RLAIFConfig) -> str:
    """Raise a ConfigError for a bad value; return the rubric (cfg.rubric or the text of cfg.rubric_file)."""
    if not cfg.policy:
        raise ConfigError("rlaif needs a policy model dir: lmforge rlaif POLICY --judge JUDGE_DIR")
    if not cfg.judge:
        raise ConfigError("rlaif needs a judge: --judge MODEL_DIR (a model read with the rubric, or a reward model)")
    checks = [("limit", cfg.limit >= 0, ">= 0 (0 = all)"), ("samples", cfg.samples >= 2, "at least 2 (a pair)"),
              ("max_new_tokens", cfg.max_new_tokens >= 1, "at least 1"),
              ("temperature", cfg.temperature > 0, "> 0 (responses are sampled)"),
              ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"), ("agreement_limit", cfg.agreement_limit >= 0, ">= 0"),
              ("batch_size", cfg.batch_size >= 1, "at least 1")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: expected {expected}")
    if cfg.data.per_task_limit < 0:
        raise ConfigError(f"data.per_task_limit={cfg.data.per_task_limit}: expected >= 0 (0 = all)")
    if not cfg.data.train:
        raise ConfigError("data.train: give JSONL prompt files or builtin")
    unknown = [name for name in cfg.data.builtin_tasks if name not in TASKS]
    if unknown:
        raise ConfigError(f"data.builtin_tasks: unknown task {unknown[0]!r} (lmforge tasks list shows them)")
    if not cfg.rubric_file:
        return cfg.rubric
    if cfg.rubric != DEFAULT_RUBRIC:
        raise ConfigError("give rubric or rubric_file, not both")
    path = Path(cfg.rubric_file)
    if not path.is_file():
        raise ConfigError(f"rubric_file {path}: not found")
    try:
        rubric = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"rubric_file {path}: not readable as UTF-8 text ({exc})") from None
    if not rubric.strip():
        raise ConfigError(f"rubric_file {path}: empty")
    return rubric


def load_rlaif_prompts(data: PromptDataSection, split: str, limit: int) -> list[Prompt]:
    """At most `limit` prompts (0 = all), taken in turn from each JSONL file and each built-in task."""
    from lmforge.tasks.builtin import load_task

    sources = []
    for name in data.train:
        if name != "builtin":
            sources.append(read_prompts(name))
            continue
        cap = min([n for n in (data.per_task_limit, limit) if n > 0], default=None)  # no task gives more
        for task in data.builtin_tasks or PREFERENCE_TASKS:
            sources.append([Prompt(f"{task} {split} #{i}", [{"role": "user", "content": example.prompt}], "")
                            for i, example in enumerate(load_task(task, split, data.cache_dir, cap))])
    interleaved = [source[i] for i in range(max(map(len, sources), default=0)) for source in sources
                   if i < len(source)]
    prompts = interleaved[:limit] if limit else interleaved
    for prompt in prompts:
        if prompt.messages[-1].get("role") != "user":
            raise DataError(f"{prompt.where}: the prompt must end with a user turn, not "
                            f"{prompt.messages[-1].get('role')!r}")
    if not prompts:
        raise DataError(f"data.train {', '.join(data.train)}: no prompts")
    return prompts


def distinct_responses(texts: Sequence[str]) -> list[str]:
    """The texts that can be compared: non-empty, each once, in sampling order."""
    return list(dict.fromkeys(text for text in texts if text.strip()))


def sample_responses(model: Any, tokenizer: Any, prompts: Sequence[Prompt], samples: int,
                     generation: GenerationConfig, seed: int) -> list[list[str]]:
    """`samples` decoded responses (without the stop token) of each tokenized prompt; prompt i's drawn by a
    generator seeded with rollout_seed(seed, i)."""
    device = next(model.parameters()).device
    stop_ids = tuple(tokenizer.chat_stop_ids)
    groups = []
    for position, prompt in enumerate(prompts):
        generator = torch.Generator(device).manual_seed(rollout_seed(seed, position))
        completions = sample_group(model, prompt.ids, samples, generation, stop_ids, generator)
        groups.append([tokenizer.decode(c[:-1] if c and c[-1] in stop_ids else c, skip_special_tokens=True)
                       for c in completions])
    return groups


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def judge_agreement(judge: Judge, items: Sequence[PreferenceItem]) -> dict[str, dict[str, Any]]:
    """How often the judge ranks true pairs (responses [chosen, rejected]) as their labels do, per set (the first
    word of an item's `where`) and overall. A tie counts as a disagreement. Each pair is shown in a stable random
    order; a rubric judge also reports the single orders: chosen_as_a (chosen shown as A, the verdict says A),
    chosen_as_b (shown as B, it says B) and says_a (the share of single-order verdicts that say A)."""
    flipped = [stable_hash(f"rlaif-agreement:{item.where}") < 0.5 for item in items]
    prompts = [item.prompt for item in items]
    chosen, rejected = [item.responses[0] for item in items], [item.responses[1] for item in items]
    hits: dict[str, list[float]] = {}  # per pair: 1.0 agrees, 0.0 does not
    if judge.kind == "reward":
        a = [r if flip else c for c, r, flip in zip(chosen, rejected, flipped)]
        b = [c if flip else r for c, r, flip in zip(chosen, rejected, flipped)]
        prefs = judge_pairs(judge, prompts, a, b)
        hits["agreement"] = [(-p if flip else p) > 0 for p, flip in zip(prefs, flipped)]
    else:
        forward = order_verdicts(judge, prompts, chosen, rejected)  # chosen shown as A
        backward = order_verdicts(judge, prompts, rejected, chosen)  # chosen shown as B
        presented = [-bwd if flip else fwd for fwd, bwd, flip in zip(forward, backward, flipped)]
        averaged = [(fwd - bwd) / 2 for fwd, bwd in zip(forward, backward)]
        hits["agreement"] = [p > 0 for p in (averaged if judge.both_orders else presented)]
        hits["chosen_as_a"] = [fwd > 0 for fwd in forward]
        hits["chosen_as_b"] = [bwd < 0 for bwd in backward]
        hits["says_a"] = [((fwd > 0) + (bwd > 0)) / 2 for fwd, bwd in zip(forward, backward)]
    names = set(item.where.split()[0] for item in items)
    sets = sorted(names, key=lambda name: (PREFERENCE_TASKS.index(name) if name in PREFERENCE_TASKS else
                                           len(PREFERENCE_TASKS), name))
    report = {}
    for name in [*sets, "overall"]:
        rows = [i for i, item in enumerate(items) if name == "overall" or item.where.split()[0] == name]
        report[name] = {"pairs": len(rows), **{key: _mean([values[i] for i in rows]) for key, values in hits.items()}}
    return report


def format_agreement(agreement: dict[str, dict[str, Any]]) -> str:
    single = "chosen_as_a" in agreement["overall"]
    lines = [f"{'set':<16} {'pairs':>6} {'agree':>7}" + (f" {'chosen=A':>9} {'chosen=B':>9} {'says A':>7}"
                                                          if single else "")]
    for name, row in agreement.items():
        line = f"{name:<16} {row['pairs']:>6} {row['agreement']:>7.3f}"
        if single:
            line += f" {row['chosen_as_a']:>9.3f} {row['chosen_as_b']:>9.3f} {row['says_a']:>7.3f}"
        lines.append(line)
    return "\n".join(lines)


def check_outputs(out: Path, inputs: Sequence[str] = ()) -> Path:
    """The report path next to `out`, after refusing an `out` that is one of the command's input files, is not a
    JSONL file, or whose report path is a directory."""
    from lmforge.tasks.commands import check_output_file

    for name in inputs:
        if name and name != "builtin" and Path(name).resolve() == out.resolve():
            raise ConfigError(f"out {out} is one of this command's inputs ({name}); choose another path")
    check_output_file(out)
    report = Path(f"{out}.report.json")
    if report.is_dir():
        raise DataError(f"{report} is a directory; the report is written there (choose another out)")
    return report


def rlaif(cfg: RLAIFConfig) -> dict[str, Any]:
    """Sample, judge and write the preference file (see the module docstring); returns the report."""
    from lmforge.convert import load_with_tokenizer
    from lmforge.io import atomic_write_json
    from lmforge.tasks.formats import write_jsonl

    started = time.perf_counter()
    rubric = check_config(cfg)
    out = Path(cfg.out)
    report_path = check_outputs(out, [*cfg.data.train, *cfg.data.val, cfg.rubric_file])
    judge_kind(cfg.judge)  # a bad judge dir fails before the sampling, not after
    prompts = load_rlaif_prompts(cfg.data, cfg.split, cfg.limit)

    policy, tokenizer = load_with_tokenizer(cfg.policy, cfg.device)
    prompts, too_long = tokenize_prompts(prompts, tokenizer, cfg.data.system_prompt, policy.config.block_size - 1)
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    print(f"rlaif: sampling {cfg.samples} responses to each of {len(prompts):,} prompts with {cfg.policy}",
          flush=True)
    groups = [distinct_responses(texts) for texts in
              sample_responses(policy, tokenizer, prompts, cfg.samples, generation, cfg.seed)]
    del policy  # the judge needs the memory
    kept = [(prompt, group) for prompt, group in zip(prompts, groups) if len(group) >= 2]
    if not kept:
        raise DataError(f"rlaif: no pairs: the samples of all {len(prompts):,} prompts were identical or empty "
                        f"({too_long:,} more prompts too long for the policy); raise temperature or max_new_tokens")

    judge = load_judge(cfg.judge, cfg.device, rubric, cfg.both_orders, cfg.batch_size)
    print(f"rlaif: judging {len(kept):,} prompts with {cfg.judge} ({judge.description})", flush=True)
    rankings = rank_responses(judge, [p.messages for p, _ in kept], [g for _, g in kept])
    records = []
    for (prompt, group), (order, margin) in zip(kept, rankings):
        item = PreferenceItem(prompt.where, prompt.messages, [group[i] for i in order])
        records.append({**to_preference_record(item), "judge_margin": margin, "source": "rlaif"})
    agreement = None
    if cfg.agreement_limit:
        items = builtin_preferences("test", cfg.data.cache_dir, PREFERENCE_TASKS, cfg.agreement_limit)
        agreement = judge_agreement(judge, items)
    write_jsonl(out, records)

    report: dict[str, Any] = {
        "policy": cfg.policy, "judge": cfg.judge, "judge_kind": judge.description,
        "out": str(out), "prompts": len(prompts) + too_long, "samples": cfg.samples, "records": len(records),
        "pairs": sum(len(group) * (len(group) - 1) // 2 for _, group in kept),
        "skipped_identical": len(prompts) - len(kept), "skipped_too_long": too_long,
        "mean_margin": sum(r["judge_margin"] for r in records) / len(records),
        "judge_prompts_cut": judge.cut_prompts, "agreement": agreement,
        "seconds": round(time.perf_counter() - started, 2)}
    atomic_write_json(report_path, report)
    skipped = report["skipped_identical"] + too_long
    print(f"rlaif: {len(records):,} records ({report['pairs']:,} pairs) written to {out}; {skipped:,} prompts "
          f"skipped ({report['skipped_identical']:,} with identical or empty samples, {too_long:,} too long); "
          f"mean judge margin {report['mean_margin']:+.4f}")
    if judge.cut_prompts:
        print(f"rlaif: {judge.cut_prompts:,} judge prompts were longer than the judge's context and lost their "
              "beginning (the rubric)")
    if agreement:
        print(f"rlaif: judge agreement with the built-in preference labels (test split)\n"
              f"{format_agreement(agreement)}")
    print(f"rlaif: report written to {report_path}")
    return report
