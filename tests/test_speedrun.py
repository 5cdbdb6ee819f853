"""`lmforge speedrun`: the budget rule, and the whole command end to end on the tiny preset (the standard library's
docstrings and a synthetic WordNet/FreeDict cache: no network), with a simulated busy machine, resume after a
kill, skipped stages and refused settings."""

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.speedrun import PRESETS, STAGES, TRAINING_STAGES, Speedrun, SpeedrunConfig, stage_budget

from test_tasks import write_task_cache

BUDGET_S = 60.0
SHARES = {"pretrain": 0.45, "sft": 0.25, "dpo": 0.10, "grpo": 0.08}
LOAD_S = 0.01  # extra seconds per step once a stage's clock is a third gone: the machine got busy


# ---- the budget rule -----------------------------------------------------------------------------------------------


def test_each_stage_gets_its_share_of_what_is_left():
    everything = set(STAGES)
    budget, reason = stage_budget("pretrain", 1800.0, SHARES, everything, 120.0)
    assert reason is None and budget == pytest.approx(0.45 * 1800)
    # on schedule (data took its sixth of the 12% overhead), pretraining still gets exactly its 45%
    budget, _ = stage_budget("pretrain", 1800 - 0.02 * 1800, SHARES, everything - {"data"}, 120.0)
    assert budget == pytest.approx(0.45 * 1800)
    pending = {"sft", "eval_sft", "dpo", "eval_dpo", "grpo", "eval_grpo", "report"}
    on_time = stage_budget("sft", 1800 * (1 - 0.45 - 0.04), SHARES, pending, 60.0)[0]
    assert on_time == pytest.approx(0.25 * 1800)
    late = stage_budget("sft", 1800 * (1 - 0.45 - 0.04) - 300, SHARES, pending, 60.0)[0]
    assert late == pytest.approx(on_time * (1 - 300 / (1800 * 0.51)))  # an earlier overrun shrinks what follows


def test_a_stage_below_its_minimum_is_raised_to_it_or_skipped():
    # weights: training 0.25 + 0.10 + 0.08 = 0.43, overhead 0.12 * 4/6 = 0.08: sft gets 0.25/0.51 of what is left
    pending = {"sft", "eval_sft", "dpo", "eval_dpo", "grpo", "eval_grpo", "report"}
    assert stage_budget("sft", 150.0, SHARES, pending, 60.0) == (pytest.approx(150 * 0.25 / 0.51), None)
    assert stage_budget("sft", 150.0, SHARES, pending, 100.0) == (100.0, None)  # 100 s fits in 150 * .43/.51
    budget, reason = stage_budget("sft", 100.0, SHARES, pending, 100.0)
    assert budget == pytest.approx(100 * 0.25 / 0.51)
    assert reason == "its minimum of 100 s does not fit in the 84 s left for training (100 s of the budget left)"
    assert stage_budget("grpo", 600.0, {**SHARES, "grpo": 0.0}, pending, 45.0)[1] == "grpo_share is 0"


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="shares sum to 1.05"):
        SpeedrunConfig(pretrain_share=0.62)
    with pytest.raises(ConfigError, match="speedrun eval_limit=-1: expected >= 0"):
        SpeedrunConfig(eval_limit=-1)
    gpu = Speedrun(SpeedrunConfig(preset="gpu"))  # the GPU preset trains in bf16 with torch.compile
    from lmforge.train.config import TrainConfig

    section = gpu.train_section(TrainConfig(), "pretrain", 3e-3, 600.0, 64)
    assert (section.dtype, section.compile, section.max_steps, section.time_budget_s) == ("bfloat16", True, 0, 600.0)
    assert PRESETS["gpu"].eval_limit > PRESETS["cpu"].eval_limit and PRESETS["cpu"].model == "quickstart"


def test_a_budget_too_small_for_pretraining_is_refused(tmp_path, capsys):
    assert main(["speedrun", "--out_dir", str(tmp_path / "run"), "--time_budget_s", "100"]) == 2
    error = capsys.readouterr().err
    assert "time_budget_s=100 leaves pretraining no room: its minimum of 120 s does not fit" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# ---- end to end ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory) -> Path:
    """A cache holding synthetic wordnet-base and dict-freedict-eng-deu packages: the built-in tasks, offline."""
    return write_task_cache(tmp_path_factory.mktemp("cache"))


def args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["speedrun", "--preset", "tiny", "--out_dir", str(out), "--time_budget_s", str(BUDGET_S),
            "--cache_dir", str(cache), *extra]


def done(out: Path) -> dict[str, dict]:
    return {stage: json.loads((out / stage / "done.json").read_text()) for stage in STAGES}


def model_mtimes(out: Path) -> dict[str, float]:
    return {stage: (out / stage / "run" / "final" / "model.safetensors").stat().st_mtime_ns
            for stage in TRAINING_STAGES}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, task_cache) -> tuple[Path, str]:
    """A whole tiny speedrun, on a machine that gets busy a third of the way into each training stage."""
    import lmforge.train.loop as loop

    real = loop.lr_at_time

    def busy(step, progress, cfg):
        if progress > 1 / 3:
            time.sleep(LOAD_S)
        return real(step, progress, cfg)

    out = tmp_path_factory.mktemp("speedrun") / "run"
    loop.lr_at_time = busy
    started = time.monotonic()
    try:
        assert main(args(out, task_cache)) == 0
    finally:
        loop.lr_at_time = real
    return out, time.monotonic() - started


@pytest.mark.slow
def test_speedrun_end_to_end(finished, task_cache):
    out, wall = finished
    records = done(out)
    assert not any(r["skipped"] for r in records.values()), records
    assert wall < BUDGET_S + 15  # the stages' own setup (loading, tokenizing) is outside their loops' clocks
    assert sum(r["wall_s"] for r in records.values()) < BUDGET_S + 10
    for stage in TRAINING_STAGES:  # each stage kept to its budget, its schedule ending at min_lr on the clock
        figures, budget = records[stage]["figures"], records[stage]["budget_s"]
        assert figures["steps"] > 5 and figures["wall_time_s"] <= budget + 0.5, stage
        logged = [json.loads(line) for line in (out / stage / "run" / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((out / stage / "run" / "config.json").read_text())["train"]
        assert config["time_budget_s"] == budget and config["max_steps"] == 0
        assert [r for r in logged if r["kind"] == "train"][-1]["lr"] == pytest.approx(config["min_lr"], rel=0.05)
    assert records["pretrain"]["figures"]["val_bpb"] > 0
    assert records["grpo"]["start_model"] == "dpo"
    base, final = records["eval_base"], records["eval_grpo"]
    assert (base["shots"], base["format"], final["shots"], final["format"]) == (3, "plain", 0, "chat")
    assert set(base["figures"]) == set(records["data"]["figures"]["tasks"]["eval"]) >= {"arithmetic",
                                                                                       "arithmetic_pref"}
    report = (out / "report.md").read_text()
    for section in ("## Stages", "## Pretraining", "bits per byte", "## Loss curves", "## Test accuracy",
                    "## Preference accuracy", "## Sample chats", "\ngrpo model:  ", "| arithmetic (n=8) |",
                    "--preset tiny --time_budget_s 60.0 --cache_dir"):
        assert section in report, section
    for plot in ("loss_curves.png", "tasks.png"):
        assert (out / "report" / plot).read_bytes()[:4] == b"\x89PNG" and f"report/{plot}" in report
    final_dir = out / records["report"]["model_dir"]
    assert final_dir == out / "grpo" / "run" / "final"
    model = lmforge.load(final_dir)
    assert model.num_parameters() == records["pretrain"]["figures"]["parameters"]
    from lmforge.eval.prompts import is_chat_model

    assert is_chat_model(final_dir) and lmforge.Tokenizer.load(final_dir).chat_template


@pytest.mark.slow
def test_running_it_again_skips_every_stage(finished, task_cache, capsys):
    out, _ = finished
    before = model_mtimes(out)
    records = done(out)
    capsys.readouterr()
    assert main(args(out, task_cache)) == 0
    printed = capsys.readouterr().out
    assert printed.count(": done before (") == len(STAGES)
    assert all(line.startswith("speedrun: ") for line in printed.splitlines())  # no stage said a word
    assert model_mtimes(out) == before and done(out) == records


@pytest.mark.slow
def test_a_deleted_done_json_reruns_that_stage_and_the_report_only(finished, task_cache, tmp_path, capsys):
    out = shutil.copytree(finished[0], tmp_path / "run")
    before, records = model_mtimes(out), done(out)
    (out / "eval_dpo" / "done.json").unlink()
    capsys.readouterr()
    assert main(args(out, task_cache)) == 0
    printed = capsys.readouterr().out
    assert printed.count(": done before (") == len(STAGES) - 2
    assert "eval_dpo: dpo model on 5 tasks" in printed and "report: eval_dpo ran again; redoing it" in printed
    assert model_mtimes(out) == before
    after = done(out)
    assert after["eval_dpo"]["figures"] == records["eval_dpo"]["figures"]  # greedy: the same answers again
    assert {s for s in STAGES if after[s] != records[s]} <= {"eval_dpo", "report"}


@pytest.mark.slow
def test_a_killed_training_stage_resumes_from_its_checkpoint(finished, task_cache, tmp_path, capsys):
    out = shutil.copytree(finished[0], tmp_path / "run")
    run_dir = out / "grpo" / "run"
    checkpoints = sorted((run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    assert len(checkpoints) == 2
    # the state a kill after the older checkpoint leaves: no final model, no summary, no done.json
    for path in (checkpoints[-1], run_dir / "final"):
        shutil.rmtree(path)
    for path in (run_dir / "summary.json", out / "grpo" / "done.json"):
        path.unlink()
    step = int(checkpoints[0].name.split("_")[1])
    before = {s: t for s, t in model_mtimes(finished[0]).items() if s != "grpo"}
    capsys.readouterr()
    assert main(args(out, task_cache)) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "grpo" / "plan.json").read_text())
    assert f"grpo: resuming from step_{step}, budget {plan['budget_s']:.0f} s" in printed
    assert "eval_grpo: grpo ran again" in printed and printed.count(": done before (") == len(STAGES) - 3
    record = json.loads((out / "grpo" / "done.json").read_text())
    assert record["budget_s"] == plan["budget_s"] and record["figures"]["steps"] > step
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the log continues where the checkpoint was
    assert {s: t for s, t in model_mtimes(out).items() if s != "grpo"} == before


@pytest.mark.slow
def test_other_settings_for_the_same_dir_are_refused_but_serving_is_not(finished, task_cache, capsys,
                                                                        monkeypatch):
    out, _ = finished
    capsys.readouterr()
    assert main(args(out, task_cache, "--seed", "7")) == 2
    error = capsys.readouterr().err
    assert "speedrun.json: this out_dir was started with other settings (seed 1337 -> 7)" in error
    assert len(error.strip().splitlines()) == 1
    served = []
    monkeypatch.setattr("lmforge.serve.server.serve", served.append)
    assert main(args(out, task_cache, "--serve", "true", "--port", "8123")) == 0
    assert "chat with the final model at http://127.0.0.1:8123/" in capsys.readouterr().out
    assert served[0].model == [str(out / "grpo" / "run" / "final")] and served[0].port == 8123


@pytest.mark.slow
def test_an_interrupted_run_goes_on_and_a_stage_that_does_not_fit_is_skipped(task_cache, tmp_path, capsys,
                                                                               monkeypatch):
    import lmforge.train.loop as loop

    real = loop.lr_at_time

    def interrupt(step, progress, cfg):  # Ctrl-C in the middle of pretraining
        if step == 30:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, progress, cfg)

    out = tmp_path / "run"
    command = args(out, task_cache, "--time_budget_s", "25", "--sft_min_s", "1000", "--sample_chats", "2")
    monkeypatch.setattr(loop, "lr_at_time", interrupt)
    assert main(command) == 130
    error = capsys.readouterr().err
    stopped = re.search(r"lmforge speedrun: pretrain stopped by SIGINT at step (\d+); checkpoint .*; run the same "
                        r"lmforge speedrun command again to continue from there", error)
    assert stopped, error
    monkeypatch.setattr(loop, "lr_at_time", real)
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert f"pretrain: resuming from step_{stopped.group(1)}" in printed and "data: done before" in printed
    assert "[4/10] sft: skipped: its minimum of 1000 s does not fit in the" in printed
    records = done(out)
    assert [s for s in STAGES if records[s]["skipped"]] == ["sft", "eval_sft", "dpo", "eval_dpo", "grpo",
                                                            "eval_grpo"]
    assert records["pretrain"]["figures"]["steps"] > int(stopped.group(1))
    assert records["dpo"]["reason"] == "needs the sft model (sft was skipped)"
    assert records["report"]["model_dir"] == "pretrain/run/final"
    report = (out / "report.md").read_text()
    assert "**skipped**: its minimum of 1000 s does not fit" in report
    assert "\nbase model:  " in report and "pretrain model:" not in report
