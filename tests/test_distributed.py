"""Several processes under torchrun (gloo on CPU): DDP and FSDP2 against one process, and resume across process
counts and engines through the one checkpoint format."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_on_two_processes
from test_train import (REPO, TINY_MODEL, assert_same_weights, config_dict, subprocess_env, train_losses, weights,
                        write_dataset)

from lmforge.config import build_config
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import load_trainer_state
from lmforge.train.distributed import DistContext, shard_model
from lmforge.train.metrics import MetricsLog
from lmforge.stages.pretrain import PretrainConfig, pretrain

# grad_accum 2 exercises the skipped gradient reduction (no_sync). seq_len 14 leaves 13 validation windows, so the
# last validation batch holds 1 window and the second process's share of it is empty (an FSDP forward is collective).
SEQ_LEN = 14
MODEL = {**TINY_MODEL, "n_layer": 2}  # two blocks: under FSDP, two sharded units besides the root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


def make_config(dataset: Path, out_dir: Path, parallel: str = "ddp", resume: bool = False, tie: bool = False) -> dict:
    """6 steps of 2 micro-steps of 4 sequences; validation and checkpoints at steps 3 and 6."""
    config = config_dict(dataset, out_dir, grad_accum=2, eval_batches=4, parallel=parallel)
    return {**config, "model": {**MODEL, "tie_embeddings": tie}, "data": {"dataset": str(dataset), "seq_len": SEQ_LEN},
            "resume": resume}


def run_one(config: dict) -> Path:
    return pretrain(build_config(PretrainConfig, config))


def run_two(config: dict) -> Path:
    """`lmforge pretrain` with `config` on 2 processes under torchrun; returns the run dir."""
    run_dir = Path(config["out_dir"])
    config_file = run_dir.parent / f"{run_dir.name}.json"
    config_file.write_text(json.dumps(config))
    run_on_two_processes("pretrain", config_file)
    return run_dir


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["kind"] == "val"}


def resume_from(run_dir: Path, step: int, new_dir: Path) -> Path:
    """A fresh run dir holding only `run_dir`'s checkpoint at `step`."""
    shutil.copytree(run_dir / "checkpoints" / f"step_{step}", new_dir / "checkpoints" / f"step_{step}")
    return new_dir


def assert_same_optimizer_layout(a: dict, b: dict) -> None:
    """Both checkpoints hold torch's single-process optimizer state dict: the same indices, groups and shapes."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and all(isinstance(k, int) for k in a["state"])
    for index, state in a["state"].items():
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in b["state"][index].items()}


@pytest.mark.slow
@pytest.mark.parametrize("parallel,tie", [("ddp", False), ("fsdp", True)], ids=["ddp", "fsdp-tied-embeddings"])
def test_two_processes_match_one_and_resume_on_one(dataset, tmp_path, parallel, tie):
    two = run_two(make_config(dataset, tmp_path / "two", parallel, tie=tie))
    one = run_one(make_config(dataset, tmp_path / "one", tie=tie))
    assert sorted(train_losses(two)) == list(range(1, 7))
    assert train_losses(two) == pytest.approx(train_losses(one), abs=1e-5)
    assert val_losses(two) == pytest.approx(val_losses(one), abs=1e-5)
    assert_same_weights(weights(two), weights(one), atol=1e-5)
    assert_same_optimizer_layout(load_trainer_state(two / "checkpoints" / "step_3")["optimizer"],
                                 load_trainer_state(one / "checkpoints" / "step_3")["optimizer"])

    # the 2-process run's checkpoint at step 3, resumed on one process, continues the same curve
    resumed = run_one(make_config(dataset, resume_from(two, 3, tmp_path / "resumed"), resume=True, tie=tie))
    assert sorted(train_losses(resumed)) == [4, 5, 6]
    assert train_losses(resumed) == pytest.approx({s: train_losses(one)[s] for s in (4, 5, 6)}, abs=1e-5)
    assert_same_weights(weights(resumed), weights(one), atol=1e-5)


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_run_on_two(dataset, tmp_path):
    one = run_one(make_config(dataset, tmp_path / "one"))
    resumed = run_two(make_config(dataset, resume_from(one, 3, tmp_path / "resumed"), "fsdp", resume=True))
    assert sorted(train_losses(resumed)) == [4, 5, 6]
    assert train_losses(resumed) == pytest.approx({s: train_losses(one)[s] for s in (4, 5, 6)}, abs=1e-5)
    assert_same_weights(weights(resumed), weights(one), atol=1e-5)
    assert_same_weights(weights(resumed, "checkpoints/step_6"), weights(one, "checkpoints/step_6"), atol=1e-5)


def test_fsdp_on_a_torch_without_fully_shard_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # `from torch.distributed.fsdp import` fails
    model = Transformer(ModelConfig(**TINY_MODEL))
    with pytest.raises(ConfigError, match=r"^train\.parallel=fsdp needs torch >= 2\.6 .*use train\.parallel=ddp$"):
        shard_model(model, DistContext(0, 2, torch.device("cpu"), owns_group=False), "fsdp")


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from lmforge.train.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"^train\.device: torchrun started process 1 on this node, which has 1 "
                                          r"CUDA device\(s\); use --nproc-per-node 1 or --train.device cpu$"):
        init_distributed("cuda")


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_printed_once(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "lmforge", "pretrain", "--data.dataset", str(tmp_path / "missing"),
                             "--train.device", "cpu", "--out_dir", str(tmp_path / "run")],
                            env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("lmforge pretrain: error:")]
    assert said == [f"lmforge pretrain: error: dataset dir {tmp_path / 'missing'}: no meta.json (expected a dir "
                    "written by `lmforge data prepare`)"]
