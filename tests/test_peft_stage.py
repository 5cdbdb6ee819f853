"""PEFT methods in the sft stage: adapter-only checkpoints, exact resume, and the adapter dir used unmerged by
generate, chat and eval, and merged by `lmforge peft merge`."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.convert import load
from lmforge.stages.sft import sft
from lmforge.train.checkpoint import latest_checkpoint

from conftest import run_on_two_processes
from test_sft import chat_records, config, write_jsonl
from test_train import assert_same_weights


def adapter_weights(run_dir: Path, name: str = "final") -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / name / "lmforge_adapter.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("peftdata") / "d.jsonl", chat_records("messages"))


def test_lora_sft_writes_an_adapter_and_resumes_exactly(base, data, tmp_path):
    peft = {"method": "lora", "targets": ["q", "v", "down"], "r": 4, "alpha": 8}
    full = sft(config(base, [str(data)], tmp_path / "full", peft=peft, train={"max_steps": 6}))
    final = full / "final"
    names = {p.name for p in final.iterdir()}
    assert {"lmforge_adapter.json", "lmforge_adapter.safetensors", "adapter_config.json",
            "adapter_model.safetensors", "tokenizer.json", "training.json"} <= names
    assert "model.safetensors" not in names and "model.safetensors" not in {
        p.name for p in latest_checkpoint(full).iterdir()}
    assert json.loads((final / "training.json").read_text())["peft"] == "lora"
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 6

    stopped = sft(config(base, [str(data)], tmp_path / "stopped", peft=peft,
                         train={"max_steps": 6, "time_budget_s": 1e-9}))
    assert json.loads((stopped / "summary.json").read_text())["steps"] == 1
    resumed = sft(config(base, [str(data)], tmp_path / "stopped", peft=peft, train={"max_steps": 6}, resume=True))
    assert_same_weights(adapter_weights(resumed), adapter_weights(full))
    with pytest.raises(Exception, match=r"peft.r \(saved 4, now 8\)"):
        sft(config(base, [str(data)], tmp_path / "stopped", peft={**peft, "r": 8}, train={"max_steps": 8},
                   resume=True))


def test_the_adapter_dir_generates_chats_evaluates_and_merges(base, data, tmp_path, capsys):
    run_dir = sft(config(base, [str(data)], tmp_path / "run", train={"max_steps": 4},
                         peft={"method": "lora", "targets": ["q", "v"], "r": 4}))
    final = run_dir / "final"
    assert main(["generate", str(final), "--prompt", "the cat", "--max_new_tokens", "4", "--temperature", "0"]) == 0
    assert main(["chat", str(final), "--prompt", "2 + 3", "--max_new_tokens", "4", "--temperature", "0"]) == 0
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "2 + 3", "answers": ["5"]}])
    assert main(["eval", str(final), "--tasks", str(task), "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["format"] == "chat"
    merged_dir = tmp_path / "merged"
    assert main(["peft", "merge", str(final), str(merged_dir)]) == 0
    ids = torch.tensor([[5, 9, 2, 41, 7, 33]])
    with torch.no_grad():
        assert torch.allclose(load(merged_dir)(ids), load(final)(ids), atol=1e-5)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert main(["peft", "merge", str(final), str(base)]) == 2  # never over its own base
    assert "holds this command's input" in capsys.readouterr().err


@pytest.mark.parametrize("peft", [{"method": "prefix", "virtual_tokens": 4},
                                  {"method": "prompt", "virtual_tokens": 4, "prompt_init_text": "answer"},
                                  {"method": "qlora", "quantize": "nf4", "group_size": 16, "targets": ["q", "v"]},
                                  {"method": "adapter", "adapter_size": 8}])
def test_every_method_trains_on_packed_conversations(base, data, tmp_path, peft):
    run_dir = sft(config(base, [str(data)], tmp_path / "run", peft=peft, train={"max_steps": 12, "lr": 1e-2}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert train[-1] < train[0]
    model = load(run_dir / "final")
    assert main(["generate", str(run_dir / "final"), "--prompt", "the cat", "--max_new_tokens", "3"]) == 0
    assert model.peft.method == peft["method"]


@pytest.mark.slow
def test_lora_sft_under_ddp_matches_one_process(base, data, tmp_path):
    from lmforge.config import config_to_dict

    peft = {"method": "lora", "targets": ["q", "v"], "r": 4}
    settings = {"max_steps": 4, "batch_size": 4, "grad_accum": 2}
    two_cfg = config(base, [str(data)], tmp_path / "two", peft=peft, train=settings)
    (tmp_path / "two.json").write_text(json.dumps(config_to_dict(two_cfg)))
    run_on_two_processes("sft", tmp_path / "two.json")
    one = sft(config(base, [str(data)], tmp_path / "one", peft=peft, train=settings))
    assert_same_weights(adapter_weights(tmp_path / "two"), adapter_weights(one), atol=1e-5)
