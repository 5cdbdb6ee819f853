"""GPT-1 task heads: input transformations, the head and L3 = L2 + lambda L1, every task kind, peft, resume, eval."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.errors import DataError
from lmforge.model.heads import load_task_head
from lmforge.stages.config import FinetuneConfig
from lmforge.stages.finetune import Item, Transform, finetune, head_accuracy
from lmforge.tokenizer import Tokenizer
from lmforge.train.metrics import MetricsLog

from test_sft import write_jsonl
from test_train import assert_same_weights, weights

WORDS = ["cat", "dog", "rose", "tulip", "oak", "pine", "trout", "carp"]
KIND = {"cat": "animal", "dog": "animal", "rose": "flower", "tulip": "flower", "oak": "tree", "pine": "tree",
        "trout": "fish", "carp": "fish"}


def records(task: str, n: int = 64) -> list[dict]:
    out = []
    for i in range(n):
        a, b = WORDS[i % 8], WORDS[(i * 3 + 1) % 8]
        if task == "classify":
            out.append({"text": f"the {a} is here", "label": KIND[a]})
        elif task == "entailment":
            out.append({"premise": f"this is a {a}", "hypothesis": f"this is a {KIND[a] if i % 2 else KIND[b]}",
                        "label": "entailment" if i % 2 or KIND[a] == KIND[b] else "neutral"})
        elif task == "similarity":
            out.append({"text_a": f"a {a}", "text_b": f"a {b}", "label": int(KIND[a] == KIND[b])})
        else:
            kinds = sorted(set(KIND.values()))
            out.append({"context": f"a {a} is a kind of", "choices": kinds, "label": kinds.index(KIND[a])})
    return out


def config(base: Path, task: str, files: list[str], out_dir: Path, **overrides) -> FinetuneConfig:
    tc = {"device": "cpu", "batch_size": 8, "max_steps": 40, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 20,
          "eval_batches": 2, "checkpoint_interval": 20, "log_interval": 5, **overrides.pop("train", {})}
    return build_config(FinetuneConfig, {"model": str(base), "task": task, "data": {"train": files, "val_fraction": 0.2},
                                         "train": tc, "out_dir": str(out_dir), **overrides})


def test_gpt1_input_transformations(base):
    tok = Tokenizer.load(base)
    start, delim, extract = tok.bos_id, tok.special_ids["reserved_0"], tok.special_ids["reserved_1"]
    t = Transform(tok, "similarity", seq_len=64)
    item = Item(["the cat", "a dog"], 1)
    ab, ba = t.rows(item)
    assert ab == [start, *tok.encode("the cat"), delim, *tok.encode("a dog"), extract]
    assert ba == [start, *tok.encode("a dog"), delim, *tok.encode("the cat"), extract]
    mc = Transform(tok, "multiple_choice", 64).rows(Item(["a dog is"], 0, ["cat", "dog", "oak"]))
    assert len(mc) == 3 and all(r[-1] == extract and r[0] == start for r in mc)
    short = Transform(tok, "entailment", seq_len=8).sequence("the cat sat on the mat " * 5, "a dog")
    assert len(short) == 8 and short[-4:] == [delim, *tok.encode("a dog"), extract] and short[0] == start
    batch = Transform(tok, "classify", 64).collate([Item(["the cat"], 1), Item(["a dog is a friend"], 0)],
                                                   torch.device("cpu"))
    assert batch["extract"].tolist() == [len(tok.encode("the cat")) + 1, len(tok.encode("a dog is a friend")) + 1]
    row = [start, *tok.encode("the cat"), extract]
    assert batch["lm_targets"][0, :len(row) - 1].tolist() == row[1:]  # next tokens; padding and the last: -100
    assert (batch["lm_targets"][0, len(row) - 1:] == -100).all()


@pytest.mark.parametrize("task", ["classify", "entailment", "similarity", "multiple_choice"])
def test_every_task_kind_learns_its_labels(base, tmp_path, task):
    data = write_jsonl(tmp_path / "d.jsonl", records(task))
    run_dir = finetune(config(base, task, [str(data)], tmp_path / "run"))
    val = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["kind"] == "val"]
    assert {"val_accuracy", "val_task_loss", "val_lm_loss"} <= val[-1].keys()
    model = load_task_head(run_dir / "final")
    tok = Tokenizer.load(run_dir / "final")
    from lmforge.stages.finetune import read_items, to_items

    items = to_items(read_items(str(data), task), task, model.labels)
    chance = 1 / (len(model.labels) or 4)
    assert head_accuracy(model, tok, items) > chance + 0.1
    assert json.loads((run_dir / "final" / "task_head.json").read_text())["kind"] == task


def test_lambda_zero_drops_the_language_modelling_loss_and_peft_trains_the_head(base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", records("classify"))
    run_dir = finetune(config(base, "classify", [str(data)], tmp_path / "run", lm_weight=0.0,
                              peft={"method": "lora", "r": 4}, train={"max_steps": 10}))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_lm_loss"] == 0.0 and summary["val_task_loss"] == pytest.approx(summary["val_loss"])
    names = {p.name for p in (run_dir / "final").iterdir()}
    assert {"lmforge_adapter.safetensors", "task_head.safetensors"} <= names and "model.safetensors" not in names
    assert load_task_head(run_dir / "final").lm.peft.method == "lora"


def test_resume_is_exact_with_the_head(base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", records("multiple_choice"))
    full = finetune(config(base, "multiple_choice", [str(data)], tmp_path / "full", train={"max_steps": 6}))
    stopped = finetune(config(base, "multiple_choice", [str(data)], tmp_path / "stopped",
                              train={"max_steps": 6, "time_budget_s": 1e-9}))
    resumed = finetune(config(base, "multiple_choice", [str(data)], tmp_path / "stopped", train={"max_steps": 6},
                              resume=True))
    assert stopped == resumed
    assert_same_weights(weights(resumed), weights(full))
    from safetensors.torch import load_file

    assert_same_weights(load_file(str(resumed / "final" / "task_head.safetensors")),
                        load_file(str(full / "final" / "task_head.safetensors")))


def test_bad_items_name_file_and_line(base, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"premise": "x", "label": "entailment"}])
    assert main(["finetune", str(base), "--task", "entailment", "--data.train", str(bad), "--out_dir",
                 str(tmp_path / "run")]) == 2
    assert "bad.jsonl:1: missing hypothesis (a entailment item needs premise, hypothesis and label)" in \
        capsys.readouterr().err
    with pytest.raises(DataError, match="choices must be a list"):
        from lmforge.stages.finetune import read_items

        read_items(str(write_jsonl(tmp_path / "mc.jsonl", [{"context": "x", "choices": "ab", "label": 0}])),
                   "multiple_choice")


def test_eval_scores_the_matching_built_in_task_with_the_head(base, tmp_path, monkeypatch):
    import lmforge.stages.finetune as finetune_module
    import lmforge.tasks.builtin as builtin
    from lmforge.eval.config import EvalConfig
    from lmforge.eval.harness import run_eval
    from lmforge.tasks.spec import TaskExample

    data = write_jsonl(tmp_path / "d.jsonl", records("entailment"))
    run_dir = finetune(config(base, "entailment", [str(data)], tmp_path / "run", train={"max_steps": 10}))
    items = [Item([r["premise"], r["hypothesis"]], ["entailment", "neutral"].index(r["label"]))
             for r in records("entailment", 16)]
    monkeypatch.setattr(finetune_module, "builtin_items", lambda *a, **k: items)
    monkeypatch.setattr(builtin, "load_task", lambda name, split, cache_dir=None, limit=None: [
        TaskExample(str(i), "p", ["entailment"], ["entailment", "neutral", "contradiction"], 0) for i in range(4)])
    report = run_eval(EvalConfig(model=str(run_dir / "final"), tasks=["nli"], chat="false"))
    expected = head_accuracy(load_task_head(run_dir / "final"), Tokenizer.load(run_dir / "final"), items)
    assert report["tasks"]["nli"]["acc"] == expected and report["tasks"]["nli"]["scored_by"] == "task head (entailment)"
