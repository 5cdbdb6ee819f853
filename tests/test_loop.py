"""The one training loop (lmforge.train.loop) as pretraining drives it: the clock-following schedule, stops on
signals, run-dir safety, checks of the model against its dataset, warnings, MFU and the external loggers."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.errors import ConfigError, LmforgeError, TokenizerMismatchError
from lmforge.model import ModelConfig, Transformer
from lmforge.stages.pretrain import PretrainConfig, pretrain
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import MetricsLog
from lmforge.train.optim import lr_at, lr_at_time

from conftest import wait_while_running
from test_train import (REPO, SLOW_DRIVER, TINY_MODEL, assert_same_weights, config_dict, run, subprocess_env,
                        train_losses, weights, write_dataset)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("loopdata") / "ds")


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["kind"] == kind]


# ---- the schedule that follows the clock --------------------------------------------------------------------

def test_lr_at_time_worked_numbers():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=0, time_budget_s=60, schedule="cosine")
    assert lr_at_time(0, 0.0, cfg) == pytest.approx(1e-4)  # warmup by steps: 1e-3 * 1/10
    assert lr_at_time(50, 0.5, cfg) == pytest.approx(5.5e-4)  # half the budget: halfway down the cosine
    assert lr_at_time(900, 1.0, cfg) == pytest.approx(1e-4)
    wsd = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=0, time_budget_s=60, schedule="wsd",
                      decay_frac=0.2)
    assert [lr_at_time(99, p, wsd) for p in (0.3, 0.8, 0.9, 1.0)] == pytest.approx([1e-3, 1e-3, 5.5e-4, 1e-4])


def test_default_warmup_scales_with_short_runs():
    import math

    short = TrainConfig(lr=1e-3, min_lr=1e-4, max_steps=30)  # warmup None -> 30 // 10 = 3 steps
    assert lr_at(2, short) == pytest.approx(1e-3)
    assert lr_at(29, short) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 26 / 27)))
    assert lr_at(99, TrainConfig(lr=1e-3, max_steps=5000)) == pytest.approx(1e-3)  # warmup capped at 100


def test_clock_schedule_uses_the_budget_when_the_machine_slows_down(dataset, tmp_path, monkeypatch):
    """The first steps run 40x slower (a busy machine); a plan made from them would stop far short. The clock
    schedule keeps training until the budget, ends at min_lr, and fits validation and the final save inside it."""
    import lmforge.stages.pretrain as stage

    real_loss, calls = stage.causal_lm_loss, {"n": 0}

    def busy_then_quiet(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 15:
            time.sleep(0.1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(stage, "causal_lm_loss", busy_then_quiet)
    budget = 5.0
    run_dir = run(dataset, tmp_path / "clock", max_steps=0, time_budget_s=budget, warmup_steps=2, eval_interval=0,
                  checkpoint_interval=0, log_interval=5)
    summary = json.loads((run_dir / "summary.json").read_text())
    train = records(run_dir)
    assert summary["schedule"] == "clock" and summary["stopped_early"]
    assert 0.75 * budget <= summary["wall_time_s"] <= budget + 1.0
    assert summary["steps"] > 3 * 15 * budget / (15 * 0.1)  # far more than the slow start predicted
    assert train[-1]["lr"] == pytest.approx(1e-3, rel=0.05)  # min_lr of config_dict: the decay completed
    lrs = [r["lr"] for r in train]
    assert lrs[-1] < lrs[len(lrs) // 2] < max(lrs)


# ---- stops and resume --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_a_checkpoint_and_resumes_exactly(dataset, tmp_path, signum):
    settings = dict(max_steps=12, checkpoint_interval=100, keep_checkpoints=2)
    config = config_dict(dataset, tmp_path / "stopped", **settings)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "driver.py").write_text(SLOW_DRIVER)
    process = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "config.json")],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_while_running(lambda: len(MetricsLog(tmp_path / "stopped" / "metrics.jsonl").read()) >= 3, process)
    process.send_signal(signum)
    assert process.wait(timeout=60) == 130
    err = process.stderr.read().decode()
    process.stderr.close()
    said = [line for line in err.splitlines() if line.strip() and "step/s" not in line]
    assert "Traceback" not in err and len(said) == 1, err  # the progress bar, then one line
    stopped_at = latest_checkpoint(tmp_path / "stopped")
    assert stopped_at is not None and f"checkpoint {stopped_at}" in err
    assert f"--config {tmp_path / 'stopped' / 'config.json'} --resume" in err and signal.Signals(signum).name in err
    assert main(["pretrain", "--config", str(tmp_path / "stopped" / "config.json"), "--resume"]) == 0
    full = run(dataset, tmp_path / "full", **settings)
    assert_same_weights(weights(tmp_path / "stopped"), weights(full))
    assert train_losses(tmp_path / "stopped") == train_losses(full)


def test_elapsed_time_continues_after_resume(dataset, tmp_path):
    run(dataset, tmp_path / "r", max_steps=4, checkpoint_interval=4)
    first = records(tmp_path / "r")
    run(dataset, tmp_path / "r", resume=True, max_steps=6)
    after = records(tmp_path / "r")
    assert after[:4] == first
    assert after[4]["elapsed_s"] >= first[-1]["elapsed_s"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["wall_time_s"] >= after[-1]["elapsed_s"]


def test_resume_with_a_changed_model_names_the_keys(dataset, tmp_path):
    run(dataset, tmp_path / "r", max_steps=2, checkpoint_interval=2)
    changed = {**config_dict(dataset, tmp_path / "r", max_steps=4), "resume": True,
               "model": {**TINY_MODEL, "n_layer": 2, "d_ff": 48}}
    with pytest.raises(ConfigError, match=r"n_layer \(saved 1, now 2\), d_ff \(saved 32, now 48\)"):
        pretrain(build_config(PretrainConfig, changed))
    with pytest.raises(LmforgeError, match="add --resume to continue that run"):
        run(dataset, tmp_path / "r", max_steps=4)


# ---- what a run may read and write ---------------------------------------------------------------------------

def test_out_dir_that_is_not_a_run_dir_is_refused(dataset, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("precious")
    with pytest.raises(LmforgeError, match=r"notes exists and is not a run dir \(no config.json\)"):
        run(dataset, foreign, max_steps=1)
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    with pytest.raises(LmforgeError, match="holds this command's input"):
        run(dataset, dataset.parent, max_steps=1)
    model_dir = tmp_path / "model"
    Transformer(ModelConfig(**TINY_MODEL)).save(model_dir)
    with pytest.raises(LmforgeError, match="is a model dir, not a run dir"):
        run(dataset, model_dir, max_steps=1)


def test_init_from_a_model_of_another_tokenizer_is_refused(dataset, tmp_path):
    model_dir = tmp_path / "other"
    Transformer(ModelConfig(**TINY_MODEL)).save(model_dir)
    other = Tokenizer.train(["completely different words here"] * 20, vocab_size=300)  # same size, other ids
    other.save(model_dir)
    config = {**config_dict(dataset, tmp_path / "run", max_steps=1), "init_from": str(model_dir)}
    with pytest.raises(TokenizerMismatchError, match=r"another tokenizer .* --tokenizer"):
        pretrain(build_config(PretrainConfig, config))
    assert not (tmp_path / "run").exists()
    Tokenizer.load(dataset / "tokenizer").save(model_dir)  # the dataset's own tokenizer: accepted
    assert (pretrain(build_config(PretrainConfig, config)) / "final").is_dir()


def test_model_vocab_size_comes_from_the_dataset_and_short_runs_warn(dataset, tmp_path, capsys):
    model = {k: v for k, v in TINY_MODEL.items() if k != "vocab_size"}
    config = {**config_dict(dataset, tmp_path / "run", max_steps=3, warmup_steps=10), "model": model}
    run_dir = pretrain(build_config(PretrainConfig, config))
    assert Transformer.from_dir(run_dir / "final").config.vocab_size == 64
    out = capsys.readouterr().out
    assert "warning: train.warmup_steps=10 >= train.max_steps=3" in out
    assert any("warmup" in w for w in json.loads((run_dir / "summary.json").read_text())["warnings"])


def test_missing_validation_is_a_warning_in_the_summary(dataset, tmp_path, capsys):
    import shutil

    small = tmp_path / "small"
    shutil.copytree(dataset, small)
    meta = json.loads((small / "meta.json").read_text())
    (small / "val_000000.bin").write_bytes(b"\x00\x00" * 4)  # 4 tokens: shorter than one window
    meta["splits"]["val"].update(tokens=4, shards=["val_000000.bin"])
    (small / "meta.json").write_text(json.dumps(meta))
    run_dir = run(small, tmp_path / "run", max_steps=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] is None
    assert any("val split has 4 tokens" in w for w in summary["warnings"])
    assert "warning: dataset" in capsys.readouterr().out


# ---- MFU and loggers -----------------------------------------------------------------------------------------

def test_peak_flops_is_the_best_seen_on_this_machine(tmp_path, monkeypatch):
    import lmforge.train.mfu as mfu_module

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    rates = iter([80e9, 180e9, 81e9])
    monkeypatch.setattr(mfu_module, "measured_matmul_flops", lambda *a, **k: next(rates))
    cpu = torch.device("cpu")
    assert [mfu_module.measure_peak(cpu, torch.float32)[0] for _ in range(3)] == [80e9, 180e9, 180e9]
    key = mfu_module.machine_key(cpu, torch.float32)
    assert json.loads((tmp_path / "peak_flops.json").read_text()) == {key: 180e9}


def test_mfu_never_exceeds_one_and_the_peak_is_recorded(dataset, tmp_path, monkeypatch):
    import lmforge.train.mfu as mfu_module

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mfu_module, "measured_matmul_flops", lambda *a, **k: 1.0)  # a hopelessly low peak
    run_dir = run(dataset, tmp_path / "run", max_steps=3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 < summary["mfu"] <= 1.0 and all(0 < r["mfu"] <= 1.0 for r in records(run_dir))
    assert summary["peak_flops"] > 1.0 and "rate reached in training" in summary["peak_flops_source"]
    assert all(r["peak_flops"] >= 1.0 for r in records(run_dir))


def test_tensorboard_and_wandb_receive_the_metrics(dataset, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run(dataset, tmp_path / "run", max_steps=4, tensorboard=True, wandb=True)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = train_losses(run_dir)
    assert logged.keys() == expected.keys() and list(logged.values()) == pytest.approx(list(expected.values()))
    assert [e.step for e in events.Scalars("val/val_loss")] == [3, 4]
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
