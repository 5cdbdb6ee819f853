"""`lmforge <command>`: one entry point whose subcommands are the lifecycle stages.

Each command is a thin wrapper: it builds the stage's dataclass config from defaults, an optional `--config` file
(TOML/YAML/JSON) and `--section.key value` overrides generated from the dataclass fields, then calls the stage's
Python function. A user mistake (`LmforgeError`) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from lmforge.config import flat_fields, load_config
from lmforge.errors import Interrupted, LmforgeError


@dataclass(frozen=True)
class Command:
    """A CLI command: `path` is the command words, `config` the 'module:Class' of its dataclass config and `run` the
    'module:function' it calls. Config classes live in modules that do not import torch, so that `--help` and a
    mistyped option answer at once; the function's module is imported only to run the command."""

    path: tuple[str, ...]
    config: str
    run: str
    help: str
    example: str
    positionals: tuple[str, ...] = ()  # config keys that may also be given positionally, in order


COMMANDS: tuple[Command, ...] = (
    Command(("data", "prepare"), "lmforge.data.prepare:DataConfig", "lmforge.data.prepare:prepare_dataset",
            "clean, deduplicate, mix, split and tokenize text into a dataset dir of token shards",
            "lmforge data prepare --sources wordnet,kjv:0.5 --out_dir data/wn --vocab_size 4096"),
    Command(("tokenizer", "train"), "lmforge.tokenizer:TokenizerTrainConfig", "lmforge.tokenizer:train_tokenizer",
            "train a byte-level BPE tokenizer and report bytes per token on held-out text",
            "lmforge tokenizer train --input stdlib-docstrings --out_dir tok --vocab_size 4096"),
    Command(("pretrain",), "lmforge.train.config:PretrainConfig", "lmforge.stages.pretrain:pretrain",
            "pretrain a decoder-only transformer on a dataset dir (resumable; DDP under torchrun)",
            "lmforge pretrain --data.dataset data/wn --model.n_layer 4 --train.max_steps 500 --out_dir runs/wn"),
    Command(("generate",), "lmforge.infer.config:GenerateConfig", "lmforge.infer.generate:run_generate",
            "generate text from a model dir (lmforge or Hugging Face) with a KV cache and sampling",
            "lmforge generate runs/wn/final --prompt 'a dog is' --max_new_tokens 40 --temperature 0.8",
            positionals=("model",)),
    Command(("chat",), "lmforge.infer.config:ChatConfig", "lmforge.infer.chat:run_chat",
            "chat with a model in the terminal (streamed; /reset, /exit), or answer one --prompt",
            "lmforge chat runs/sft/final --system 'Answer briefly.' --temperature 0.7", positionals=("model",)),
    Command(("sft",), "lmforge.stages.config:SFTConfig", "lmforge.stages.sft:sft",
            "instruction-tune a model dir on conversations (JSONL chat formats or the built-in tasks)",
            "lmforge sft runs/wn/final --data.train builtin --train.max_steps 500 --out_dir runs/sft",
            positionals=("model",)),
    Command(("finetune",), "lmforge.stages.config:FinetuneConfig", "lmforge.stages.finetune:finetune",
            "GPT-1 task fine-tuning: a linear head on the extract token (classify, entailment, similarity, "
            "multiple choice) with the auxiliary LM loss",
            "lmforge finetune runs/wn/final --task entailment --data.train builtin --lm_weight 0.5",
            positionals=("model",)),
    Command(("reward",), "lmforge.stages.config:RewardConfig", "lmforge.stages.reward:reward",
            "train a reward model (scalar head, Bradley-Terry loss over every ranked pair) on preference data",
            "lmforge reward runs/sft/final --data.train builtin --out_dir runs/reward", positionals=("model",)),
    Command(("reward", "score"), "lmforge.stages.config:RewardScoreConfig", "lmforge.stages.reward:reward_score",
            "score responses with a reward model, or a preference file's responses with its pair accuracy",
            "lmforge reward score runs/reward/final --prompt 'What is 2 + 3?' --response 5 --response 6",
            positionals=("model",)),
    Command(("dpo",), "lmforge.stages.config:DPOConfig", "lmforge.stages.dpo:dpo",
            "align a model to preference pairs with DPO (or IPO, conservative or robust DPO, hinge)",
            "lmforge dpo runs/sft/final --data.train builtin --beta 0.1 --out_dir runs/dpo", positionals=("model",)),
    Command(("grpo",), "lmforge.stages.config:GRPOConfig", "lmforge.stages.grpo:grpo",
            "reinforce a model with GRPO: groups of sampled completions scored by verifiable rewards (arithmetic, "
            "format, or module:function)",
            "lmforge grpo runs/sft/final --data.train builtin --rewards arithmetic --group_size 8 --out_dir runs/grpo",
            positionals=("model",)),
    Command(("ppo",), "lmforge.stages.config:PPOConfig", "lmforge.stages.ppo:ppo",
            "reinforce a model with PPO against a reward model: value head, GAE, per-token KL to the start, PPO-ptx",
            "lmforge ppo runs/sft/final --reward_model runs/reward/final --data.train builtin --out_dir runs/ppo",
            positionals=("model",)),
    Command(("rlaif",), "lmforge.stages.config:RLAIFConfig", "lmforge.stages.rlaif:rlaif",
            "label pairs of a policy's sampled responses with an AI judge (a model and a rubric, or a reward model) "
            "into preference JSONL",
            "lmforge rlaif runs/sft/final --judge runs/judge/final --limit 500 --out rlaif.jsonl",
            positionals=("policy",)),
    Command(("medusa", "train"), "lmforge.stages.config:MedusaConfig", "lmforge.stages.medusa:medusa_train",
            "train Medusa heads on a frozen model (dataset text or its own continuations) for tree decoding",
            "lmforge medusa train runs/sft/final --data.dataset data/wn --train.max_steps 500 --out_dir runs/medusa",
            positionals=("model",)),
    Command(("peft", "merge"), "lmforge.peft.config:PeftMergeConfig", "lmforge.peft.commands:peft_merge",
            "fold a LoRA or QLoRA adapter into its base: a plain model dir with the same logits",
            "lmforge peft merge runs/sft-lora/final models/sft-merged", positionals=("adapter", "out_dir")),
    Command(("peft", "import"), "lmforge.peft.config:PeftImportConfig", "lmforge.peft.commands:peft_import",
            "make an lmforge adapter dir of an adapter saved by Hugging Face PEFT (LoRA, prefix or prompt tuning)",
            "lmforge peft import hf-adapter --base hf/some-llama --out_dir adapters/some", positionals=("adapter",)),
    Command(("tasks", "list"), "lmforge.tasks.commands:TasksListConfig", "lmforge.tasks.commands:tasks_list",
            "list the built-in tasks (from WordNet, FreeDict and arithmetic) with their metric and split sizes",
            "lmforge tasks list"),
    Command(("tasks", "export"), "lmforge.tasks.commands:TasksExportConfig", "lmforge.tasks.commands:tasks_export",
            "write a built-in task's split as JSONL (the chat formats sft reads, or an eval task file)",
            "lmforge tasks export synonym --split test --out synonym-test.jsonl", positionals=("name",)),
    Command(("eval",), "lmforge.eval.config:EvalConfig", "lmforge.eval.harness:run_eval",
            "evaluate a model dir on tasks (k-shot, log-likelihood choices, exact match, chrF, BLEU) and perplexity",
            "lmforge eval runs/sft/final --tasks synonym,arithmetic --shots 0 --out eval.json",
            positionals=("model",)),
    Command(("serve",), "lmforge.serve.config:ServeConfig", "lmforge.serve.server:serve",
            "serve model dirs over an OpenAI-compatible HTTP API (completions, chat, streaming) on the engine",
            "lmforge serve runs/sft/final --host 127.0.0.1 --port 8000", positionals=("model",)),
    Command(("logs", "stats"), "lmforge.serve.logstats:LogsStatsConfig", "lmforge.serve.logstats:logs_stats",
            "summarize the server's request logs (JSONL or SQLite, rotated): routes, errors, cache hits, tokens, "
            "latency percentiles, guard counts",
            "lmforge logs stats requests.jsonl --since 2025-01-31T00:00:00Z --model final", positionals=("log",)),
    Command(("convert",), "lmforge.convert:ConvertConfig", "lmforge.convert:convert",
            "convert between an lmforge model dir and a Hugging Face dir (GPT-2, LLaMA, Qwen2, Mistral)",
            "lmforge convert runs/wn/final hf/wn --to hf", positionals=("src", "dst")),
    Command(("info",), "lmforge.convert:InfoConfig", "lmforge.convert:model_info",
            "print a model dir's config, parameter count and FLOPs per token",
            "lmforge info runs/wn/final", positionals=("model",)),
    Command(("quickstart",), "lmforge.quickstart:QuickstartConfig", "lmforge.quickstart:quickstart",
            "fetch WordNet, prepare it, train a tokenizer and a small LLaMA-style model, evaluate and sample",
            "lmforge quickstart --out_dir runs/quickstart --time_budget_s 480"),
    Command(("speedrun",), "lmforge.speedrun:SpeedrunConfig", "lmforge.speedrun:speedrun",
            "raw text to an aligned chat model in one time budget: data, tokenizer, pretrain, SFT, DPO, GRPO, "
            "evals after each stage, a report with plots, and --serve for the web chat page (resumable)",
            "lmforge speedrun --out_dir runs/speedrun --time_budget_s 1800 --serve true"),
)

# Repeatable options whose values are free text, never split on commas: `--prompt 'Hello, world'`, `--stop ','`.
FREE_TEXT_LISTS = {"prompt", "stop", "response"}


def _import(target: str) -> Any:
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union,) or type(tp).__name__ == "UnionType":
        return "|".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        return "comma-separated list"
    return getattr(tp, "__name__", str(tp))


def _add_config_options(parser: argparse.ArgumentParser, cfg_cls: type, positionals: Sequence[str]) -> None:
    parser.add_argument("--config", metavar="FILE", default=None, help="TOML, YAML or JSON config file")
    types = {key: tp for key, tp, _, _ in flat_fields(cfg_cls)}
    for key in positionals:  # a list-typed key takes every positional value: lmforge serve DIR_A DIR_B
        many = typing.get_origin(types.get(key)) in (list, tuple)
        parser.add_argument(f"_pos_{key}", metavar=key.upper(), nargs="*" if many else "?", default=None,
                            help=f"same as --{key}")
    for key, tp, default, comment in flat_fields(cfg_cls):
        is_bool = tp is bool or tp == typing.Optional[bool]
        is_list = typing.get_origin(tp) in (list, tuple)
        shown = "" if default in (None, "", [], ()) else f", default {default}"
        comment = comment.replace("%", "%%")  # argparse formats help strings with %
        kwargs: dict[str, Any] = dict(dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V",
                                      help=f"{comment} ({_type_name(tp)}{shown})".lstrip())
        if is_bool:
            kwargs.update(nargs="?", const="true")
        if is_list:  # repeat the option or separate values by commas: --tasks a,b --tasks c; free text only repeats
            kind = "repeatable" if key.rsplit(".", 1)[-1] in FREE_TEXT_LISTS else "comma-separated or repeatable"
            kwargs.update(action="append", help=f"{comment} ({kind}{shown})".lstrip())
        names = [f"--{key}"]
        if "_" in key:
            names.append(f"--{key.replace('_', '-')}")
        parser.add_argument(*names, **kwargs)


def _overview() -> str:
    width = max(len(" ".join(c.path)) for c in COMMANDS)
    lines = ["usage: lmforge COMMAND [options]   (lmforge COMMAND --help for a command's options)", "",
             "lmforge: raw text to a trained language model, one command per lifecycle stage.", "", "commands:"]
    lines += [f"  {' '.join(c.path):<{width}}  {c.help}" for c in COMMANDS]
    lines += ["", "Every option can also be set in a --config FILE (TOML, YAML or JSON).",
              "Add --traceback to any command to see the full traceback of an error.",
              "lmforge --version prints the version."]
    return "\n".join(lines)


def find_command(argv: Sequence[str]) -> tuple[Command | None, list[str]]:
    """The command named by the leading words of `argv`, and the remaining arguments."""
    for cmd in sorted(COMMANDS, key=lambda c: -len(c.path)):
        if tuple(argv[: len(cmd.path)]) == cmd.path:
            return cmd, list(argv[len(cmd.path):])
    return None, list(argv)


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--train.max_step` is not `--train.max_steps`), whose errors are one line
    naming the option and, for a misspelt one, the closest valid option."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message[len(prefix):].split()
            option = next((w.split("=", 1)[0] for w in words if w.startswith("-")), None)
            if option is None:
                message = f"unexpected argument {words[0]!r} (this command takes options: see {self.prog} --help)"
            else:
                known = [o for action in self._actions for o in action.option_strings]
                close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"see {self.prog} --help"
                message = f"unknown option {option} ({hint})"
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser(cmd: Command) -> argparse.ArgumentParser:
    """The parser of one command; only its config's module is imported (keeps `--help` fast)."""
    parser = _Parser(prog=f"lmforge {' '.join(cmd.path)}", description=f"{cmd.help}.\n\nexample:\n  {cmd.example}",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    _add_config_options(parser, _import(cmd.config), cmd.positionals)
    return parser


def _split_commas(key: str, value: Any) -> Any:
    """A repeatable option's values, each split on commas (`--tasks a,b --tasks c` is [a, b, c]), except free text."""
    if not isinstance(value, list) or key.rsplit(".", 1)[-1] in FREE_TEXT_LISTS:
        return value
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


def run_command(cmd: Command, args: argparse.Namespace) -> Any:
    values = vars(args)
    overrides = {k[len("cfg:"):]: _split_commas(k[len("cfg:"):], v) for k, v in values.items()
                 if k.startswith("cfg:")}
    for key in cmd.positionals:
        if values.get(f"_pos_{key}") not in (None, []):
            overrides[key] = values[f"_pos_{key}"]
    cfg = load_config(_import(cmd.config), values.get("config"), overrides)
    return _import(cmd.run)(cfg)


LEAD_GRACE_S = 3.0  # how long other ranks of a torchrun job wait before exiting on an error rank 0 reports


def _is_lead_process() -> bool:
    """False on the ranks other than 0 of a torchrun job: one process speaks for all of them."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from lmforge import __version__

        print(f"lmforge {__version__}")
        return 0
    cmd, rest = find_command(argv)
    if cmd is None:
        print(_overview(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(" ".join(argv[:2]), [" ".join(c.path) for c in COMMANDS], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            print(f"lmforge: error: unknown command '{' '.join(argv[:2])}'{hint}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    args = build_parser(cmd).parse_args(rest)
    name = f"lmforge {' '.join(cmd.path)}"
    try:
        run_command(cmd, args)
    except Interrupted as exc:  # a stage that stopped cleanly on Ctrl-C or SIGTERM (checkpoint written)
        if _is_lead_process():
            print(f"{name}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 130
    except LmforgeError as exc:
        if args.traceback or os.environ.get("LMFORGE_TRACEBACK"):
            raise
        if _is_lead_process():
            message = " ".join(str(exc).split())  # one line, whatever the exception text holds
            print(f"{name}: error: {message}", file=sys.stderr)
        else:  # torchrun stops the whole job when one process exits: give rank 0 the time to say why
            time.sleep(LEAD_GRACE_S)
        return 2
    except KeyboardInterrupt:
        if _is_lead_process():
            print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
