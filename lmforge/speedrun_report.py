"""The speedrun's report: out_dir/report.md, with its plots in out_dir/report/, written atomically.

Sections: the stages (budget, wall time, what each achieved or why it was skipped), pretraining (validation bits
per byte), the loss curves of every training stage (from each run dir's metrics.jsonl), each built-in task's test
metric for the base model (3-shot) and after SFT, DPO and GRPO (0-shot chat), the preference accuracy, sample
chats (test prompts answered greedily through the engine by the base and the final model) and the settings.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from lmforge.io import atomic_write_bytes, atomic_write_text

COLUMNS = (("eval_base", "base, 3-shot"), ("eval_sft", "SFT"), ("eval_dpo", "DPO"), ("eval_grpo", "GRPO"))
CHAT_TASKS = ("antonym", "hypernym", "translate", "arithmetic", "nli", "define", "synonym", "name_word",
              "mc_define")  # the order sample chats are drawn in: short answers anyone can judge first
CHAT_TOKENS = 32  # tokens per sample answer at most
METRIC_NAMES = {"chrf": "chrF", "exact_match": "exact match", "accuracy": "accuracy"}


def describe(record: dict[str, Any]) -> str:
    """What a finished stage achieved, in a few words."""
    from lmforge.speedrun import EVALUATED, TRAINING_STAGES

    figures = record.get("figures", {})
    if record["stage"] == "data":
        return (f"{figures['train_tokens']:,} training tokens from {', '.join(figures['sources'])}; "
                f"{len(figures['tasks']['eval'])} tasks to evaluate")
    if record["stage"] in TRAINING_STAGES:
        parts = [f"{figures.get('steps', 0)} steps in a {record['budget_s']:.0f} s budget"]
        for key, label in (("val_loss", "val loss"), ("val_bpb", "bits/byte"), ("val_accuracy", "val accuracy"),
                           ("val_reward", "val reward")):
            if key in figures:
                parts.append(f"{label} {figures[key]:.4f}")
        return ", ".join(parts)
    if record["stage"] in EVALUATED:
        return ", ".join(f"{task} {r['value']:.3g}" for task, r in figures.items())
    return f"{record['report']} written"


def write_report(out: Path, records: dict[str, dict[str, Any]], cfg: Any, base_model: Optional[Path],
                 final_model: Optional[Path], final_stage: Optional[str]) -> Path:
    """Write out/report.md and out/report/*.png from the stages' records (done.json contents); returns the path."""
    plots = out / "report"
    lines = [f"# lmforge speedrun: {out.name}", "", *summary(records, cfg, final_stage), "",
             "## Stages", "", *stage_table(records), ""]
    lines += ["## Pretraining", "", *pretraining(records), ""]
    if plot_losses(out, records, plots / "loss_curves.png"):
        lines += ["## Loss curves", "", "![loss curves](report/loss_curves.png)", ""]
    evals = {key: records[key] for key, _ in COLUMNS if key in records and not records[key]["skipped"]}
    if evals:
        lines += ["## Test accuracy of every built-in task", "", *task_table(evals, exclude_kind="pref"), "",
                  *verdict(evals, final_stage), ""]
        if plot_tasks(evals, plots / "tasks.png"):
            lines += ["![tasks](report/tasks.png)", ""]
        lines += ["## Preference accuracy", "", *preference(evals, records), ""]
    if cfg.sample_chats and base_model is not None:
        lines += ["## Sample chats", "", *chats(base_model, final_model, final_stage, records, cfg), ""]
    lines += ["## Settings", "", f"`{command(cfg)}` (saved in speedrun.json; each training stage's own settings "
              "are in its run dir's config.json)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def command(cfg: Any) -> str:
    """The command line that makes this run: the settings that differ from the defaults."""
    import dataclasses

    defaults = type(cfg)()
    options = [f"--{f.name} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
               if f.name != "out_dir" and getattr(cfg, f.name) != getattr(defaults, f.name)]
    return " ".join(["lmforge speedrun --out_dir", cfg.out_dir, *options])


def summary(records: dict[str, dict[str, Any]], cfg: Any, final_stage: Optional[str]) -> list[str]:
    wall = sum(r["wall_s"] for r in records.values())
    params = records.get("pretrain", {}).get("figures", {}).get("parameters")
    final = f"the {final_stage} model, `{records[final_stage]['model_dir']}`" if final_stage else "none"
    return [f"Preset `{cfg.preset}`, a budget of {cfg.time_budget_s:.0f} s: the stages took {wall:.0f} s "
            f"(the report's own time aside). Model: {params:,} parameters. Final model: {final}."
            if params else f"Preset `{cfg.preset}`, a budget of {cfg.time_budget_s:.0f} s; no model was trained."]


def stage_table(records: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| stage | budget | wall time | result |", "|---|---|---|---|"]
    for name, record in records.items():
        budget = f"{record['budget_s']:.0f} s" if record.get("budget_s") is not None else "-"
        result = f"**skipped**: {record['reason']}" if record["skipped"] else describe(record)
        rows.append(f"| {name} | {budget} | {record['wall_s']:.0f} s | {result} |")
    return rows


def pretraining(records: dict[str, dict[str, Any]]) -> list[str]:
    data, run = records.get("data", {}).get("figures", {}), records.get("pretrain", {})
    if run.get("skipped", True):
        return ["Pretraining was skipped: " + run.get("reason", "not run")]
    f = run["figures"]
    lines = [f"Corpus {', '.join(data.get('sources', []))}: {data.get('train_tokens', 0):,} training tokens "
             f"(BPE vocabulary {data.get('vocab_size')}). {f['steps']:,} steps, {f['tokens_seen']:,} tokens seen at "
             f"{f.get('tokens_per_s', 0):,.0f} tokens/s."]
    if f.get("val_bpb") is not None:
        lines.append(f"Validation: {f['val_loss']:.4f} nats/token, **{f['val_bpb']:.4f} bits per byte**.")
    return lines


def _value(result: Optional[dict[str, Any]]) -> str:
    if result is None:
        return "-"
    return f"{result['value']:.2f}" if result["metric"] == "chrf" else f"{100 * result['value']:.1f}%"


def task_table(evals: dict[str, dict[str, Any]], exclude_kind: str = "", only_kind: str = "") -> list[str]:
    """task | metric | one column per evaluated model; the best value of a row in bold."""
    tasks = list(dict.fromkeys(t for r in evals.values() for t in r["figures"]))
    tasks = [t for t in tasks if not (exclude_kind and t.endswith("_" + exclude_kind))
             and (not only_kind or t.endswith("_" + only_kind))]
    names = [label for key, label in COLUMNS if key in evals]
    rows = [f"| task | metric | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for task in tasks:
        results = [evals[key]["figures"].get(task) for key, _ in COLUMNS if key in evals]
        best = max((r["value"] for r in results if r is not None), default=None)
        cells = [f"**{_value(r)}**" if r is not None and r["value"] == best and best > 0 else _value(r)
                 for r in results]
        metric = next(r["metric"] for r in results if r is not None)
        n = next(r["n"] for r in results if r is not None)
        rows.append(f"| {task} (n={n}) | {METRIC_NAMES.get(metric, metric)} | {' | '.join(cells)} |")
    return rows


def verdict(evals: dict[str, dict[str, Any]], final_stage: Optional[str]) -> list[str]:
    """How the final model compares with the base model, task by task."""
    final_key = f"eval_{final_stage}"
    if "eval_base" not in evals or final_key not in evals or final_key == "eval_base":
        return []
    base, final = evals["eval_base"]["figures"], evals[final_key]["figures"]
    shared = [t for t in final if t in base and not t.endswith("_pref")]
    better = [t for t in shared if final[t]["value"] > base[t]["value"]]
    worse = [t for t in shared if final[t]["value"] < base[t]["value"]]
    return [f"The final ({final_stage}) model against the base model: better on {len(better)} of {len(shared)} "
            f"tasks ({', '.join(better) or 'none'}), worse on {len(worse)} ({', '.join(worse) or 'none'})."]


def preference(evals: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["How often each model's log-likelihood ranks the chosen response above the rejected one (test split):",
             "", *task_table(evals, only_kind="pref")]
    dpo = records.get("dpo", {})
    if not dpo.get("skipped", True) and "val_accuracy" in dpo["figures"]:
        lines += ["", f"DPO's implicit reward against the SFT model ranked {100 * dpo['figures']['val_accuracy']:.1f}% "
                      "of the held-out validation pairs right at the end of its training."]
    return lines


def chats(base_model: Path, final_model: Optional[Path], final_stage: Optional[str],
          records: dict[str, dict[str, Any]], cfg: Any) -> list[str]:
    """The first test prompt of a few tasks, answered greedily by the base model (plain format) and the final
    model (chat format), through the engine as `lmforge eval` answers them."""
    from lmforge.tasks.builtin import load_task

    tasks = records["data"]["figures"]["tasks"]["eval"]
    chosen = [t for t in CHAT_TASKS if t in tasks][:cfg.sample_chats]
    examples = [load_task(task, "test", cfg.cache_dir or None, 1)[0] for task in chosen]
    if not examples:
        return ["No task with test examples to draw prompts from."]
    base = answers(base_model, False, [e.prompt for e in examples])
    tuned = answers(final_model, True, [e.prompt for e in examples]) \
        if final_model is not None and final_stage != "pretrain" else None
    lines = ["The first test prompt of each task, answered greedily: the base model in the plain format "
             "(`Question: ...\\nAnswer:`), the final model in its chat format.", ""]
    for i, example in enumerate(examples):
        lines += ["```", f"> {example.prompt}", f"base model:  {base[i] or '(nothing)'}"]
        if tuned is not None:
            lines.append(f"{final_stage} model:{' ' * max(1, 6 - len(final_stage))}{tuned[i] or '(nothing)'}")
        lines += [f"reference:   {example.answers[0]}", "```"]
    return lines


def answers(model_dir: Path, chat: bool, prompts: list[str]) -> list[str]:
    from lmforge.convert import load_with_tokenizer
    from lmforge.eval.config import EvalConfig
    from lmforge.eval.harness import generate_answers
    from lmforge.eval.prompts import PromptFormat

    model, tokenizer = load_with_tokenizer(model_dir)
    fmt = PromptFormat(tokenizer, chat)
    found, _ = generate_answers(model, tokenizer, [fmt.context_ids(p) for p in prompts], fmt,
                                EvalConfig(max_new_tokens=CHAT_TOKENS, batch_size=len(prompts)))
    return [" ".join(a.split()) for a in found]


def plot_losses(out: Path, records: dict[str, dict[str, Any]], path: Path) -> bool:
    """One panel per training stage that ran: train and validation loss against the step (GRPO: its mean rollout
    reward too, on a second axis, since its loss is about 0 by construction). False when no stage ran."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone

    from lmforge.speedrun import TRAINING_STAGES
    from lmforge.train.metrics import MetricsLog

    stages = [s for s in TRAINING_STAGES if s in records and not records[s]["skipped"]]
    if not stages:
        return False
    fig = Figure(figsize=(4.5 * len(stages), 3.6))
    for ax, stage in zip(fig.subplots(1, len(stages), squeeze=False)[0], stages):
        logged = MetricsLog(out / stage / "run" / "metrics.jsonl").read()
        train = [r for r in logged if r.get("kind") == "train"]
        val = [r for r in logged if r.get("kind") == "val" and r.get("val_loss") is not None]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], linewidth=1, label="train loss")
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", markersize=3, label="val loss")
        if stage == "grpo":
            reward = ax.twinx()
            reward.plot([r["step"] for r in train if "reward" in r], [r["reward"] for r in train if "reward" in r],
                        color="tab:green", linewidth=1, label="mean reward")
            reward.set_ylabel("reward")
            reward.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{stage} ({records[stage]['wall_s']:.0f} s)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_tasks(evals: dict[str, dict[str, Any]], path: Path) -> bool:
    """Grouped bars: each task's test metric (percent, or chrF) for every evaluated model."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(t for r in evals.values() for t in r["figures"]))
    if not tasks:
        return False
    columns = [(key, label) for key, label in COLUMNS if key in evals]
    fig = Figure(figsize=(max(6.0, 0.9 * len(tasks) * len(columns) / 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(columns)
    for i, (key, label) in enumerate(columns):
        values = []
        for task in tasks:
            result = evals[key]["figures"].get(task)
            scale = 1 if result is None or result["metric"] == "chrf" else 100
            values.append(0 if result is None else scale * result["value"])
        ax.bar([t + (i - (len(columns) - 1) / 2) * width for t in range(len(tasks))], values, width, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("exact match / accuracy (%), chrF")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
