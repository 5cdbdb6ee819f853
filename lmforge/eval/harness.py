"""`lmforge eval`: a model dir on built-in tasks, JSONL task files and the perplexity of a text.

Choice tasks are scored by log-likelihood: every choice is a continuation of the same context, and the item is
right when the gold choice has the highest summed log-probability (acc) or the highest per character
(acc_norm, lm-evaluation-harness's definition; lmforge.eval.metrics.choice_scores). Generation tasks decode
greedily through the engine (lmforge.infer.generate) in batches and score the text: exact match after
normalization, or chrF and BLEU with sacrebleu. Prompting (plain or chat, k-shot) is lmforge.eval.prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge.config import config_to_dict
from lmforge.errors import ConfigError
from lmforge.eval.config import EvalConfig
from lmforge.eval.prompts import PromptFormat, choose_shots, is_chat_model
from lmforge.tasks.spec import TASKS, TaskExample, TaskSpec

SHOT_POOL = 1000  # k-shot examples are drawn from the first SHOT_POOL train examples (a stable sample)
SHOWN_EXAMPLES = 3  # predictions kept in the report per generation task
ANSWER_BUDGET_SLACK = 8  # generation budget: this + twice the longest accepted answer, in tokens


@dataclass
class EvalTask:
    """A task ready to run: its spec, the examples to score and the pool k-shot examples come from."""

    spec: TaskSpec
    examples: list[TaskExample]
    shot_pool: list[TaskExample]
    source: str  # 'built-in' or the task file's path


def resolve_tasks(cfg: EvalConfig) -> list[EvalTask]:
    """The tasks cfg names (see EvalConfig; an entry may list several, comma-separated), loaded; unknown names and
    malformed files raise one-line errors."""
    from lmforge.tasks.builtin import load_task
    from lmforge.tasks.taskfile import load_task_file

    names = list(cfg.tasks) or ([] if cfg.text else ["all"])
    # '--tasks synonym,arithmetic' arrives as one entry: split it, unless it names a file
    names = [n.strip() for entry in names
             for n in ([entry] if Path(entry).is_file() else entry.split(",")) if n.strip()]
    names = [n for name in names for n in (TASKS if name == "all" else [name])]
    tasks = []
    for name in dict.fromkeys(names):
        if name in TASKS:
            pool = load_task(name, "train", cfg.cache_dir or None, SHOT_POOL) if cfg.shots else []
            tasks.append(EvalTask(TASKS[name], load_task(name, cfg.split, cfg.cache_dir or None, cfg.limit or None),
                                  pool, "built-in"))
        elif (name.endswith(".jsonl") or Path(name).is_file()) and is_preference_file(name):
            items = preference_examples(name)
            spec = TaskSpec(Path(name).stem, "preference", "accuracy", f"preference file {name}")
            tasks.append(EvalTask(spec, items[:cfg.limit or None], [], name))
        elif name.endswith(".jsonl") or Path(name).is_file():
            items = load_task_file(name)
            choice = bool(items[0].choices)
            spec = TaskSpec(Path(name).stem, "choice" if choice else "generate",
                            "accuracy" if choice else "exact_match", f"task file {name}")
            tasks.append(EvalTask(spec, items[:cfg.limit or None], items, name))
        else:
            raise ConfigError(f"unknown task '{name}' (built-in tasks: {', '.join(TASKS)}, all; or a .jsonl "
                              "task file)")
    return tasks


def is_preference_file(path: str) -> bool:
    """Whether a JSONL file's first record is a preference record (chosen/rejected, or ranked responses)."""
    from lmforge.tasks.formats import iter_jsonl

    for _, record in iter_jsonl(path):
        return isinstance(record, dict) and ("chosen" in record or "responses" in record)
    return False


def preference_examples(path: str) -> list[TaskExample]:
    """A preference file's items as examples whose choices are the responses, best first (one user turn each)."""
    from lmforge.errors import DataError
    from lmforge.tasks.preferences import read_preferences

    examples = []
    for item in read_preferences([path]):
        if len(item.prompt) != 1:
            raise DataError(f"{item.where}: eval takes preference prompts of one user turn (this has "
                            f"{len(item.prompt)} turns)")
        examples.append(TaskExample(item.where, item.prompt[0]["content"], [item.responses[0]],
                                    list(item.responses), 0, item.where, Path(path).stem))
    return examples


def _contexts(task: EvalTask, fmt: PromptFormat, shots: int, seed: int) -> list[list[int]]:
    contexts = []
    for example in task.examples:
        chosen = choose_shots(task.shot_pool, example, shots, seed)
        contexts.append(fmt.context_ids(example.prompt, [(s.prompt, s.answers[0]) for s in chosen]))
    return contexts


def evaluate_choice(model: Any, task: EvalTask, fmt: PromptFormat, cfg: EvalConfig) -> dict[str, Any]:
    """acc and acc_norm of a choice task (see the module docstring)."""
    from lmforge.eval.loglik import continuation_logprobs
    from lmforge.eval.metrics import choice_scores, mean

    contexts = _contexts(task, fmt, cfg.shots, cfg.seed)
    requests, truncated = [], 0
    for example, context in zip(task.examples, contexts):
        conts = [fmt.continuation_ids(choice) for choice in example.choices]
        truncated += any(len(context) + len(cont) > model.config.block_size + 1 for cont in conts)
        requests += [(context, cont) for cont in conts]
    scored = iter(continuation_logprobs(model, requests, cfg.batch_size))
    acc, acc_norm = [], []
    for example in task.examples:
        lls = [next(scored).logprob for _ in example.choices]
        hit, hit_norm = choice_scores(lls, example.choices, example.label)
        acc.append(hit)
        acc_norm.append(hit_norm)
    return {"acc": mean(acc), "acc_norm": mean(acc_norm), "value": mean(acc), "truncated": truncated}


def generate_answers(model: Any, tokenizer: Any, contexts: list[list[int]], fmt: PromptFormat,
                     cfg: EvalConfig) -> tuple[list[str], int]:
    """Greedy completions of every context (through the engine, cfg.batch_size sequences at once; else batched
    shortest first), stripped; and how many contexts were cut from the left to leave room for the answer."""
    from lmforge.infer.engine import engine_for
    from lmforge.infer.generate import GenerationConfig, generate

    block_size = model.config.block_size
    keep = block_size - min(cfg.max_new_tokens, block_size // 2)
    truncated = sum(len(c) > keep for c in contexts)
    contexts = [c[-keep:] if len(c) > keep else c for c in contexts]
    eos_id, stop = fmt.stop_rule()
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop=stop)
    engine = engine_for(model, tokenizer, gen_cfg, max_seqs=cfg.batch_size)
    if engine is not None:  # continuous batching: a short answer's row is refilled at once
        completions = engine.generate(contexts, gen_cfg, eos_id=eos_id)
        return [(c.text or "").strip() for c in completions], truncated
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    answers = [""] * len(contexts)
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        completions = generate(model, [contexts[i] for i in batch], gen_cfg, tokenizer, eos_id=eos_id)
        for i, completion in zip(batch, completions):
            answers[i] = (completion.text or "").strip()
    return answers, truncated


def evaluate_generation(model: Any, tokenizer: Any, task: EvalTask, fmt: PromptFormat,
                        cfg: EvalConfig) -> dict[str, Any]:
    """exact_match, or chrF and BLEU, of greedy answers (see the module docstring). Each answer may take
    min(cfg.max_new_tokens, 8 + twice the longest accepted answer's tokens) tokens, as lm-eval caps generation
    per task: enough for any right answer, and no time spent on a model that never stops."""
    from lmforge.eval.metrics import bleu, chrf, exact_match, mean

    answers = [example.answers for example in task.examples]
    longest = max(len(tokenizer.encode(a)) for accepted in answers for a in accepted)
    budget = min(cfg.max_new_tokens, ANSWER_BUDGET_SLACK + 2 * longest)
    contexts = _contexts(task, fmt, cfg.shots, cfg.seed)
    predictions, truncated = generate_answers(model, tokenizer, contexts, fmt, replace(cfg, max_new_tokens=budget))
    result: dict[str, Any] = {"max_new_tokens": budget}
    if task.spec.metric == "chrf":
        result.update(chrf=chrf(predictions, answers), bleu=bleu(predictions, answers))
        result["value"] = result["chrf"]
    else:
        result["exact_match"] = mean([exact_match(p, a) for p, a in zip(predictions, answers)])
        result["value"] = result["exact_match"]
        if task.source != "built-in":
            result["chrf"] = chrf(predictions, answers)
    result["truncated"] = truncated
    result["examples"] = [{"prompt": e.prompt, "prediction": p, "answers": e.answers}
                          for e, p in zip(task.examples[:SHOWN_EXAMPLES], predictions)]
    return result


def task_head_scorer(cfg: EvalConfig, tokenizer: Any, model: Any) -> Any:
    """(built-in task, scorer) when cfg.model carries a GPT-1 task head (lmforge finetune) for a built-in task:
    entailment scores nli and multiple_choice scores mc_define with the head (on `model`, the dir's language model
    already loaded) instead of log-likelihoods."""
    from lmforge.model.heads import load_task_head, read_head_config
    from lmforge.stages.finetune import BUILTIN, builtin_items, head_accuracy

    config = read_head_config(cfg.model)
    if config is None or config["kind"] not in BUILTIN:
        return None
    from lmforge.device import resolve_device

    head_model = load_task_head(cfg.model, model).to(resolve_device(cfg.device))

    def score(task: EvalTask) -> dict[str, Any]:
        items = builtin_items(config["kind"], cfg.split, cfg.cache_dir or None, cfg.limit)
        accuracy = head_accuracy(head_model, tokenizer, items, cfg.batch_size)
        return {"acc": accuracy, "value": accuracy, "scored_by": f"task head ({config['kind']})"}

    return BUILTIN[config["kind"]], score


def preference_scorers(cfg: EvalConfig, tasks: list[EvalTask], tokenizer: Any, model: Any) -> tuple[Any, Any]:
    """(reference model or None, reward model or None) for the preference tasks: the reward model (its head on
    `model`, the dir's language model already loaded) when cfg.model is a reward model dir, the reference when
    cfg.reference is given (its tokenizer must be the model's)."""
    from lmforge.model.heads import read_head_config

    if not any(task.spec.kind == "preference" for task in tasks):
        if cfg.reference:
            raise ConfigError("eval --reference applies to preference sets only (define_pref, translate_pref, "
                              "arithmetic_pref or a preference JSONL file)")
        return None, None
    head = read_head_config(cfg.model)
    if head is not None and head.get("kind") == "reward":
        from lmforge.stages.reward import load_reward_model

        return None, load_reward_model(cfg.model, cfg.device, model)[0]
    if not cfg.reference:
        return None, None
    from lmforge.convert import load_with_tokenizer
    from lmforge.errors import TokenizerMismatchError

    reference, ref_tokenizer = load_with_tokenizer(cfg.reference, cfg.device)
    if ref_tokenizer.fingerprint != tokenizer.fingerprint:
        raise TokenizerMismatchError(f"reference {cfg.reference}: its tokenizer is not the one of {cfg.model}")
    return reference, None


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table: task, n, metric, value, acc_norm, BLEU; then perplexity when measured."""
    lines = [f"{'task':<16} {'n':>5}  {'metric':<12} {'value':>8} {'acc_norm':>8} {'bleu':>7}"]
    for name, result in report["tasks"].items():
        acc_norm = f"{result['acc_norm']:.4f}" if "acc_norm" in result else "-"
        bleu = f"{result['bleu']:.2f}" if "bleu" in result else "-"
        value = f"{result['value']:.2f}" if result["metric"] == "chrf" else f"{result['value']:.4f}"
        lines.append(f"{name:<16} {result['n']:>5}  {result['metric']:<12} {value:>8} {acc_norm:>8} {bleu:>7}")
    ppl = report.get("perplexity")
    if ppl:
        lines.append(f"text {ppl['text']}: {ppl['nats_per_token']:.4f} nats/token, perplexity {ppl['perplexity']:.2f}, "
                     f"{ppl['bits_per_byte']:.4f} bits/byte ({ppl['scored_tokens']} tokens)")
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate cfg.model on cfg.tasks (and cfg.text); print a table, write the JSON report to cfg.out when set
    (atomically), and return the report: {model, format, split, shots, tasks: {name: result}, perplexity?}."""
    from lmforge.io import atomic_write_json

    if not cfg.model:
        raise ConfigError("eval needs a model dir: lmforge eval MODEL_DIR [--tasks NAME,...] [--text FILE]")
    if cfg.out and Path(cfg.out).is_dir():
        raise ConfigError(f"out {cfg.out} is a directory; give a .json file path")
    tasks = resolve_tasks(cfg)
    from lmforge.convert import load_with_tokenizer
    from lmforge.infer.quant import quantize_as_configured

    model, tokenizer = load_with_tokenizer(cfg.model, cfg.device)
    quantize_as_configured(model, cfg)
    chat = is_chat_model(cfg.model) if cfg.chat == "auto" else bool(cfg.chat)
    fmt = PromptFormat(tokenizer, chat)
    started = time.perf_counter()
    report: dict[str, Any] = {"model": cfg.model, "format": fmt.name, "split": cfg.split, "shots": cfg.shots,
                              "tasks": {}}
    head = task_head_scorer(cfg, tokenizer, model)
    reference, reward_model = preference_scorers(cfg, tasks, tokenizer, model)
    for task in tasks:
        task_started = time.perf_counter()
        if task.spec.kind == "preference":
            from lmforge.eval.preference import evaluate_preference

            result = evaluate_preference(model, task, fmt, _contexts(task, fmt, cfg.shots, cfg.seed), cfg,
                                         reference, reward_model)
        elif head is not None and head[0] == task.spec.name and task.source == "built-in":
            result = head[1](task)
        elif task.spec.kind == "choice":
            result = evaluate_choice(model, task, fmt, cfg)
        else:
            result = evaluate_generation(model, tokenizer, task, fmt, cfg)
        seconds = time.perf_counter() - task_started
        key = task.spec.name if task.spec.name not in report["tasks"] else task.source  # two files, one stem
        report["tasks"][key] = {"kind": task.spec.kind, "metric": task.spec.metric,
                                           "n": len(task.examples), **result, "source": task.source,
                                           "seconds": round(seconds, 2)}
        print(f"eval: {task.spec.name}: {len(task.examples)} examples in {seconds:.1f} s", flush=True)
    if cfg.text:
        from lmforge.eval.perplexity import perplexity

        report["perplexity"] = perplexity(model, tokenizer, cfg.text, cfg.text_split == "paragraph", cfg.stride,
                                          cfg.max_text_tokens, cfg.batch_size)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["config"] = config_to_dict(cfg)
    print(format_table(report))
    if cfg.out:
        atomic_write_json(cfg.out, report)
        print(f"eval: report written to {cfg.out}")
    return report
